"""`retro-jax plot W... --out loss.png [--metric loss]`: curves of one or several runs.

Reads each run's `metrics.jsonl` (the last record of each step, so resumed runs plot once)
and draws the metric against the step with matplotlib's Agg backend (no display needed).
The legend names each run by its config `name` (from `<W>/config.json`) or its directory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from retro_jax.train.metrics import read_metrics

log = logging.getLogger(__name__)


def run_label(workdir: Path) -> str:
    """The run's config name, or its directory name."""
    path = Path(workdir) / "config.json"
    try:
        name = json.loads(path.read_text()).get("name")
    except (OSError, ValueError):
        name = None
    return f"{name} ({Path(workdir).name})" if name and name != Path(workdir).name \
        else Path(workdir).name


def new_figure(width: float, height: float):
    """(matplotlib.pyplot, figure, axes) on the Agg backend (the CLI and tests write files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    return plt, fig, ax


def save_figure(fig, ax, out: str | Path, *, xlabel: str | None = None,
                ylabel: str | None = None, title: str | None = None, grid: bool = True) -> Path:
    """Label, grid and legend (when there are labelled artists) the axes, write `out` (its
    directory created), close the figure; returns the path."""
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if grid:
        ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


# Metric groups `--metric` accepts besides single metrics: a prefix of metrics.jsonl keys.
METRIC_GROUPS = {
    "diagnostics": "diag_loss_",  # loss with retrieved / no / random / oracle neighbours
    "cca": "diag_cca_ratio_",  # per CCA layer: |CCA output| / |residual stream|
}


def expand_metric(metric: str, records: list[dict]) -> list[str]:
    """`loss` -> [loss]; `a,b` -> [a, b]; a METRIC_GROUPS name -> the keys it covers."""
    if metric in METRIC_GROUPS:
        prefix = METRIC_GROUPS[metric]
        return sorted({k for r in records for k in r if k.startswith(prefix)})
    return [m for m in metric.split(",") if m]


def plot_runs(workdirs: Sequence[Path], out: Path, metric: str = "loss",
              *, log_y: bool | None = None) -> Path:
    """Write a PNG of `metric` (one metric, several comma-separated, or a METRIC_GROUPS name)
    vs step for every run in `workdirs`; return its path."""
    plt, fig, ax = new_figure(7, 4.5)  # plt: closes the figure if nothing is plotted
    plotted = 0
    for workdir in workdirs:
        records = read_metrics(workdir)
        names = expand_metric(metric, records)
        for name in names:
            rows = [r for r in records if name in r]
            if not rows:
                log.warning("%s: no %r in metrics.jsonl", workdir, name)
                continue
            label = run_label(workdir) + (f" {name}" if len(names) > 1 else "")
            ax.plot([r["step"] for r in rows], [r[name] for r in rows], label=label,
                    marker="o" if len(rows) < 30 else None, markersize=3)
            plotted += 1
    if not plotted:
        plt.close(fig)
        available = sorted({k for w in workdirs for r in read_metrics(w) for k in r} - {"step"})
        raise ValueError(f"no run has metric {metric!r}; available: {', '.join(available)}")
    if log_y is None:
        log_y = metric in ("perplexity", "eval_perplexity", "lr")
    if log_y:
        ax.set_yscale("log")
    return save_figure(fig, ax, out, xlabel="step", ylabel=metric)


def run_plot(args) -> int:
    """CLI entry: `retro-jax plot W... --out x.png [--metric loss]`."""
    from retro_jax.configs import ConfigError

    try:
        out = plot_runs(args.workdirs, args.out, args.metric)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    print(out)
    return 0
