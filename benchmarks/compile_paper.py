"""Ahead-of-time compile every paper config for its TPU slice: one JSON line per config.

For experiments/paper/{wikitext103,pile}.py at 172m, 425m, 1.5b and 7.5b, RETRO and baseline,
runs `retro-jax compile --json` on the slice the experiment's docstring names:

    172m, 425m  v5p-32   topology v5p:2x2x4   (16 chips)
    1.5b        v5p-64   topology v5p:2x4x4   (32 chips)
    7.5b        v5p-128  topology v5p:4x4x4   (64 chips)

each in a process of its own (libtpu admits one process at a time), one after another, with a
per-config timeout. The WikiText-103 and Pile files train the same step at each size (they
differ in the corpus, the packing and the number of steps, none of which the compiled step
depends on), so a config whose step key (model, mesh, batch, optimiser, n, k, m) matches one
already compiled is recorded with `same_step_as` and the figures of that compile. Every
config's record (the compile report: bytes per device against HBM, XLA FLOPs per step,
compile time, predicted step time and MFU; or status "timeout" / "error") is printed as one
JSON line and appended to --out; a rerun skips the configs already there whose step key is
unchanged (a timeout is retried only with a larger --timeout), so it resumes where it stopped
and recompiles a config that was edited since.

    make tpu-env                                    # .venv-tpu: the project + jax[tpu]
    .venv-tpu/bin/python benchmarks/compile_paper.py [--sizes 172m,425m] [--timeout 3600]
    .venv-tpu/bin/python benchmarks/compile_paper.py --table   # the markdown table of --out

It runs the compiles with --python (default: .venv-tpu/bin/python, else this interpreter
when it has libtpu); with neither it says how to make one and exits 0 (so `make bench`
passes on a machine without it). Timings are this machine's: the compile runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / ".cache" / "compile_paper.jsonl"
SLICES = {  # size -> (slice name, topology); from the experiments' docstrings
    "172m": ("v5p-32", "v5p:2x2x4"),
    "425m": ("v5p-32", "v5p:2x2x4"),
    "1.5b": ("v5p-64", "v5p:2x4x4"),
    "7.5b": ("v5p-128", "v5p:4x4x4"),
}
DATASETS = ("wikitext103", "pile")
KINDS = ("retro", "baseline")


def paper_configs(sizes=tuple(SLICES), datasets=DATASETS, kinds=KINDS) -> list[dict]:
    """Every (config spec, slice, topology), smallest size first."""
    out = []
    for size in sizes:
        for dataset in datasets:
            for kind in kinds:
                spec = f"experiments/paper/{dataset}.py:{size}"
                if kind == "baseline":
                    spec += ",baseline"
                name, topology = SLICES[size]
                out.append({"config": spec, "size": size, "dataset": dataset, "kind": kind,
                            "slice": name, "topology": topology})
    return out


def read_done(path: Path) -> dict[str, dict]:
    """config spec -> its last record in `path`."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "config" in record:
                done[record["config"]] = record
    return done


def needs_run(record: dict | None, timeout: float) -> bool:
    if record is None:
        return True
    status = record.get("status")
    if status == "timeout":
        return timeout > float(record.get("timeout_s", 0))
    return status not in ("ok", "does_not_fit")


def tpu_python(explicit: str | None) -> str | None:
    """The interpreter with libtpu that runs the compiles, or None."""
    if explicit:
        return explicit
    venv = REPO / ".venv-tpu" / "bin" / "python"
    if venv.exists():
        return str(venv)
    try:
        import libtpu  # noqa: F401

        return sys.executable
    except ImportError:
        return None


# Keys the compiled train step does not depend on (schedule length, logging, data source).
STEP_INDEPENDENT = {"train": ("num_steps", "log_every", "eval_every", "eval_batches",
                              "checkpoint_every", "keep_last", "keep_every", "init_from"),
                    "data": ("packing", "shuffle_seed", "prefetch", "precomputed_neighbours")}


