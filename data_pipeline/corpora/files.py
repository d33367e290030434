"""File helpers shared by the readers: locating inputs, listing files, reading JSONL lines.

JSONL may be plain (`*.jsonl`) or zstandard-compressed (`*.jsonl.zst`, the Pile's format),
read as a stream in constant memory. A `.zst` file that ends inside a frame (an interrupted
download) or is not zstandard at all is a `DataError`: its tail is lost, so the counts
would be silently wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.corpora import stats as reasons
from data_pipeline.corpora.stats import ReadStats
from data_pipeline.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.zst")
_READ_BLOCK = 1 << 20


def existing_path(path: str, kind: str) -> Path:
    """`corpus.path` as a Path that exists, or a DataError saying what to set."""
    if not path:
        raise DataError(f"corpus.kind={kind!r} needs corpus.path (a file or directory); "
                        "fix: --config.corpus.path=/path/to/corpus")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(f"corpus.path {str(resolved)!r} (corpus.kind={kind!r}) does not exist; "
                        "fix: point --config.corpus.path at the corpus file or directory")
    return resolved


def walk_files(root: Path, keep=lambda rel: True, prune_dir=lambda rel: False) -> list[str]:
    """Relative posix paths of the files under `root`, sorted, hidden entries left out.

    `keep(rel)` selects files and `prune_dir(rel)` drops whole directories (not descended
    into, which matters for huge trees such as site-packages).
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and not prune_dir(rel_dir + d))
        found.extend(rel_dir + f for f in filenames
                     if not f.startswith(".") and keep(rel_dir + f))
    return sorted(found)


def is_jsonl(name: str) -> bool:
    return name.endswith(JSONL_SUFFIXES)


def jsonl_files(root: Path, kind: str) -> list[str]:
    """The JSONL files of a corpus directory (recursive, sorted); DataError when there are none."""
    files = walk_files(root, keep=is_jsonl)
    if not files:
        raise DataError(f"{root}: no *.jsonl or *.jsonl.zst files in this directory or below "
                        f"(corpus.kind={kind!r}); fix: point --config.corpus.path at the "
                        "directory (or file) holding the JSONL data")
    return files


def _zst_blocks(path: Path) -> Iterator[bytes]:
    """Decompressed blocks of a (possibly multi-frame) zstandard file."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    with open(path, "rb") as f:
        obj = decompressor.decompressobj()
        in_frame = False
        while block := f.read(_READ_BLOCK):
            while block:
                try:
                    out = obj.decompress(block)
                except zstandard.ZstdError as e:
                    raise DataError(f"{path}: not a valid zstandard stream ({e}); fix: "
                                    "re-download the file or re-compress it with `zstd`") from e
                in_frame = not obj.eof
                if out:
                    yield out
                # Data after the end of a frame starts the next frame.
                block = obj.unused_data if obj.eof else b""
                if obj.eof:
                    obj = decompressor.decompressobj()
        if in_frame:
            raise DataError(f"{path}: truncated zstandard stream (the file ends inside a frame, "
                            "so its last documents are lost); fix: re-download the file, "
                            "or check it with `zstd -t`")


def _raw_blocks(path: Path) -> Iterator[bytes]:
    if path.name.endswith(".zst"):
        yield from _zst_blocks(path)
        return
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            yield block


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without the newline) of a .jsonl / .jsonl.zst file.

    Lines are split on b"\\n" only: JSON strings may hold other Unicode line separators. A
    line longer than a read block is assembled from its parts once (no quadratic copying).
    """
    parts: list[bytes] = []  # the current line's pieces from earlier blocks
    line_no = 0
    for block in _raw_blocks(path):
        pieces = block.split(b"\n")
        if len(pieces) == 1:
            parts.append(block)
            continue
        parts.append(pieces[0])
        line_no += 1
        yield line_no, b"".join(parts)
        for piece in pieces[1:-1]:
            line_no += 1
            yield line_no, piece
        parts = [pieces[-1]] if pieces[-1] else []
    if parts:
        yield line_no + 1, b"".join(parts)


def parse_json_line(raw: bytes, split: str, file: str, line: int,
                    stats: ReadStats | None) -> dict | None:
    """The JSON object on one line, or None after recording why it was skipped.

    `stats=None` parses without recording: for a line whose skip belongs to another split.
    """
    def skip(reason: str, detail: str = "") -> None:
        if stats is not None:
            stats.skip(split, reason, file, line, detail)

    if not raw.strip():
        skip(reasons.BLANK_LINE)
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        skip(reasons.INVALID_UTF8, str(e))
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        skip(reasons.INVALID_JSON, str(e))
        return None
    if not isinstance(record, dict):
        skip(reasons.NOT_AN_OBJECT, type(record).__name__)
        return None
    return record


def record_text(record: dict, text_field: str, split: str, file: str, line: int,
                stats: ReadStats) -> str | None:
    """`record[text_field]` when it is a non-empty string, else None after recording a skip."""
    text = record.get(text_field)
    if not isinstance(text, str):
        found = "absent" if text_field not in record else f"a {type(text).__name__}"
        stats.skip(split, reasons.MISSING_TEXT, file, line,
                   f"field {text_field!r} is {found}; fields: {sorted(record)[:10]}")
        return None
    if not text.strip():
        stats.skip(split, reasons.EMPTY, file, line)
        return None
    return text


def read_text_file(path: Path, rel: str, split: str, stats: ReadStats) -> str | None:
    """A whole UTF-8 text file (newlines as stored), or None after recording a skip."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.skip(split, reasons.INVALID_UTF8, rel, None, str(e))
        return None
    if not text.strip():
        stats.skip(split, reasons.EMPTY, rel)
        return None
    return text
