"""Small corpora in every supported format, written into a test's tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import zstandard

WIKI_TRAIN = (
    " \n"
    " = Valkyria Chronicles III = \n"
    " \n"
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing game . \n"
    " \n"
    " = = Gameplay = = \n"
    " \n"
    " The game plays like its predecessors . \n"
    " \n"
    " = = = Sub section = = = \n"
    " Text . \n"
    " \n"
    " = Tower Building of the Little Rock Arsenal = \n"
    " \n"
    " The building is old . \n"
    " \n"
    " = E = mc² = \n"
    " Physics .\n"
)
WIKI_VALID = " \n = Robert Boulter = \n \n Robert Boulter is an English actor . \n \n"
WIKI_TEST = " \n = Homarus gammarus = \n \n Homarus gammarus is a lobster . \n"


def write_wikitext(root: Path, variant: str = "raw", *, skip: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", WIKI_TRAIN), ("valid", WIKI_VALID), ("test", WIKI_TEST)):
        if name != skip:
            (root / f"wiki.{name}.{variant}").write_text(text, encoding="utf-8")
    return root


def jsonl_bytes(records: list) -> bytes:
    """One line per record: dicts/lists become JSON, bytes are written as they are."""
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                    for r in records)


def write_zst(path: Path, data: bytes, frames: int = 1) -> Path:
    """`data` compressed as `frames` concatenated zstandard frames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    compressor = zstandard.ZstdCompressor()
    step = -(-len(data) // frames)
    path.write_bytes(b"".join(compressor.compress(data[i:i + step])
                              for i in range(0, len(data), step)))
    return path


def pile_record(text: str, subset: str = "Pile-CC") -> dict:
    return {"text": text, "meta": {"pile_set_name": subset}}


# train/01.jsonl: every kind of bad line, by line number.
PILE_BAD_LINES = [
    pile_record("good one", "Github"),        # 1
    b'{"text": "no closing brace"',           # 2 invalid_json
    {"meta": {"pile_set_name": "X"}},         # 3 missing_text_field
    b'{"text": "caf\xe9"}',                   # 4 invalid_utf8
    pile_record("   \n "),                    # 5 empty
    [1, 2],                                   # 6 not_an_object
    b"  ",                                    # 7 blank_line
    {"text": "no meta"},                      # 8 kept, source "unknown"
]


def write_pile_layout(root: Path) -> Path:
    """The Pile's layout: train/ (multi-frame .zst + plain .jsonl), val.jsonl.zst, test/."""
    train = [pile_record(f"train document {i}", "Pile-CC" if i % 2 else "ArXiv")
             for i in range(6)]
    write_zst(root / "train" / "00.jsonl.zst", jsonl_bytes(train), frames=3)
    (root / "train" / "01.jsonl").write_bytes(jsonl_bytes(PILE_BAD_LINES))
    write_zst(root / "val.jsonl.zst", jsonl_bytes([pile_record("validation doc", "PubMed")]))
    (root / "test").mkdir()
    (root / "test" / "test.jsonl").write_bytes(
        jsonl_bytes([pile_record("test doc 1", "Enron Emails"), pile_record("test doc 2")]))
    return root


def planted_text(rng, words: list[str], sentences: int) -> str:
    return " ".join(" ".join(rng.choice(words, size=int(rng.integers(6, 12)))) + " ."
                    for _ in range(sentences))


def write_planted_pile(root: Path, *, num_docs: int = 60, num_eval: int = 12,
                       sentences: int = 12, seed: int = 0) -> Path:
    """A Pile-layout corpus of random-word documents in which retrieval is the only way to
    predict: each train document also appears as a near-duplicate (the same text with its
    last sentence replaced) and each validation document is a near-duplicate of a train
    document. Without neighbours a model can only learn the word frequencies; with them it
    can copy the next chunk from the near-duplicate's continuation."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnop")
    words = sorted({"".join(rng.choice(letters, size=int(rng.integers(3, 7))))
                    for _ in range(400)})
    originals = [planted_text(rng, words, sentences) for _ in range(num_docs)]

    def near_duplicate(text: str) -> str:
        head = text.rsplit(" . ", 2)[0]
        return head + " . " + planted_text(rng, words, 1)

    train = []
    for text in originals:
        train += [pile_record(text), pile_record(near_duplicate(text))]
    order = rng.permutation(len(train))
    write_zst(root / "train" / "00.jsonl.zst", jsonl_bytes([train[i] for i in order]))
    val = [pile_record(near_duplicate(originals[i])) for i in range(num_eval)]
    write_zst(root / "val.jsonl.zst", jsonl_bytes(val))
    write_zst(root / "test.jsonl.zst", jsonl_bytes(val[:2]))
    return root
