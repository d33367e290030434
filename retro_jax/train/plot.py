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


def plot_runs(workdirs: Sequence[Path], out: Path, metric: str = "loss",
              *, log_y: bool | None = None) -> Path:
    """Write a PNG of `metric` vs step for every run in `workdirs`; return its path."""
    plt, fig, ax = new_figure(7, 4.5)  # plt: closes the figure if nothing is plotted
    plotted = 0
    for workdir in workdirs:
        rows = [r for r in read_metrics(workdir) if metric in r]
        if not rows:
            log.warning("%s: no %r in metrics.jsonl", workdir, metric)
            continue
        ax.plot([r["step"] for r in rows], [r[metric] for r in rows], label=run_label(workdir),
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
