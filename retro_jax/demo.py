"""`retro-jax demo` (what `make demo` runs): the whole job on the embedded default corpus.

Stages, each reusing the command's own code path:
  1. corpus     statistics of the embedded corpus (this interpreter's stdlib + pydoc topics)
  2. build-db   tokenizer, chunks, frozen-BERT keys, ScaNN index      -> W/db
  3. train      a small RETRO and its baseline (same decoder, same tokens) -> W/retro, W/baseline
                then RETRO-fitting (paper section 4.2): the trained baseline's decoder, frozen,
                plus CCA and encoder trained on the same tokens        -> W/retrofit
  4. eval       RETRO[ON], RETRO[OFF], the baseline and the retrofit's ON / OFF: bits per byte
                on held-out files and the bpb(alpha) curve; the retrieval diagnostics
                RETRO[random] (random database chunks as neighbours) and RETRO[oracle]
                (each chunk's true continuation as its neighbour)      -> W/*/eval/*.json
  5. sample     one prompt, with the neighbours each generated chunk attended to
  6. report     the results table (W/results.md) and plots (W/leakage.png, W/loss.png)

Every stage resumes: a second run reuses the database, the checkpoints and the evaluations.
`--quick` is the reduced form CI runs (fewer chunks and steps; the numbers mean little).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from retro_jax.configs import load_config

log = logging.getLogger(__name__)

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "demo.py"
DEMO_PROMPT = "def read_config(path):\n    \"\"\"Read a configuration file and return"


def demo_configs(root: Path, *, quick: bool, num_devices: int | None = None):
    """The RETRO, baseline and retrofit configs of the demo, sharing the database W/db; the
    retrofit starts from the baseline's checkpoints."""
    overrides = [f"database.path={root / 'db'}"]
    suffix = ",quick" if quick else ""
    retro = load_config(f"{EXPERIMENT}:runlocal{suffix}", overrides, num_devices=num_devices)
    baseline = load_config(f"{EXPERIMENT}:baseline{suffix}", overrides, num_devices=num_devices)
    retrofit = load_config(f"{EXPERIMENT}:retrofit{suffix}",
                           overrides + [f"train.init_from={root / 'baseline' / 'checkpoints'}"],
                           num_devices=num_devices)
    return retro, baseline, retrofit


# (row label, run directory under W, evaluation mode), in the table's order.
# RETRO[random] and RETRO[oracle] are the retrieval diagnostics (`retro-jax eval --retrieval`).
EVALUATED = (("RETRO[ON]", "retro", "on"), ("RETRO[OFF]", "retro", "off"),
             ("RETRO[random]", "retro", "random"), ("RETRO[oracle]", "retro", "oracle"),
             ("baseline", "baseline", "baseline"), ("RETRO-fit[ON]", "retrofit", "on"),
             ("RETRO-fit[OFF]", "retrofit", "off"))
DIAGNOSTIC_MODES = ("random", "oracle")


def verdicts(bpb: dict[str, float | None]) -> list[str]:
    """The report's conclusions from each model's bits per byte (label -> bpb)."""

    def gain_line(model: str, note: str) -> str | None:
        if bpb.get(model) is None or bpb.get("baseline") is None:
            return None
        gain = bpb["baseline"] - bpb[model]
        helps = "retrieval helps" if gain > 0 else "retrieval does not help here"
        return f"{model} vs baseline: {gain:+.3f} bits per byte ({helps}{note})"

    lines = [gain_line("RETRO[ON]", ""),
             gain_line("RETRO-fit[ON]", "; same frozen decoder as the baseline, so this is "
                                         "what the retrieved neighbours alone are worth")]
    if bpb.get("RETRO-fit[OFF]") is not None and bpb.get("baseline") is not None:
        lines.append(f"RETRO-fit[OFF] - baseline: {bpb['RETRO-fit[OFF]'] - bpb['baseline']:+.1e} "
                     "(0 up to float rounding: without neighbours the retrofit is the baseline)")
    if bpb.get("RETRO[ON]") is not None and bpb.get("RETRO[random]") is not None:
        gain = bpb["RETRO[random]"] - bpb["RETRO[ON]"]
        lines.append(f"RETRO[ON] vs RETRO[random]: {gain:+.3f} bits per byte (what the retrieved "
                     "neighbours are worth over unrelated text in the same format)")
    return [line for line in lines if line]


def _banner(number: int, title: str) -> None:
    print(f"\n=== [{number}/6] {title}", flush=True)


