"""Copy warm-up (`train.copy_warmup_steps`): the first training steps read synthetic copy
batches, so that the copy circuit forms on pure signal before real text; and copy mixing
(`train.copy_mix`): afterwards, a share of the rows of every batch stays synthetic, so that
the circuit survives while real text, where little can be copied, dominates the gradient.

Reading a neighbour means three things learnt together: chunked cross-attention must find the
neighbour token aligned with the position being predicted, the encoder must carry that token's
identity, and the decoder must turn it into a logit. On real text only a small share of
tokens can be copied, and the gradient towards that circuit is weak until all three exist, so
small models often never form it in a CPU budget (ON ~ OFF: docs/notes/retrieval_learning.md).
A copy batch makes copying the only way to lower the loss: every sequence is uniform random
tokens, and each chunk's k neighbours are [C_u ; C_{u+1}] of its own sequence, the paper's
neighbour format with the continuation perfectly aligned. No corpus text is read, so nothing
about the training or evaluation documents leaks; the steps count in train.num_steps, and the
real data starts at its step 0 after them. The baseline has no retrieval and no warm-up.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

FIRST_ID = 4  # ids below are padding and special pieces: never drawn


def copy_batch(step: int, *, seed: int, batch_size: int, seq_len: int, chunk_len: int,
               num_neighbours: int, vocab_size: int) -> dict[str, np.ndarray]:
    """The host batch of warm-up step `step` (seeded by (seed, step): resumes draw the same).

    Returns:
      inputs, targets int32 [batch_size, seq_len]; neighbours int32 [batch_size, seq_len /
      chunk_len, num_neighbours, 2 * chunk_len], every slot of chunk u = [C_u ; C_{u+1}].
    """
    rng = np.random.default_rng([int(seed), 0xC09, int(step)])
    m, n = chunk_len, seq_len
    tokens = rng.integers(FIRST_ID, vocab_size, (batch_size, n + m), dtype=np.int64)
    tokens = tokens.astype(np.int32)
    windows = np.stack([tokens[:, u * m:(u + 2) * m] for u in range(n // m)], axis=1)
    neighbours = np.repeat(windows[:, :, None], num_neighbours, axis=2)
    return {"inputs": tokens[:, :n], "targets": tokens[:, 1:n + 1], "neighbours": neighbours}


MIX_KEYS = ("inputs", "targets", "neighbours")  # what a copy row replaces in a real batch


def with_copy_warmup(real: Iterator[dict], *, start_step: int, warmup_steps: int,
                     rows: int, row_offset: int, mix: float = 0.0,
                     **batch_kwargs) -> Iterator[dict]:
    """Host batches of a run resuming at `start_step`: the warm-up's remaining copy batches,
    then `real` (which the caller started at step max(start_step - warmup_steps, 0)), whose
    first round(mix * rows) rows of every batch are replaced by copy rows.

    Args:
      rows, row_offset: this process's rows of every global copy batch (multi-host).
      mix: share of each real batch's rows that are copy rows (`train.copy_mix`).
      batch_kwargs: `copy_batch`'s keywords (batch_size is the global batch).
    """
    def local(step: int) -> dict:
        return {k: v[row_offset:row_offset + rows]
                for k, v in copy_batch(step, **batch_kwargs).items()}

    synthetic = (local(s) for s in range(start_step, warmup_steps))
    mixed_rows = int(round(mix * rows))
    if mixed_rows == 0:
        return itertools.chain(synthetic, real)

    def mixed():
        for step, batch in enumerate(real, start=max(start_step, warmup_steps)):
            copy = local(step)
            batch = dict(batch)
            for key in MIX_KEYS:
                batch[key] = np.concatenate([copy[key][:mixed_rows], batch[key][mixed_rows:]])
            yield batch

    return itertools.chain(synthetic, mixed())
