"""The one rule for counting words and bytes of text, used by the database's document table
and by every metric that divides a loss by units of the original text.

Words follow the WikiText-103 word-level perplexity convention:

    word_count(text) = len(text.split()) + number of lines

`text.split()` splits on runs of Unicode whitespace. The number of lines counts every
"\\n"-terminated line, empty lines included, plus one for a last line without "\\n" (an empty
string has none). The extra word per line is the end-of-line token `<eos>` that language
models on WikiText-103 predict at every line end, as in the preprocessing of Transformer-XL
(`line.strip().split() + ['<eos>']` for every line) and fairseq, whose per-word perplexities
the RETRO paper compares against: on wiki.test.tokens (4,358 lines) this gives the 245,569
words of Merity et al. Apply it to the `.tokens` variant for the standard figures: the `.raw`
files are not tokenised ("don't" vs "do n't", punctuation attached), so the same text counts
fewer words there.

Bytes are UTF-8 bytes (bits per byte, the Pile's metric).
"""

from __future__ import annotations


def word_count(text: str) -> int:
    """Words of `text` under the WikiText-103 convention (words plus one per line)."""
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return len(text.split()) + lines


def byte_count(text: str) -> int:
    """UTF-8 bytes of `text` (lone surrogates, which some readers keep, count as 3 bytes)."""
    return len(text.encode("utf-8", "surrogatepass"))
