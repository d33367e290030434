"""Every experiment file and the variants worth loading, as `--config` specs.

    experiments/paper/*.py      each size x {RETRO, baseline} x {full, runlocal}
    experiments/demo.py         every combination of its variants that validates
    experiments/ablations/*.py  full and runlocal
"""

from __future__ import annotations

import itertools
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.py") if p.name != "__init__.py")
PAPER = sorted((REPO / "experiments" / "paper").glob("[!_]*.py"))
DEMO_VARIANTS = ("runlocal", "baseline", "retrofit", "quick")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def paper_args(runlocal: bool | None = None) -> list[str]:
    """Every ':ARG' of a paper file: '' (172m RETRO), each size alone and with ',baseline',
    'baseline' alone; each with and without ',runlocal' (only one of them when asked)."""
    from retro_jax.configs.paper import SIZE_VARIANTS

    args = []
    for size, baseline in itertools.product(("", *SIZE_VARIANTS), (False, True)):
        for local in ((False, True) if runlocal is None else (runlocal,)):
            parts = [size] * bool(size) + ["baseline"] * baseline + ["runlocal"] * local
            args.append(",".join(parts))
    return args


def demo_args() -> list[str]:
    """Every combination of the demo's variants, less baseline+retrofit (retrofitting needs
    retrieval: validation refuses it, tested on its own)."""
    out = []
    for r in range(len(DEMO_VARIANTS) + 1):
        for combo in itertools.combinations(DEMO_VARIANTS, r):
            if not {"baseline", "retrofit"} <= set(combo):
                out.append(",".join(combo))
    return out


def specs(runlocal: bool | None = None) -> list[str]:
    """`path[:ARG]` of every experiment variant (relative paths), runlocal only/never if asked."""
    out = []
    for path in EXPERIMENTS:
        if path in PAPER:
            args = paper_args(runlocal)
        elif path.name == "demo.py" and path.parent.name == "experiments":
            args = [a for a in demo_args()
                    if runlocal is None or ("runlocal" in a.split(",")) == runlocal]
        else:
            args = {None: ["", "runlocal"], True: ["runlocal"], False: [""]}[runlocal]
        out += [rel(path) + (f":{a}" if a else "") for a in args]
    return out
