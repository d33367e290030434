"""Corpus readers: every format, the splits, the counts, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _corpora_fixtures import (
    PILE_BAD_LINES,
    WIKI_TRAIN,
    WIKI_VALID,
    jsonl_bytes,
    pile_record,
    write_pile_layout,
    write_wikitext,
    write_zst,
)

from data_pipeline.corpora import (
    SPLITS,
    Document,
    corpus_statistics,
    format_statistics,
    hash_split,
    open_corpus,
)
from data_pipeline.corpora.split import hash_position
from data_pipeline.errors import DataError
from data_pipeline.text import word_count
from retro_jax.configs import get_base_config


def _cfg(**values) -> dict:
    """The base config's corpus section with `values` set (open_corpus's keywords)."""
    cfg = get_base_config().corpus
    for key, value in values.items():
        cfg[key] = value
    return cfg.to_dict()


def _all(corpus) -> dict[str, list[Document]]:
    return {split: list(corpus.documents(split)) for split in SPLITS}


# ----------------------------------------------------------------------------- split helper
def test_hash_split_is_sha256_based_and_stable_across_processes():
    key = "asyncio/events.py"
    expected = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 * 100
    assert hash_position(key) == pytest.approx(expected)
    keys = [f"doc-{i}" for i in range(50)]
    here = [hash_split(k, 10.0, 10.0) for k in keys]
    code = ("import json,sys; from data_pipeline.corpora import hash_split; "
            "print(json.dumps([hash_split(k, 10.0, 10.0) for k in json.loads(sys.argv[1])]))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(keys)], env=env, check=True,
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert json.loads(out.stdout) == here
    assert set(here) == {"train", "validation", "test"}


def test_hash_split_shares_and_monotonic_growth():
    keys = [f"k{i}" for i in range(20_000)]
    splits = [hash_split(k, 5.0, 10.0) for k in keys]
    assert splits.count("test") / len(keys) == pytest.approx(0.10, abs=0.01)
    assert splits.count("validation") / len(keys) == pytest.approx(0.05, abs=0.01)
    # Raising the validation share only moves train documents into validation.
    wider = [hash_split(k, 8.0, 10.0) for k in keys]
    assert all(a == b or (a, b) == ("train", "validation") for a, b in zip(splits, wider))
    assert all(hash_split(k, 0.0, 0.0) == "train" for k in keys[:100])


@pytest.mark.parametrize("val,test", [(-1.0, 1.0), (60.0, 40.0)])
def test_bad_split_percents(tmp_path, val, test):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="validation_percent"):
        open_corpus(**_cfg(kind="textdir", path=str(tmp_path), validation_percent=val,
                         test_percent=test))


# ------------------------------------------------------------------------------- wikitext
@pytest.mark.parametrize("variant", ["raw", "tokens"])
def test_wikitext_articles(tmp_path, variant):
    corpus = open_corpus(**_cfg(kind="wikitext103", path=str(write_wikitext(tmp_path, variant)),
                              wikitext_variant=variant))
    docs = _all(corpus)
    train = docs["train"]
    assert [d.title for d in train] == ["Valkyria Chronicles III",
                                        "Tower Building of the Little Rock Arsenal", "E = mc²"]
    assert [d.id for d in train] == [f"wiki.train.{variant}:{n}" for n in (2, 13, 17)]
    assert {d.source for d in train} == {"wikitext103"}
    # Section headings stay inside their article; text is kept byte-for-byte.
    assert " = = Gameplay = = \n" in train[0].text
    assert train[0].text.startswith(" \n = Valkyria Chronicles III = \n")
    assert "".join(d.text for d in train) == WIKI_TRAIN
    assert sum(word_count(d.text) for d in train) == word_count(WIKI_TRAIN)
    assert [d.text for d in docs["validation"]] == [WIKI_VALID]
    assert [d.title for d in docs["test"]] == ["Homarus gammarus"]
    assert "wikitext103" in corpus.description


def test_wikitext_missing_split_file(tmp_path):
    write_wikitext(tmp_path, "raw", skip="valid")
    with pytest.raises(DataError, match=r"wiki\.valid\.raw.*wikitext_variant"):
        open_corpus(**_cfg(kind="wikitext103", path=str(tmp_path)))
    # The .tokens files are there but the config asks for .raw: the message says so.
    write_wikitext(tmp_path / "tok", "tokens")
    with pytest.raises(DataError, match="wikitext_variant=tokens"):
        open_corpus(**_cfg(kind="wikitext103", path=str(tmp_path / "tok")))


def test_wikitext_bad_utf8_names_file_and_line(tmp_path):
    write_wikitext(tmp_path)
    (tmp_path / "wiki.valid.raw").write_bytes(b" \n = Title = \n caf\xe9 \n")
    corpus = open_corpus(**_cfg(kind="wikitext103", path=str(tmp_path)))
    with pytest.raises(DataError, match=r"wiki\.valid\.raw:3: not UTF-8"):
        list(corpus.documents("validation"))


def test_wikitext_not_a_wikitext_file(tmp_path):
    write_wikitext(tmp_path)
    (tmp_path / "wiki.test.raw").write_text("just some text\n")
    corpus = open_corpus(**_cfg(kind="wikitext103", path=str(tmp_path)))
    with pytest.raises(DataError, match=r"wiki\.test\.raw: no article heading"):
        list(corpus.documents("test"))


# ----------------------------------------------------------------------------------- pile
def test_pile_layout_sources_ids_and_skips(tmp_path):
    corpus = open_corpus(**_cfg(kind="pile", path=str(write_pile_layout(tmp_path))))
    docs = _all(corpus)
    train = docs["train"]
    # 6 documents from the 3-frame .zst, then the 2 good lines of 01.jsonl.
    assert [d.text for d in train[:6]] == [f"train document {i}" for i in range(6)]
    assert [d.id for d in train[:2]] == ["train/00.jsonl.zst:1", "train/00.jsonl.zst:2"]
    assert [d.source for d in train[:2]] == ["ArXiv", "Pile-CC"]
    assert [(d.id, d.source) for d in train[6:]] == [("train/01.jsonl:1", "Github"),
                                                     ("train/01.jsonl:8", "unknown")]
    assert [d.source for d in docs["validation"]] == ["PubMed"]
    assert [d.text for d in docs["test"]] == ["test doc 1", "test doc 2"]

    stats = corpus.stats
    assert stats.skipped_by_reason("train") == {
        "blank_line": 1, "empty": 1, "invalid_json": 1, "invalid_utf8": 1,
        "missing_text_field": 1, "not_an_object": 1}
    assert stats.examples("invalid_json") == ["train/01.jsonl:2"]
    assert stats.examples("missing_text_field") == ["train/01.jsonl:3"]
    assert stats.examples("invalid_utf8") == ["train/01.jsonl:4"]
    assert stats.skipped_by_file() == {"train/01.jsonl": stats.skipped_by_reason()}
    assert stats.notes("train") == {"missing_pile_set_name": 1}
    assert stats.documents("train") == 8 and stats.skipped() == len(PILE_BAD_LINES) - 2
    summary = stats.summary()
    assert "train: 8 documents, 6 skipped" in summary and "train/01.jsonl:2" in summary


def test_pile_partial_layout_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.jsonl").write_bytes(jsonl_bytes([pile_record("x")]))
    with pytest.raises(DataError, match="no validation, test split"):
        open_corpus(**_cfg(kind="pile", path=str(tmp_path)))
    write_pile_layout(tmp_path / "full")
    (tmp_path / "full" / "extra.jsonl").write_bytes(jsonl_bytes([pile_record("x")]))
    with pytest.raises(DataError, match=r"\['extra.jsonl'\] belong to no split"):
        open_corpus(**_cfg(kind="pile", path=str(tmp_path / "full")))


def test_pile_hash_split_and_single_file(tmp_path):
    records = [pile_record(f"doc {i}") for i in range(300)]
    write_zst(tmp_path / "shard.jsonl.zst", jsonl_bytes(records))
    cfg = _cfg(kind="pile", path=str(tmp_path), validation_percent=10.0, test_percent=10.0)
    docs = _all(open_corpus(**cfg))
    ids = [d.id for split in SPLITS for d in docs[split]]
    assert len(ids) == len(set(ids)) == 300
    assert all(hash_split(d.id, 10.0, 10.0) == s for s in SPLITS for d in docs[s])
    assert 15 <= len(docs["validation"]) <= 45 and 15 <= len(docs["test"]) <= 45
    # The same file given directly: same documents.
    single = _all(open_corpus(**_cfg(kind="pile", path=str(tmp_path / "shard.jsonl.zst"),
                                   validation_percent=10.0, test_percent=10.0)))
    assert single == docs


def test_truncated_zst_is_an_error(tmp_path):
    records = [pile_record(f"document number {i} " * 20) for i in range(2000)]
    path = write_zst(tmp_path / "cut.jsonl.zst", jsonl_bytes(records))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    corpus = open_corpus(**_cfg(kind="pile", path=str(tmp_path)))
    with pytest.raises(DataError, match=r"cut\.jsonl\.zst: truncated zstandard stream"):
        list(corpus.documents("train"))


def test_garbage_zst_is_an_error(tmp_path):
    (tmp_path / "bad.jsonl.zst").write_bytes(b"this is not zstd at all" * 10)
    corpus = open_corpus(**_cfg(kind="jsonl", path=str(tmp_path)))
    with pytest.raises(DataError, match=r"bad\.jsonl\.zst: not a valid zstandard stream"):
        list(corpus.documents("train"))


# ---------------------------------------------------------------------------------- jsonl
def test_jsonl_title_field_and_sources(tmp_path):
    records = [{"body": f"text {i}", "name": f"title {i % 50}"} for i in range(200)]
    records.append({"body": "untitled"})
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "part.jsonl").write_bytes(jsonl_bytes(records))
    write_zst(tmp_path / "z.jsonl.zst", jsonl_bytes([{"body": "zipped", "name": "zz"}]))
    corpus = open_corpus(**_cfg(kind="jsonl", path=str(tmp_path), text_field="body",
                              title_field="name", validation_percent=20.0, test_percent=20.0))
    docs = _all(corpus)
    everything = [d for s in SPLITS for d in docs[s]]
    assert len(everything) == 202
    # Records sharing a title land in one split.
    split_of_title = {}
    for split in SPLITS:
        for d in docs[split]:
            assert split_of_title.setdefault(d.title, split) == split
            assert hash_split(d.title, 20.0, 20.0) == split
    assert {d.source for d in everything} == {"sub/part", "z"}
    untitled = next(d for d in everything if d.text == "untitled")
    assert untitled.title == untitled.id == "sub/part.jsonl:201"
    assert sum(corpus.stats.notes(s).get("missing_title_field", 0) for s in SPLITS) == 1


def test_jsonl_bad_lines_counted_once(tmp_path):
    lines = [{"text": "ok"}, b"not json", {"title": "no text"}, {"text": 5}, b"\xff\xfe"]
    (tmp_path / "f.jsonl").write_bytes(jsonl_bytes(lines * 20))
    for title_field in ("", "title"):
        corpus = open_corpus(**_cfg(kind="jsonl", path=str(tmp_path / "f.jsonl"),
                                  title_field=title_field, validation_percent=30.0,
                                  test_percent=30.0))
        docs = _all(corpus)
        assert sum(len(v) for v in docs.values()) == 20
        # Every bad line is attributed to exactly one split.
        assert corpus.stats.skipped_by_reason() == {
            "invalid_json": 20, "invalid_utf8": 20, "missing_text_field": 40}
    assert any(e.startswith("f.jsonl:") for e in corpus.stats.examples("missing_text_field"))


def test_jsonl_lines_longer_than_a_read_block(tmp_path):
    long_text = "word " * 700_000  # 3.5 MB: spans several 1 MiB read blocks
    lines = [{"text": "short"}, {"text": long_text}, {"text": "after"}]
    (tmp_path / "long.jsonl").write_bytes(jsonl_bytes(lines))
    write_zst(tmp_path / "long2.jsonl.zst", jsonl_bytes(lines), frames=2)
    corpus = open_corpus(**_cfg(kind="jsonl", path=str(tmp_path), validation_percent=0.0,
                              test_percent=0.0))
    docs = list(corpus.documents("train"))
    assert [d.text for d in docs] == ["short", long_text, "after"] * 2
    assert [d.id for d in docs[:3]] == ["long.jsonl:1", "long.jsonl:2", "long.jsonl:3"]


def test_jsonl_path_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: expected a \.jsonl"):
        open_corpus(**_cfg(kind="jsonl", path=str(tmp_path / "notes.txt")))
    with pytest.raises(DataError, match="no \\*.jsonl"):
        open_corpus(**_cfg(kind="jsonl", path=str(tmp_path)))


# -------------------------------------------------------------------------------- textdir
def test_textdir_documents_and_skips(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b" / "c.md").write_text("# gamma\n\ntext\n")
    (tmp_path / "b" / "bin.dat").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / ".hidden").write_text("ignored")
    corpus = open_corpus(**_cfg(kind="textdir", path=str(tmp_path), validation_percent=0.0,
                              test_percent=0.0))
    train = list(corpus.documents("train"))
    assert [(d.id, d.title, d.source) for d in train] == [
        ("a.txt", "a.txt", "textdir"), ("b/c.md", "b/c.md", "textdir")]
    assert train[1].text == "# gamma\n\ntext\n"
    assert corpus.stats.skipped_by_reason("train") == {"empty": 1, "invalid_utf8": 1}
    assert corpus.stats.examples("invalid_utf8") == ["b/bin.dat"]
    assert list(corpus.documents("test")) == []


def test_textdir_path_errors(tmp_path):
    with pytest.raises(DataError, match="empty directory"):
        open_corpus(**_cfg(kind="textdir", path=str(tmp_path)))
    with pytest.raises(DataError, match=r"does not exist"):
        open_corpus(**_cfg(kind="textdir", path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match=r"needs corpus\.path"):
        open_corpus(**_cfg(kind="pile", path=""))


def test_config_errors():
    with pytest.raises(DataError, match="corpus.kind='nope'"):
        open_corpus("nope")
    with pytest.raises(DataError, match="max_documents"):
        open_corpus("stdlib", max_documents=-5)
    with pytest.raises(DataError, match="unknown split 'valid'"):
        open_corpus("stdlib").documents("valid")


# --------------------------------------------------------------------------------- stdlib
@pytest.fixture(scope="module")
def stdlib_docs():
    corpus = open_corpus(**_cfg(kind="stdlib"))
    return corpus, _all(corpus)


def test_stdlib_split_and_contents(stdlib_docs):
    corpus, docs = stdlib_docs
    total = sum(len(v) for v in docs.values())
    assert total > 1000
    for split, share in (("train", 0.98), ("validation", 0.01), ("test", 0.01)):
        assert len(docs[split]) / total == pytest.approx(share, abs=0.006)
        assert all(hash_split(d.title, 1.0, 1.0) == split for d in docs[split])
    everything = [d for s in SPLITS for d in docs[s]]
    ids = [d.id for d in everything]
    assert len(ids) == len(set(ids))
    assert not any(part in i for i in ids for part in
                   ("site-packages", "dist-packages", "__pycache__", "tokenizedata/",
                    "_sysconfigdata_", "pydoc_data/"))
    assert all(d.title.endswith(".py") for d in everything if d.source == "stdlib")
    assert any(d.title == "argparse.py" for d in everything)
    from pydoc_data.topics import topics
    pydoc = {d.title: d for d in everything if d.source == "pydoc"}
    assert set(pydoc) == set(topics)
    assert pydoc["assert"].id == "pydoc:assert" and pydoc["assert"].text == topics["assert"]
    # The few non-UTF-8 / empty files are counted, not silently dropped.
    assert corpus.stats.skipped_by_reason().keys() <= {"empty", "invalid_utf8"}


def test_stdlib_is_deterministic_and_capped(stdlib_docs):
    corpus, docs = stdlib_docs
    again = open_corpus(**_cfg(kind="stdlib"))
    assert [d.id for d in again.documents("validation")] == [d.id for d in docs["validation"]]
    capped = open_corpus(**_cfg(kind="stdlib", max_documents=5))
    first = list(capped.documents("train"))
    assert [d.id for d in first] == [d.id for d in docs["train"][:5]]
    assert capped.stats.documents("train") == 5 and not capped.stats.complete("train")


def test_corpus_statistics(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\n")
    (tmp_path / "b.txt").write_bytes(b"\xff")
    stats = corpus_statistics(**_cfg(kind="textdir", path=str(tmp_path),
                                   validation_percent=0.0, test_percent=0.0))
    assert stats["splits"]["train"] == {"documents": 1, "bytes": 7,
                                        "skipped": {"invalid_utf8": 1}}
    assert stats["splits"]["test"]["documents"] == 0
    assert stats["skipped_examples"]["train"] == {"invalid_utf8": ["b.txt"]}
    json.dumps(stats)
    assert "invalid_utf8 1" in format_statistics(stats)


# ----------------------------------------------------------------------------------- tfds
@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A 3-split TFDS dataset prepared on disk by the test itself (no network)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class RetroTinyCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "title": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._examples("train", 5), "validation": self._examples("val", 2),
                    "test": self._examples("test", 2)}

        def _generate_examples(self, *args):  # unused: _split_generators yields directly
            raise NotImplementedError

        def _examples(self, split, n):
            for i in range(n):
                text = "" if (split, i) == ("train", 4) else f"{split} text {i} é"
                yield f"{split}{i}", {"text": text, "title": f"{split} title {i}"}

    data_dir = tmp_path_factory.mktemp("tfds")
    builder = RetroTinyCorpus(data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return "retro_tiny_corpus", data_dir


def test_tfds_reader(tiny_tfds):
    name, data_dir = tiny_tfds
    corpus = open_corpus(**_cfg(kind="tfds", tfds_name=name, tfds_data_dir=str(data_dir),
                              title_field="title"))
    docs = _all(corpus)
    assert sorted(d.text for d in docs["train"]) == [f"train text {i} é" for i in range(4)]
    assert corpus.stats.skipped_by_reason("train") == {"empty": 1}
    assert sorted(d.title for d in docs["validation"]) == ["val title 0", "val title 1"]
    assert {d.source for d in docs["test"]} == {name}
    assert docs == _all(corpus)  # deterministic order
    assert docs["train"][0].id.startswith(f"{name}/train:")


def test_tfds_errors(tiny_tfds, tmp_path):
    name, data_dir = tiny_tfds
    with pytest.raises(DataError, match="not prepared"):
        open_corpus(**_cfg(kind="tfds", tfds_name=name, tfds_data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="no_such_dataset_xyz.*not found.*tfds build"):
        open_corpus(**_cfg(kind="tfds", tfds_name="no_such_dataset_xyz",
                         tfds_data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="text_field='body' is not one of its features"):
        open_corpus(**_cfg(kind="tfds", tfds_name=name, tfds_data_dir=str(data_dir),
                         text_field="body"))
