"""The import graph: imports go one way, down the data flow, and never in a circle.

    data_pipeline:  corpora -> text -> retrieval -> database -> input_pipeline
                    (errors, fileio, progress, resumable, shards, beam_runner: shared by all)
    retro_jax:      configs -> models -> train -> evaluate -> sample -> commands
                    (build_db, demo, sweep, cli: the wiring that reads whole configs)

A module imports only from its own stage or stages above it; `data_pipeline` never imports
`retro_jax`; the model never imports the data pipeline (it gets plain arrays). Every import
counts, including the ones inside functions (a lazy import still couples the modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("data_pipeline", "retro_jax")
# Stage of each subpackage / top-level module: a module may import stages <= its own.
STAGES = {
    "data_pipeline": 0, "data_pipeline.errors": 0, "data_pipeline.fileio": 0,
    "data_pipeline.progress": 0, "data_pipeline.resumable": 0, "data_pipeline.shards": 0,
    "data_pipeline.beam_runner": 0,
    "data_pipeline.corpora": 1, "data_pipeline.text": 2, "data_pipeline.retrieval": 3,
    "data_pipeline.database": 4, "data_pipeline.input_pipeline": 5,
    "retro_jax": 10, "retro_jax.configs": 10, "retro_jax.models": 11, "retro_jax.train": 12,
    "retro_jax.evaluate": 13, "retro_jax.sample": 14,
    "retro_jax.build_db": 20, "retro_jax.demo": 20, "retro_jax.sweep": 20,
    "retro_jax.cli": 20, "retro_jax.__main__": 20,
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports (anywhere in the file)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from pkg import name`, the package.
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # The longest known module the target names (a.b.c -> a.b when c is a name).
            while target and target not in known:
                target = target.rpartition(".")[0]
            # A package is initialised before its modules: importing an ancestor is no edge.
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _stage(module: str) -> int:
    while module not in STAGES:
        module = module.rpartition(".")[0]
    return STAGES[module]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_stage():
    missing = [m for m in _modules() if not any(m == s or m.startswith(s + ".")
                                                for s in STAGES)]
    assert not missing, f"modules without a stage in tests/test_imports.py: {missing}"


def test_imports_go_down_the_data_flow():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            if module.startswith("data_pipeline") and target.startswith("retro_jax"):
                upward.append(f"{module} -> {target} (data_pipeline never imports retro_jax)")
            elif module.startswith("retro_jax.models") and target.startswith("data_pipeline"):
                upward.append(f"{module} -> {target} (the model gets plain arrays)")
            elif _stage(target) > _stage(module):
                upward.append(f"{module} (stage {_stage(module)}) -> {target} "
                              f"(stage {_stage(target)})")
    assert not upward, "imports against the data flow:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    # Tarjan's strongly connected components: a component of several modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
