"""`ReadStats`: what a corpus pass yielded and what it skipped, by reason and by file.

Readers never drop input silently: a document that cannot be used (empty, undecodable,
not JSON, no text field, ...) is either a `DataError` (when the input as a whole is
broken) or a skip recorded here with its reason and location, logged, and reported by
`summary()` and in the database manifest (`to_dict()`).
"""

from __future__ import annotations

import collections
import logging

log = logging.getLogger(__name__)

# Skip reasons (the document is not yielded).
EMPTY = "empty"  # no non-whitespace text
INVALID_UTF8 = "invalid_utf8"  # bytes that are not UTF-8
INVALID_JSON = "invalid_json"  # a JSONL line that does not parse
NOT_AN_OBJECT = "not_an_object"  # a JSONL line that parses to something other than an object
MISSING_TEXT = "missing_text_field"  # the text field is absent or not a string
BLANK_LINE = "blank_line"  # a whitespace-only line inside a JSONL file

# Notes (the document is yielded, with a fallback value).
MISSING_TITLE = "missing_title_field"  # jsonl/tfds: title field absent; the id is the title
MISSING_SUBSET = "missing_pile_set_name"  # pile: no meta.pile_set_name; source is "unknown"

MAX_EXAMPLES = 5  # locations kept (and logged at INFO) per split and reason


class ReadStats:
    """Counts per split: documents yielded, skips by reason and by file, notes by reason.

    Each skipped record is attributed to exactly one split (the split it would have
    belonged to, or, when that cannot be known, the split its location hashes to), so
    totals over splits count every bad record once.
    """

    def __init__(self) -> None:
        self._documents: dict[str, int] = {}
        self._complete: dict[str, bool] = {}
        self._skips: dict[str, collections.Counter[tuple[str, str]]] = {}  # (reason, file)
        self._notes: dict[str, collections.Counter[str]] = {}
        self._examples: dict[str, dict[str, list[str]]] = {}

    # ------------------------------------------------------------------ recording
    def start_split(self, split: str) -> None:
        self._documents[split] = 0
        self._complete[split] = False
        self._skips[split] = collections.Counter()
        self._notes[split] = collections.Counter()
        self._examples[split] = {}

    def count_document(self, split: str) -> None:
        self._documents[split] += 1

    def finish_split(self, split: str, *, complete: bool = True) -> None:
        """End of a pass; `complete=False` when the `max_documents` cap stopped it."""
        self._complete[split] = complete
        # One warning per pass: the reasons with counts (examples: INFO, `summary()`).
        skipped = sum(self._skips[split].values())
        if skipped:
            reasons = "; ".join(f"{r}: {n}, e.g. {self._examples[split][r][0]}"
                                for r, n in self.skipped_by_reason(split).items())
            log.warning("corpus split %s: %d documents read, %d skipped (%s)", split,
                        self._documents[split], skipped, reasons)

    def skip(self, split: str, reason: str, file: str, line: int | None = None,
             detail: str = "") -> None:
        """Record that the record at `file`[:`line`] was skipped for `reason`."""
        self._skips.setdefault(split, collections.Counter())[(reason, file)] += 1
        location = file if line is None else f"{file}:{line}"
        examples = self._examples.setdefault(split, {}).setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(location)
            log.info("skipped %s (%s%s) while reading split %s", location, reason,
                        f": {detail}" if detail else "", split)
        else:
            log.debug("skipped %s (%s%s)", location, reason, f": {detail}" if detail else "")

    def note(self, split: str, reason: str) -> None:
        """Record a kept document that needed a fallback value (e.g. no title field)."""
        self._notes.setdefault(split, collections.Counter())[reason] += 1

    # ------------------------------------------------------------------ queries
    def documents(self, split: str) -> int:
        """Documents yielded by the latest pass over `split` (0 if never read)."""
        return self._documents.get(split, 0)

    def complete(self, split: str) -> bool:
        """Whether the latest pass over `split` read all of it (not cut by the cap or caller)."""
        return self._complete.get(split, False)

    def _splits(self, split: str | None) -> list[str]:
        return list(self._skips) if split is None else [split]

    def skipped(self, split: str | None = None, reason: str | None = None) -> int:
        """Number of skipped records, optionally for one split and/or one reason."""
        return sum(n for s in self._splits(split) for (r, _), n in self._skips.get(s, {}).items()
                   if reason is None or r == reason)

    def skipped_by_reason(self, split: str | None = None) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        for s in self._splits(split):
            for (reason, _), n in self._skips.get(s, {}).items():
                counts[reason] += n
        return dict(sorted(counts.items()))

    def skipped_by_file(self, split: str | None = None) -> dict[str, dict[str, int]]:
        """file -> reason -> count."""
        by_file: dict[str, dict[str, int]] = {}
        for s in self._splits(split):
            for (reason, file), n in self._skips.get(s, {}).items():
                by_file.setdefault(file, {}).setdefault(reason, 0)
                by_file[file][reason] += n
        return dict(sorted(by_file.items()))

    def examples(self, reason: str, split: str | None = None) -> list[str]:
        """The first few "file[:line]" locations skipped for `reason`."""
        return [loc for s in self._splits(split)
                for loc in self._examples.get(s, {}).get(reason, [])]

    def notes(self, split: str | None = None) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        for s in (list(self._notes) if split is None else [split]):
            counts.update(self._notes.get(s, {}))
        return dict(sorted(counts.items()))

    # ------------------------------------------------------------------ reports
    def to_dict(self) -> dict:
        """JSON-serialisable form for the database manifest."""
        return {
            split: {
                "documents": self._documents[split],
                "complete": self._complete[split],
                "skipped": self.skipped_by_reason(split),
                "skipped_examples": {r: list(ex) for r, ex in
                                     sorted(self._examples.get(split, {}).items())},
                "notes": self.notes(split),
            }
            for split in self._documents
        }

    def summary(self) -> str:
        """A few lines: per split read, documents, skips by reason with example locations."""
        if not self._documents:
            return "no split read yet"
        lines = []
        for split in self._documents:
            partial = "" if self._complete[split] else " (pass stopped before the end)"
            skipped = self.skipped(split)
            lines.append(f"{split}: {self._documents[split]} documents, {skipped} skipped"
                         f"{partial}")
            for reason, n in self.skipped_by_reason(split).items():
                examples = ", ".join(self._examples[split].get(reason, []))
                lines.append(f"  {reason}: {n} (e.g. {examples})")
            for reason, n in self.notes(split).items():
                lines.append(f"  note {reason}: {n} documents kept with a fallback value")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ReadStats({self.to_dict()})"
