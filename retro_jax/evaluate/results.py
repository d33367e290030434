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
# A RETRO model's evaluation modes: its retrieved neighbours (on), none (off), and the two
# diagnostics: random database chunks, and the oracle [C_u ; C_u+1] (evaluator.NEIGHBOUR_SOURCES).
RETRIEVAL_MODES = ("on", "off", "random", "oracle")
MODES = (*RETRIEVAL_MODES, "baseline", "knn-lm")
RESULT_FORMAT = 1


def eval_mode(model_retrieval: bool, retrieval: str = "on", knn_lm: bool = False) -> str:
    """The <mode> of a result file: knn-lm, baseline, or a RETRO model's RETRIEVAL_MODES."""
    if knn_lm:
        return "knn-lm"
    if not model_retrieval:
        return "baseline"
    if retrieval not in RETRIEVAL_MODES:
        raise ValueError(f"retrieval must be one of {RETRIEVAL_MODES}, found {retrieval!r}")
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




def run_corpus(workdir: str | Path, record: dict | None = None) -> str:
    """What a run read, for the report: corpus kind and path from its saved config.json.

    "wikitext103 /data/wikitext-103-raw", "stdlib (embedded)"; without a config.json, the
    result record's kind and "path unknown". When the result record or the run's database
    manifest names another kind, that is said too: a row must never carry the name of data
    it was not computed on.
    """
    record = record or {}
    evaluated = record.get("corpus")
    try:
        config = json.loads((Path(workdir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return f"{evaluated or '?'} (path unknown: no {Path(workdir) / 'config.json'})"
    corpus = config.get("corpus") or {}
    kind, path = corpus.get("kind", "?"), corpus.get("path", "")
    text = f"{kind} {path}" if path else f"{kind} (embedded)" if kind == "stdlib" else (
        f"{kind} (no path)")
    notes = []
    if evaluated and evaluated != kind:
        notes.append(f"evaluated with corpus.kind={evaluated}")
    db_path = (config.get("database") or {}).get("path") or str(Path(workdir) / "db")
    try:
        manifest = json.loads((Path(db_path) / "manifest.json").read_text())
        built = (manifest.get("corpus") or {}).get("kind")
    except (OSError, json.JSONDecodeError, AttributeError):
        built = None
    if built and built != kind:
        notes.append(f"database built from {built}")
    return text + (f" [{'; '.join(notes)}]" if notes else "")
