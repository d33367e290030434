"""ScaNN index: one TF-op searcher per shard of chunk ids, fan-out and exact merge.

    params = IndexParams.for_size(len(shard_keys), **index_settings)  # config.index
    shard = build_shard(shard_keys, params, first_chunk=start)      # keys [n, d] float32
    check_recall(measure_recall(shard, shard_keys, held_out_queries), params)
    shard.save(db / "index" / "shard_00000")
    searcher = ShardedSearcher([ShardSearcher.load(dir, first) for dir, first in table])
    ids, dists = searcher.search_tf(queries, k)   # TF graph: int64 global ids, squared L2

Distances are squared L2, smaller is closer; missing neighbours are id -1, distance +inf.
"""

from data_pipeline.retrieval.scann.params import IndexParams
from data_pipeline.retrieval.scann.recall import (
    check_recall,
    exact_search,
    measure_recall,
    merged_recall,
    noisy_queries,
    recall_at_k,
    shard_recall_part,
)
from data_pipeline.retrieval.scann.shard import ShardSearcher, build_shard, pad_topk
from data_pipeline.retrieval.scann.sharded import ShardedSearcher, merge_topk

__all__ = [
    "IndexParams",
    "ShardSearcher",
    "ShardedSearcher",
    "build_shard",
    "check_recall",
    "exact_search",
    "measure_recall",
    "merge_topk",
    "merged_recall",
    "noisy_queries",
    "pad_topk",
    "recall_at_k",
    "shard_recall_part",
]
