"""The deterministic hash split shared by every corpus without its own split files.

A document's split depends only on its key (its title), through sha256: the same on
every machine and every Python process (the built-in `hash()` is salted per process).
"""

from __future__ import annotations

import hashlib

from data_pipeline.errors import DataError

_SCALE = 100.0 / 2**64  # maps the first 8 digest bytes onto [0, 100)


def check_split_percents(validation_percent: float, test_percent: float) -> None:
    if not (validation_percent >= 0.0 and test_percent >= 0.0
            and validation_percent + test_percent < 100.0):
        raise DataError(
            f"corpus.validation_percent={validation_percent}, corpus.test_percent="
            f"{test_percent}: expected two shares >= 0 that sum to less than 100 (percent of "
            "documents); fix e.g. --config.corpus.validation_percent=1 "
            "--config.corpus.test_percent=1")


def hash_position(key: str) -> float:
    """Where `key` falls in [0, 100): the first 8 bytes of sha256(utf-8 key) as a percentage."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") * _SCALE


def hash_split(key: str, validation_percent: float, test_percent: float) -> str:
    """The split of the document keyed `key`.

    Positions [0, test) are test, [test, test + validation) validation, the rest train, so
    raising one share only moves train documents into it.
    """
    position = hash_position(key)
    if position < test_percent:
        return "test"
    if position < test_percent + validation_percent:
        return "validation"
    return "train"
