"""File helpers shared by every stage: checksums and atomic JSON writes.

Checksums decide whether a resumed build can keep a file (data_pipeline/resumable.py)
and whether a database file is the one its manifest names; atomic writes mean a reader never
sees a torn manifest or marker.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dir_sha256(path: Path) -> str:
    """sha256 over a directory's relative file names and contents (sorted)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as sorted, indented JSON via a temp file and rename (no torn files)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