def results_rows(root: Path, split: str) -> list[dict]:
    """One row per evaluated model of the demo: name, bpb, token ppl, filtered bpb."""
    from retro_jax.evaluate.results import result_path

    rows = []
    for label, run, mode in EVALUATED:
        path = result_path(root / run, split, mode)
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        curve = {round(p["alpha"], 3): p.get("bpb") for p in
                 (record.get("leakage") or {}).get("curve", [])}
        rows.append({"model": label, "bpb": record.get("value"),
                     "token_ppl": (record.get("overall") or {}).get("perplexity"),
                     "tokens": (record.get("overall") or {}).get("tokens"),
                     "curve": curve, "params": record.get("params")})
    return rows


def format_results(rows: list[dict], split: str) -> str:
    # Thresholds no chunk falls under (alpha = 0 on most corpora) would be a column of "-".
    alphas = sorted({a for r in rows for a, v in r["curve"].items() if v is not None})
    head = ["model", "params", f"bpb ({split})", "token ppl"] + [f"bpb a<={a:g}" for a in alphas]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"

    for r in rows:
        cells = [r["model"], f"{(r['params'] or 0) / 1e6:.1f}M", fmt(r["bpb"]),
                 fmt(r["token_ppl"], 2)] + [fmt(r["curve"].get(a)) for a in alphas]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(args) -> int:
    import jax

    from data_pipeline.corpora import corpus_statistics, format_statistics
    from retro_jax.build_db import build_run_database
    from retro_jax.evaluate.plots import plot_leakage
    from retro_jax.evaluate.results import collect_leakage_curves
    from retro_jax.evaluate.runner import evaluate_run
    from retro_jax.sample.cli import format_text, sample_run
    from retro_jax.train.loop import train
    from retro_jax.train.plot import plot_runs

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    retro_cfg, base_cfg, retrofit_cfg = demo_configs(root, quick=args.quick,
                                                     num_devices=jax.device_count())
    configs = {"retro": retro_cfg, "baseline": base_cfg, "retrofit": retrofit_cfg}
    split = retro_cfg.eval.split
    times: dict[str, float] = {}
    start = time.perf_counter()

    def lap(stage: str, t0: float) -> None:
        times[stage] = round(time.perf_counter() - t0, 1)
        print(f"--- {stage}: {times[stage]:.1f} s", flush=True)

    _banner(1, "corpus: the embedded default corpus")
    t0 = time.perf_counter()
    print(format_statistics(corpus_statistics(**retro_cfg.corpus.to_dict())))
    lap("corpus", t0)

    _banner(2, "build-db: tokenizer, chunks, frozen-BERT keys, ScaNN index")
    t0 = time.perf_counter()
    build_run_database(retro_cfg, retro_cfg.database.path)
    lap("build-db", t0)

    _banner(3, "train: RETRO, its baseline (same decoder, same tokens), the RETRO-fitted baseline")
    for name, config in configs.items():  # the retrofit starts from the trained baseline
        t0 = time.perf_counter()
        if train(config, root / name).get("preempted"):
            print("demo stopped by a signal; rerun `make demo` to resume", flush=True)
            return 0
        lap(f"train {name}", t0)

    _banner(4, "eval: RETRO[ON]/[OFF]/[random]/[oracle], baseline, RETRO-fit[ON]/[OFF], "
               "leakage-filtered")
    t0 = time.perf_counter()
    for _, name, mode in EVALUATED:
        retrieval = "on" if mode == "baseline" else mode  # a baseline has no retrieval to switch
        evaluate_run(configs[name], root / name, retrieval=retrieval,
                     leakage=mode not in DIAGNOSTIC_MODES)
    lap("eval", t0)

    _banner(5, "sample: one prompt, with attribution")
    t0 = time.perf_counter()
    s = retro_cfg.sample
    sample = sample_run(retro_cfg, root / "retro", DEMO_PROMPT, max_tokens=s.max_tokens,
                        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)
    (root / "sample.json").write_text(json.dumps(sample, indent=2))
    print(format_text(sample))
    lap("sample", t0)

    _banner(6, "report")
    rows = results_rows(root, split)
    table = format_results(rows, split)
    runs = [root / name for name in configs]
    curves = collect_leakage_curves(runs, split)
    leakage_png = plot_leakage(curves, root / "leakage.png",
                               title=f"demo: {split} bits per byte, leakage-filtered")
    loss_png = plot_runs(runs, root / "loss.png", metric="loss")
    total = time.perf_counter() - start
    verdict = "\n".join(verdicts({r["model"]: r["bpb"] for r in rows}))
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    text = (f"# retro-jax demo results\n\n{table}\n\n{verdict}\n\n"
            f"Held-out {split} files of the embedded corpus; {jax.device_count()} devices "
            f"({jax.devices()[0].platform}); total {total:.0f} s ({stages}).\n")
    (root / "results.md").write_text(text)
    print(text)
    print(f"plots: {leakage_png}, {loss_png}; table: {root / 'results.md'}")
    return 0
