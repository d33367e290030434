"""Token-level neighbour alignment (data.align_max_shift): the windows, the pipeline, sampling."""

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline.input_pipeline.neighbours import align_windows
from data_pipeline.input_pipeline.tables import ChunkTable
from tests._db_fixtures import make_tiny_database

M = 8


def _table():
    rng = np.random.default_rng(0)
    # Three documents of 4, 3 and 5 chunks; the last chunk of each padded at its end.
    tokens, doc_ids = [], []
    for doc, n in enumerate((4, 3, 5)):
        t = rng.integers(4, 50, size=(n, M)).astype(np.int32)
        t[-1, M - 3:] = 0
        tokens.append(t)
        doc_ids += [doc] * n
    return np.concatenate(tokens), np.asarray(doc_ids, np.int64)


def reference_windows(tokens, doc_ids, ids, query, max_shift):
    """Loop-by-loop reference: the document's text from chunk start + the best shift (most
    shared bigrams with the query at the same offsets, then smallest |s|, then s < 0), zeros
    outside the document or the chunks id-1 .. id+2."""
    n, m = tokens.shape
    out = np.zeros(ids.shape + (2 * m,), np.int32)
    for index in np.ndindex(ids.shape):
        c = ids[index]
        if c < 0:
            continue
        first = np.flatnonzero(doc_ids == doc_ids[c])
        text = tokens[first].reshape(-1)
        start = (c - first[0]) * m
        q = query[index[:-1]]
        best, best_key = 0, None
        for s in range(-max_shift, max_shift + 1):
            score = sum(1 for t in range(m - 1)
                        if start + s + t >= 0 and start + s + t + 1 < len(text) and q[t] != 0
                        and text[start + s + t] == q[t] and text[start + s + t + 1] == q[t + 1])
            key = (score, -abs(s), -int(s > 0))
            if best_key is None or key > best_key:
                best, best_key = s, key
        for i in range(2 * m):
            p = start + best + i
            if 0 <= p < len(text) and start - m <= p < start + 3 * m:
                out[index + (i,)] = text[p]
    return out


def test_align_windows_matches_the_reference_and_recovers_shifts():
    tokens, doc_ids = _table()
    table = ChunkTable(tokens, doc_ids, name="align_test")
    text = tokens[7:12].reshape(-1)  # document 2
    # Queries copied from document 2 at offsets that are not chunk boundaries.
    query = np.stack([text[3:3 + M], text[13:13 + M], tokens[0], np.zeros(M, np.int32)])
    ids = np.array([[7, 8], [9, 8], [5, -1], [0, 1]], np.int64)
    for max_shift in (M - 1, 3):
        stream = table.gather_stream(tf.constant(ids), before=1, after=2)
        got = align_windows(stream, tf.constant(query), M, max_shift).numpy()
        np.testing.assert_array_equal(got, reference_windows(tokens, doc_ids, ids, query,
                                                             max_shift))
    got = align_windows(table.gather_stream(tf.constant(ids), 1, 2), tf.constant(query), M,
                        M - 1).numpy()
    # Query 0 is document 2 from offset 3: the window starts there, so F is the text after it,
    # from chunk 7 (shift +3) and from chunk 8 (shift -5) alike.
    np.testing.assert_array_equal(got[0, 0], text[3:3 + 2 * M])
    np.testing.assert_array_equal(got[0, 1], text[3:3 + 2 * M])
    # No match (and the empty query): the paper's window [chunk ; continuation].
    np.testing.assert_array_equal(got[3, 0], tokens[0:2].reshape(-1))
    np.testing.assert_array_equal(got[2, 1], np.zeros(2 * M))  # missing neighbour


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    return make_tiny_database(tmp_path_factory.mktemp("aligndb"), num_docs=12, eval_docs=2)


def test_pipeline_and_sampling_feed_aligned_windows(tiny_db):
    from data_pipeline.input_pipeline import make_dataset, neighbour_windows

    m, shift = tiny_db.chunk_len, 5
    kwargs = dict(seq_len=4 * m, batch_size=4, num_neighbours=2, shuffle=False, repeat=False)
    plain = next(make_dataset(tiny_db, "train", **kwargs).as_numpy_iterator())
    aligned = next(make_dataset(tiny_db, "train", align_max_shift=shift,
                                **kwargs).as_numpy_iterator())
    np.testing.assert_array_equal(aligned["neighbour_ids"], plain["neighbour_ids"])
    train = tiny_db.split("train")
    query = aligned["inputs"].reshape(4, 4, m)  # C_u of every chunk
    want = reference_windows(np.asarray(train.tokens), np.asarray(train.doc_ids),
                             aligned["neighbour_ids"], query, shift)
    np.testing.assert_array_equal(aligned["neighbours"], want)
    assert not np.array_equal(aligned["neighbours"], plain["neighbours"])  # some shifted
    # Sampling's path gives the same windows.
    np.testing.assert_array_equal(
        neighbour_windows(tiny_db, aligned["neighbour_ids"], query, shift), want)
    np.testing.assert_array_equal(
        neighbour_windows(tiny_db, plain["neighbour_ids"], query, 0), plain["neighbours"])


def test_align_max_shift_is_validated():
    from retro_jax.configs import ConfigError
    from tests._train_fixtures import tiny_config

    assert tiny_config(**{"data.align_max_shift": 7}).data.align_max_shift == 7
    with pytest.raises(ConfigError, match="data.align_max_shift"):
        tiny_config(**{"data.align_max_shift": 8})
