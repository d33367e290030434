"""`retro-jax sweep EXP... --workdir ROOT`: train and evaluate several experiments, then compare.

    retro-jax sweep experiments/ablations/base.py:runlocal \\
        experiments/ablations/cca_top_only.py:runlocal --workdir runs/ablations

Each experiment runs in `ROOT/<name>` (name = the file's stem, plus its variant unless that is
`runlocal`). Experiments whose database sections (corpus, tokenizer, database, embedder, index)
agree share one database, `ROOT/db-<hash>`. A finished run (its latest checkpoint at
train.num_steps and its evaluation files newer than that checkpoint) is skipped; an interrupted
one resumes from its checkpoint. Baselines train first, so that a retrofitting experiment with
no `train.init_from` starts from the sweep's baseline. One failing experiment does not stop the
others: it is listed in results.md and the sweep exits 1.

Writes ROOT/results.md (the `retro-jax report` table of every run), ROOT/<metric>.png (one
bar chart per metric, RETRO[ON] and [OFF] side by side for each experiment) and ROOT/loss.png.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import traceback
from pathlib import Path

from retro_jax.configs import ConfigError, load_config
from retro_jax.configs.loader import split_spec

log = logging.getLogger(__name__)

DB_SECTIONS = ("corpus", "tokenizer", "database", "embedder", "index")


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT: the sweep stops and resumes on relaunch."""


@dataclasses.dataclass
class SweepRun:
    name: str
    spec: str
    config: object
    workdir: Path
    status: str = "pending"  # pending | skipped | done | failed | interrupted
    error: str = ""


def run_name(spec: str) -> str:
    """'experiments/ablations/cca_top_only.py:runlocal' -> 'cca_top_only'."""
    path, arg = split_spec(spec)
    extra = [v for v in (arg or "").split(",") if v and v != "runlocal"]
    return "-".join([path.stem, *extra])


