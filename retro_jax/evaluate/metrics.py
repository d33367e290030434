"""Language-modelling metrics: token perplexity, word perplexity, bits per UTF-8 byte.

All metrics are ratios of one total negative log-likelihood (in nats, summed over scored
target tokens) to a count of units of the original text:

- token perplexity  = exp(NLL / scored tokens)
- word perplexity   = exp(NLL / words of the original text)          (Wikitext103)
- bits per byte     = NLL / ln 2 / UTF-8 bytes of the original text   (Pile, C4, plain text)

Word and byte counts come from the database's documents table (`num_words`, `num_bytes`),
so they are properties of the text, not of the tokenizer: two models with different
tokenizers are compared on the same denominator. Only documents whose every token was
scored may enter such a ratio (a document cut by `eval.max_documents` or by the end of the
evaluated windows would count bytes whose NLL was never summed), which is what
`DocumentScores.summary` enforces through its `complete` argument.

Words and bytes are counted by one rule, `data_pipeline.text.counting` (Wikitext103's
convention for words: whitespace-separated words plus one end-of-line token per line).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

LN2 = math.log(2.0)


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(mean NLL per token); nan when nothing was scored."""
    if num_tokens <= 0:
        return float("nan")
    return float(math.exp(total_nll / num_tokens))


def word_perplexity(total_nll: float, num_words: int) -> float:
    """exp(total NLL / words of the original text) (Wikitext103's metric)."""
    if num_words <= 0:
        return float("nan")
    return float(math.exp(total_nll / num_words))


def bits_per_byte(total_nll: float, num_bytes: int) -> float:
    """Total NLL in nats / ln 2 / UTF-8 bytes of the original text."""
    if num_bytes <= 0:
        return float("nan")
    return float(total_nll / LN2 / num_bytes)


@dataclass
class Totals:
    """One row of results: the sums a metric is a ratio of."""

    nll: float = 0.0  # nats
    tokens: int = 0  # scored target tokens
    bytes: int = 0  # UTF-8 bytes of the complete documents
    words: int = 0  # Wikitext103 words of the complete documents
    documents: int = 0  # complete documents

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll, self.tokens)

    @property
    def word_perplexity(self) -> float:
        return word_perplexity(self.nll, self.words)

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nll, self.bytes)

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    def to_json(self) -> dict:
        return {
            "nll": self.nll, "tokens": self.tokens, "bytes": self.bytes, "words": self.words,
            "documents": self.documents, "nll_per_token": _finite(self.nll_per_token),
            "perplexity": _finite(self.perplexity),
            "word_perplexity": _finite(self.word_perplexity),
            "bits_per_byte": _finite(self.bits_per_byte),
        }


def _finite(x: float) -> float | None:
    # JSON has no NaN; None reads as "not measured".
    return None if (x is None or not math.isfinite(x)) else float(x)


@dataclass
class DocumentInfo:
    """What the metrics need of a document (a row of the database's documents table)."""

    num_bytes: int
    num_words: int
    source: str = ""


@dataclass
class DocumentScores:
    """Per-document sums of NLL and scored tokens, accumulated batch by batch.

    Sums are float64 on the host: a float32 sum over millions of tokens would lose digits.
    """

    nll: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)

    def add(self, doc_ids: np.ndarray, token_nll: np.ndarray, mask: np.ndarray,
            counts: np.ndarray | None = None) -> None:
        """Add one batch (each document's values summed in their order here).

        Args:
          doc_ids: int64 [...], the document of each target token (-1: none).
          token_nll: float [...], NLL of each target token in nats.
          mask: bool/int [...], which targets are scored.
          counts: int [...], how many tokens each entry stands for (default 1: one entry per
            token; the evaluator passes per-window sums and their token counts).
        """
        doc_ids = np.asarray(doc_ids).reshape(-1)
        token_nll = np.asarray(token_nll, dtype=np.float64).reshape(-1)
        mask = np.asarray(mask).reshape(-1).astype(bool) & (doc_ids >= 0)
        if not mask.any():
            return
        ids, inverse = np.unique(doc_ids[mask], return_inverse=True)
        nll_sums = np.bincount(inverse, weights=token_nll[mask], minlength=len(ids))
        if counts is None:
            counts = np.bincount(inverse, minlength=len(ids))
        else:
            weights = np.asarray(counts, np.int64).reshape(-1)[mask]
            counts = np.bincount(inverse, weights=weights, minlength=len(ids)).astype(np.int64)
        for doc, s, c in zip(ids.tolist(), nll_sums.tolist(), counts.tolist()):
            self.nll[doc] = self.nll.get(doc, 0.0) + s
            self.tokens[doc] = self.tokens.get(doc, 0) + c

    def summary(
        self,
        documents: Mapping[int, DocumentInfo],
        complete: Iterable[int] | None = None,
    ) -> tuple[Totals, dict[str, Totals]]:
        """(overall totals, totals per document source) over the complete documents.

        Args:
          documents: doc_id -> DocumentInfo for (at least) every scored document.
          complete: the documents scored in full; None = every scored document. Only these
            enter the sums, so NLL and the byte/word denominators cover the same text.
        """
        chosen = sorted(self.nll) if complete is None else sorted(set(complete) & set(self.nll))
        overall = Totals()
        by_source: dict[str, Totals] = {}
        for doc in chosen:
            info = documents.get(doc)
            if info is None:
                raise KeyError(f"document {doc} was scored but is not in the documents table")
            for row in (overall, by_source.setdefault(info.source or "", Totals())):
                row.nll += self.nll[doc]
                row.tokens += self.tokens[doc]
                row.bytes += int(info.num_bytes)
                row.words += int(info.num_words)
                row.documents += 1
        return overall, dict(sorted(by_source.items()))
