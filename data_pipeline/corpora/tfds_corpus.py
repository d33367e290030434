"""A TensorFlow Datasets dataset that is already prepared on disk (never downloaded).

`corpus.tfds_name` (e.g. "wikipedia/20230601.en", or "name/config:version") is opened from
`corpus.tfds_data_dir` ("" = TFDS's default data_dir, $TFDS_DATA_DIR or
~/tensorflow_datasets) with `tfds.builder(...).as_dataset(...)`, which is what
`tfds.load(name, data_dir=..., download=False)` does, in a deterministic order (file
shuffling off). A dataset that is unknown or not prepared there is a DataError saying how
to prepare it.

The text is the feature `corpus.text_field`; the title is `corpus.title_field` when set,
else the id "<name>/<tfds split>:<index>". Splits: `train`, `validation` (or `valid`,
`val`, `dev`) and `test` when the dataset has all three; otherwise (e.g. Wikipedia, train
only) the `train` split divided by sha256 of the title (`corpus.validation_percent` /
`corpus.test_percent`). Texts that are not UTF-8 or empty are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator

from data_pipeline.corpora import stats as reasons
from data_pipeline.corpora.base import SPLITS, Corpus, Document
from data_pipeline.corpora.split import check_split_percents, hash_split
from data_pipeline.errors import DataError

_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"),
                  "test": ("test",)}


class TfdsCorpus(Corpus):
    kind = "tfds"

    def __init__(self, name: str, *, data_dir: str = "", text_field: str = "text",
                 title_field: str = "", validation_percent: float = 1.0,
                 test_percent: float = 1.0, max_documents: int = -1) -> None:
        super().__init__(max_documents=max_documents)
        check_split_percents(validation_percent, test_percent)
        if not name:
            raise DataError("corpus.kind='tfds' needs corpus.tfds_name; fix: "
                            "--config.corpus.tfds_name=wikipedia/20230601.en")
        self.name, self.data_dir = name, data_dir
        self.text_field, self.title_field = text_field, title_field
        self.validation_percent, self.test_percent = validation_percent, test_percent
        self._builder = self._open_builder()
        available = list(self._builder.info.splits.keys())
        self.tfds_splits: dict[str, str] = {}
        for split, aliases in _SPLIT_ALIASES.items():
            match = next((a for a in aliases if a in available), None)
            if match is not None:
                self.tfds_splits[split] = match
        if "train" not in self.tfds_splits:
            raise DataError(f"tfds dataset {name!r} in {self._where()}: no 'train' split "
                            f"(found {available}); fix: choose a dataset with a train split")
        self.hash_split = len(self.tfds_splits) < len(SPLITS)
        features = self._builder.info.features
        for key, field in (("text_field", text_field), ("title_field", title_field)):
            if field and field not in features:
                raise DataError(f"tfds dataset {name!r}: corpus.{key}={field!r} is not one of its "
                                f"features {sorted(features.keys())}; fix: "
                                f"--config.corpus.{key}=<one of them>")

    def _where(self) -> str:
        return f"data_dir {self.data_dir!r}" if self.data_dir else "the default TFDS data_dir"

    def _open_builder(self):
        import tensorflow_datasets as tfds

        prepare = (f"fix: prepare it once where the network is reachable with `tfds build "
                   f"{self.name.split('/')[0]} --data_dir=DIR` (or "
                   f"tfds.builder(name, data_dir=DIR).download_and_prepare()), copy DIR here "
                   "and set --config.corpus.tfds_data_dir=DIR")
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir or None)
        except Exception as e:  # DatasetNotFoundError, bad config/version names, ...
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"tfds dataset {self.name!r} not found in {self._where()} "
                            f"({first_line}); {prepare}") from e
        if not builder.is_prepared():
            raise DataError(f"tfds dataset {self.name!r} is not prepared in {self._where()} "
                            f"(no {builder.data_path}); it is never downloaded at run time; "
                            f"{prepare}")
        return builder

    @property
    def description(self) -> str:
        rule = (f"split by sha256 of title over its train split: validation "
                f"{self.validation_percent}%, test {self.test_percent}%" if self.hash_split
                else f"splits {self.tfds_splits}")
        return (f"tfds {self.name} ({self._where()}, text feature {self.text_field!r}); "
                f"{rule}")

    def _iter_split(self, split: str) -> Iterator[Document]:
        import tensorflow_datasets as tfds

        tfds_split = "train" if self.hash_split else self.tfds_splits[split]
        fields = [f for f in (self.text_field, self.title_field) if f]
        dataset = self._builder.as_dataset(split=tfds_split, shuffle_files=False)
        # Only the needed features are decoded (a dataset may also hold images, ...).
        dataset = dataset.map(lambda ex: {f: ex[f] for f in fields})
        base = self.name.replace(":", "@")
        for index, example in enumerate(tfds.as_numpy(dataset)):
            doc_id = f"{base}/{tfds_split}:{index}"
            title = doc_id
            if self.title_field:
                value = _to_str(example[self.title_field])
                if value:
                    title = value
            if self.hash_split and hash_split(title, self.validation_percent,
                                              self.test_percent) != split:
                continue
            if self.title_field and title == doc_id:
                self.stats.note(split, reasons.MISSING_TITLE)
            try:
                text = _to_str(example[self.text_field], strict=True)
            except UnicodeDecodeError as e:
                self.stats.skip(split, reasons.INVALID_UTF8, f"{base}/{tfds_split}", index, str(e))
                continue
            if not text.strip():
                self.stats.skip(split, reasons.EMPTY, f"{base}/{tfds_split}", index)
                continue
            yield Document(doc_id, title, text, self.name.split("/")[0])


def _to_str(value, strict: bool = False) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "strict" if strict else "replace")
    return str(value)