def database_fingerprint(config) -> str:
    """A hash of what the database depends on (database.path excluded)."""
    sections = {name: config[name].to_dict() for name in DB_SECTIONS}
    sections["database"].pop("path", None)
    text = json.dumps(sections, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def plan_runs(specs: list[str], root: Path, overrides: list[str], num_devices: int | None
              ) -> list[SweepRun]:
    """Load every experiment, give it a workdir and a shared database; baselines first."""
    runs, seen = [], {}
    for spec in specs:
        name = run_name(spec)
        if name in seen:
            raise ConfigError(f"sweep: experiments {seen[name]!r} and {spec!r} both map to run "
                              f"directory {name!r}; give them different file names")
        seen[name] = spec
        config = load_config(spec, overrides, num_devices=num_devices)
        if not config.database.path:
            config.database.path = str(root / f"db-{database_fingerprint(config)}")
        runs.append(SweepRun(name, spec, config, root / name))
    runs.sort(key=lambda r: (bool(r.config.model.retrieval), bool(r.config.train.retrofit)))
    baseline = next((r for r in runs if not r.config.model.retrieval), None)
    for run in runs:
        if run.config.train.retrofit and not run.config.train.init_from:
            if baseline is None:
                raise ConfigError(
                    f"sweep: {run.spec} retrofits (train.retrofit=True) but sets no "
                    "train.init_from and the sweep has no baseline experiment "
                    "(model.retrieval=False) to start from; add one, e.g. "
                    "experiments/ablations/retrieval_off.py")
            run.config.train.init_from = str(baseline.workdir / "checkpoints")
    return runs


def _eval_modes(config) -> list[str]:
    return ["on", "off"] if config.model.retrieval else ["on"]


def _is_finished(run: SweepRun) -> bool:
    from retro_jax.evaluate.results import eval_mode, result_path
    from retro_jax.evaluate.runner import latest_step

    step = latest_step(run.workdir)
    if step is None or step < run.config.train.num_steps:
        return False
    ckpt = run.workdir / "checkpoints" / str(step)
    split = run.config.eval.split
    for retrieval in _eval_modes(run.config):
        path = result_path(run.workdir, split, eval_mode(bool(run.config.model.retrieval),
                                                          retrieval))
        if not path.is_file() or (ckpt.exists() and path.stat().st_mtime < ckpt.stat().st_mtime):
            return False
    return True


def execute(run: SweepRun) -> None:
    """Build (or reuse) the database, train (or resume), evaluate ON/OFF with leakage curves."""
    from retro_jax.build_db import build_run_database
    from retro_jax.evaluate.runner import evaluate_run
    from retro_jax.train.loop import train

    build_run_database(run.config, run.config.database.path)
    if train(run.config, run.workdir).get("preempted"):
        raise Preempted(f"{run.name} stopped by a signal; rerun the sweep to resume")
    for retrieval in _eval_modes(run.config):
        evaluate_run(run.config, run.workdir, retrieval=retrieval, leakage=True)


def write_charts(runs: list[SweepRun], root: Path) -> list[Path]:
    """One bar chart per metric (ON and OFF side by side per experiment), plus loss curves."""
    from retro_jax.evaluate.results import eval_mode, result_path
    from retro_jax.train.plot import new_figure, save_figure

    by_metric: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        for retrieval in _eval_modes(run.config):
            mode = eval_mode(bool(run.config.model.retrieval), retrieval)
            path = result_path(run.workdir, run.config.eval.split, mode)
            if not path.is_file():
                continue
            record = json.loads(path.read_text())
            if record.get("value") is None:
                continue
            label = "off" if mode == "off" else "on"
            by_metric.setdefault(record["metric"], {}).setdefault(run.name, {})[label] = \
                float(record["value"])
    written = []
    for metric, values in by_metric.items():
        names = list(values)
        _, fig, ax = new_figure(max(5, 0.9 * len(names) + 2), 4)
        width = 0.4
        for offset, label in ((-width / 2, "on"), (width / 2, "off")):
            xs = [i + offset for i, n in enumerate(names) if label in values[n]]
            ys = [values[n][label] for n in names if label in values[n]]
            if xs:
                ax.bar(xs, ys, width, label=f"retrieval {label}")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        low = min(v for row in values.values() for v in row.values())
        high = max(v for row in values.values() for v in row.values())
        ax.set_ylim(max(0.0, low - 0.1 * (high - low + 1e-9) - 0.05), high * 1.02 + 1e-9)
        written.append(save_figure(fig, ax, root / f"{metric}.png", ylabel=metric,
                                   title=f"{metric} ({runs[0].config.eval.split})",
                                   grid=False))
    try:
        from retro_jax.train.plot import plot_runs

        loss_png = plot_runs([r.workdir for r in runs if (r.workdir / "metrics.jsonl").exists()],
                             root / "loss.png", metric="loss")
        if loss_png:
            written.append(Path(loss_png))
    except (ImportError, ValueError) as e:  # no run has metrics yet
        log.warning("no loss curves: %s", e)
    return written


def sweep(specs: list[str], root: Path, *, overrides: list[str] = (),
          num_devices: int | None = None) -> list[SweepRun]:
    """Run every experiment of the sweep (skipping finished ones), then the table and charts."""
    from retro_jax.evaluate.report import build_report

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(list(specs), root, list(overrides), num_devices)
    for i, run in enumerate(runs, 1):
        log.info("sweep [%d/%d] %s -> %s", i, len(runs), run.spec, run.workdir)
        if _is_finished(run):
            run.status = "skipped"
            log.info("sweep: %s is finished; skipping", run.name)
            continue
        try:
            execute(run)
            run.status = "done"
        except Preempted as e:
            log.warning("%s", e)
            run.status = "interrupted"
            break
        except Exception as e:  # noqa: BLE001 - one failing ablation must not stop the others
            run.status, run.error = "failed", f"{type(e).__name__}: {e}"
            log.error("sweep: %s failed: %s\n%s", run.name, run.error, traceback.format_exc())
    finished = [r.workdir for r in runs if r.status != "failed"]
    table = build_report(finished) if finished else "(no finished runs)\n"
    lines = ["# Sweep results", "", table, "", "| run | experiment | status |", "|---|---|---|"]
    lines += [f"| {r.name} | `{r.spec}` | {r.status}{': ' + r.error if r.error else ''} |"
              for r in runs]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    charts = write_charts(runs, root)
    log.info("wrote %s and %s", root / "results.md", ", ".join(str(c) for c in charts))
    return runs


def run_sweep(args) -> int:
    import jax

    runs = sweep(args.experiments, args.workdir, overrides=args.overrides,
                 num_devices=jax.device_count())
    print((Path(args.workdir) / "results.md").read_text())
    return 1 if any(r.status == "failed" for r in runs) else 0
