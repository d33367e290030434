"""Result files of `retro-jax eval`: names, writing, reading (no jax / tensorflow imports).

`<workdir>/eval/<split>-<mode>.json`, mode in MODES; written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
MODES = ("on", "off", "baseline", "knn-lm")
RESULT_FORMAT = 1


def eval_mode(model_retrieval: bool, retrieval: str = "on", knn_lm: bool = False) -> str:
    """The <mode> of a result file: knn-lm, baseline, on or off."""
    if knn_lm:
        return "knn-lm"
    if not model_retrieval:
        return "baseline"
    if retrieval not in ("on", "off"):
        raise ValueError(f"retrieval must be 'on' or 'off', found {retrieval!r}")
    return retrieval


def result_path(workdir: str | Path, split: str, mode: str) -> Path:
    return Path(workdir) / EVAL_DIR / f"{split}-{mode}.json"


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def collect_leakage_curves(workdirs, split: str | None = None) -> dict[str, list[dict]]:
    """{label: curve} of every result file with a leakage section under `workdirs`."""
    curves = {}
    for record in load_results(workdirs):
        if "leakage" not in record or (split and record.get("split") != split):
            continue
        label = f"{record.get('name', '?')} [{record.get('mode', '?').upper()}]"
        if split is None:
            label += f" {record.get('split')}"
        curves[label] = record["leakage"]["curve"]
    return curves


def load_results(workdirs) -> list[dict]:
    """Every `<workdir>/eval/*.json` result record, with `workdir` and `file` added."""
    records = []
    for workdir in workdirs:
        for path in sorted((Path(workdir) / EVAL_DIR).glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                log.warning("skipping %s: %s", path, e)
                continue
            if isinstance(record, dict) and "mode" in record and "overall" in record:
                record["workdir"], record["file"] = str(workdir), str(path)
                records.append(record)
    return records


