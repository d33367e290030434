"""The leakage-filtered evaluation plot: bpb against the overlap threshold alpha."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_leakage(results: Mapping[str, Sequence[dict | tuple[float, float | None]]],
                 out_png: str | Path, *, title: str = "Leakage-filtered evaluation") -> Path:
    """One line per model: bits per byte over the chunks with overlap r(C) <= alpha.

    Args:
      results: model name -> curve, each point {"alpha", "bpb"} (a `leakage_curve` entry) or
        (alpha, bpb); points with bpb None (no chunk at that alpha) are skipped.
      out_png: the file to write.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: the CLI and the tests write files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, curve in results.items():
        points = [(p["alpha"], p["bpb"]) if isinstance(p, Mapping) else tuple(p) for p in curve]
        points = sorted((float(a), float(b)) for a, b in points if b is not None)
        if not points:
            continue
        ax.plot([a * 100 for a, _ in points], [b for _, b in points], marker="o", label=name)
    ax.set_xlabel("max eval/train chunk overlap alpha (%)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
