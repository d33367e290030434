"""The leakage-filtered evaluation plot: bpb against the overlap threshold alpha."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from retro_jax.train.plot import new_figure, save_figure


def plot_leakage(results: Mapping[str, Sequence[dict | tuple[float, float | None]]],
                 out_png: str | Path, *, title: str = "Leakage-filtered evaluation") -> Path:
    """One line per model: bits per byte over the chunks with overlap r(C) <= alpha.

    Args:
      results: model name -> curve, each point {"alpha", "bpb"} (a `leakage_curve` entry) or
        (alpha, bpb); points with bpb None (no chunk at that alpha) are skipped.
      out_png: the file to write.
    """
    _, fig, ax = new_figure(6, 4)
    for name, curve in results.items():
        points = [(p["alpha"], p["bpb"]) if isinstance(p, Mapping) else tuple(p) for p in curve]
        points = sorted((float(a), float(b)) for a, b in points if b is not None)
        if not points:
            continue
        ax.plot([a * 100 for a, _ in points], [b for _, b in points], marker="o", label=name)
    return save_figure(fig, ax, out_png, xlabel="max eval/train chunk overlap alpha (%)",
                       ylabel="bits per byte", title=title)