def step_key(spec: str) -> str:
    """A digest of what the compiled train step of `spec` depends on."""
    import hashlib

    sys.path.insert(0, str(REPO))
    from retro_jax.configs import load_config

    path, _, variant = spec.partition(":")
    config = load_config(f"{REPO / path}:{variant}" if variant else str(REPO / path)).to_dict()
    key = {section: {k: v for k, v in config[section].items()
                     if k not in STEP_INDEPENDENT.get(section, ())}
           for section in ("model", "mesh", "train", "data")}
    key["chunk_len"] = config["database"]["chunk_len"]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compile_one(python: str, entry: dict, timeout: float) -> dict:
    """Run `retro-jax compile --json` for one config in its own process."""
    cmd = [python, "-m", "retro_jax", "compile", "--config", entry["config"],
           "--topology", entry["topology"], "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**entry, "status": "timeout", "timeout_s": timeout,
                "wall_seconds": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    report = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                report = json.loads(line)
                break
            except ValueError:
                pass
    if report is None or proc.returncode not in (0, 1):
        return {**entry, "status": "error", "returncode": proc.returncode,
                "wall_seconds": wall, "process_cpu_seconds": cpu,
                "stderr_tail": proc.stderr[-2000:]}
    status = "ok" if report.get("fits") else "does_not_fit"
    return {**entry, **report, "status": status, "wall_seconds": wall,
            "process_cpu_seconds": cpu, "load_average": os.getloadavg()[0]}


def _gib(x) -> str:
    return "" if x is None else f"{x / 2**30:.1f}"


def with_prediction(record: dict) -> dict:
    """`record` with the prediction recomputed by the current `predict_step` (records keep
    the chip's figures), so a table never mixes two versions of the model."""
    if "xla_flops_per_device" not in record or "peak_flops_per_device" not in record:
        return record
    sys.path.insert(0, str(REPO))
    from retro_jax.train.aot import Chip, predict_step

    chip = Chip(record.get("chip", "?"), record["peak_flops_per_device"],
                record.get("hbm_bytes_per_device"), record.get("hbm_bandwidth_per_device"))
    return {**record, **predict_step(record, chip)}


def markdown_table(records: list[dict]) -> str:
    """The docs/benchmarks.md table of compile records (blank cells: not measured; a config
    that does not fit shows, as its total, the bytes XLA said it needs)."""
    sys.path.insert(0, str(REPO))
    from retro_jax.train.aot import needed_bytes

    head = ["config", "slice (topology)", "status", "compile s (CPU s)", "params GiB/dev",
            "optimiser GiB/dev", "temporaries GiB/dev", "total GiB/dev (of HBM)",
            "XLA FLOPs/step/dev", "model FLOPs/step", "predicted step ms (bound)",
            "predicted MFU"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in records:
        r = with_prediction(r)
        total = (r.get("bytes_total_per_device") or r.get("bytes_needed_per_device")
                 or needed_bytes(r.get("error", "")))
        hbm = r.get("hbm_bytes_per_device")
        status = r.get("status", "?")
        if status == "timeout":
            status = f"timeout ({r.get('timeout_s', 0):.0f} s)"
        if r.get("same_step_as"):
            status += f" (= {r['same_step_as'].removeprefix('experiments/paper/')})"
        step, mfu, flops = (r.get("predicted_step_seconds"), r.get("predicted_mfu"),
                            r.get("xla_flops_per_device"))
        cells = [
            r["config"].removeprefix("experiments/paper/"), f"{r['slice']} ({r['topology']})",
            status,
            "" if r.get("compile_seconds") is None else f"{r['compile_seconds']:.0f}"
            + (f" ({r['compile_cpu_seconds']:.0f})" if r.get("compile_cpu_seconds") else ""),
            _gib(r.get("bytes_params_per_device")), _gib(r.get("bytes_optimizer_per_device")),
            _gib(r.get("bytes_temp_per_device")),
            _gib(total) + (f" ({100 * total / hbm:.0f}%)" if total and hbm else ""),
            "" if flops is None else f"{flops:.3g}",
            "" if r.get("model_flops_per_step") is None else f"{r['model_flops_per_step']:.3g}",
            "" if step is None else f"{1e3 * step:,.0f}"
            + {"compute": " (FLOPs)", "hbm bandwidth": " (HBM)"}.get(
                r.get("predicted_bound"), ""),
            "" if mfu is None else f"{100 * mfu:.0f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSONL results (resumable)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per config")
    ap.add_argument("--sizes", default=",".join(SLICES), help="comma-separated sizes")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--kinds", default=",".join(KINDS), help="retro,baseline")
    ap.add_argument("--python", default=None, help="interpreter with libtpu (jax[tpu])")
    ap.add_argument("--table", action="store_true",
                    help="print the markdown table of --out and exit (no compiling)")
    ap.add_argument("--list", action="store_true", help="print the configs and exit")
    args = ap.parse_args(argv)
    entries = paper_configs(args.sizes.split(","), args.datasets.split(","),
                            args.kinds.split(","))
    if args.list:
        for entry in entries:
            print(json.dumps(entry))
        return 0
    done = read_done(args.out)
    if args.table:
        print(markdown_table([{**e, **done[e["config"]]} for e in entries
                              if e["config"] in done]))
        missing = [e["config"] for e in entries if e["config"] not in done]
        if missing:
            print(f"\nnot in {args.out}: {', '.join(missing)}")
        return 0
    python = tpu_python(args.python)
    if python is None:
        print("compile_paper.py: no environment with libtpu: `make tpu-env` makes .venv-tpu "
              "(the project plus jax[tpu]==0.10.2); skipping", file=sys.stderr)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    compiled = {}  # step key -> a record that compiled it (ok / does_not_fit)
    for record in done.values():
        if record.get("status") in ("ok", "does_not_fit") and not record.get("same_step_as"):
            compiled.setdefault(record.get("step_key") or step_key(record["config"]), record)
    for entry in entries:
        entry["step_key"] = step_key(entry["config"])
        previous = done.get(entry["config"])
        if previous is not None and previous.get("step_key") != entry["step_key"]:
            previous = None  # the config changed since that record: compile it again
        if not needs_run(previous, args.timeout):
            print(json.dumps(previous), flush=True)
            continue
        twin = compiled.get(entry["step_key"])
        if twin is not None:
            record = {**twin, **entry, "same_step_as": twin["config"]}
        else:
            print(f"== compiling {entry['config']} for {entry['slice']} ({entry['topology']}), "
                  f"timeout {args.timeout:.0f} s", file=sys.stderr, flush=True)
            record = compile_one(python, entry, args.timeout)
            record["date"] = time.strftime("%Y-%m-%d")
            if record["status"] in ("ok", "does_not_fit"):
                compiled[entry["step_key"]] = record
        line = json.dumps(record)
        print(line, flush=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
