"""Search parameters of one index shard, resolved from the index settings and the shard's size.

The settings (a config's `index` section) leave the partitioning and re-ranking sizes at -1
("scale with the shard"): `IndexParams.for_size(num_chunks, **settings)` turns them into
numbers for a shard of `num_chunks` keys, so one config serves a 5k-chunk CPU demo and a
4M-chunk pod shard alike. Any value >= 1 is taken as given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# ScaNN's k-means drops partitions smaller than this; fewer leaves than n / this is pointless.
MIN_POINTS_PER_LEAF = 50
# Candidates re-scored exactly after asymmetric hashing, per wanted neighbour (reorder_k = -1).
REORDER_PER_NEIGHBOUR = 10
# Fewest leaves searched when scaled automatically (small trees need a larger share).
MIN_LEAVES_TO_SEARCH = 8
# num_leaves = LEAVES_PER_ROOT * sqrt(n); num_leaves_to_search = LEAVES_TO_SEARCH_PER_ROOT *
# sqrt(num_leaves) (see scaled_num_leaves / scaled_leaves_to_search for the measurements).
LEAVES_PER_ROOT = 1.0
LEAVES_TO_SEARCH_PER_ROOT = 3.0

def scaled_num_leaves(num_chunks: int) -> int:
    """About sqrt(n) partitions (ScaNN's rule of thumb), at least MIN_POINTS_PER_LEAF per leaf.

    Finer trees were not better at 5M keys with the default 250k training sample: 2 sqrt(n)
    = 4,472 leaves reached recall@10 0.933 scanning 225k keys, 2,236 leaves 0.941 scanning
    212k (benchmarks/retrieval.py --scale-sweep; at 1M, 2,000 leaves did beat 1,000).
    """
    wanted = round(LEAVES_PER_ROOT * math.sqrt(num_chunks))
    return max(1, min(wanted, num_chunks // MIN_POINTS_PER_LEAF))


def scaled_leaves_to_search(num_leaves: int) -> int:
    """Leaves scanned per query: LEAVES_TO_SEARCH_PER_ROOT * sqrt(num_leaves), at least
    MIN_LEAVES_TO_SEARCH.

    3 sqrt(num_leaves): 54 of 316 leaves at 100k keys, 95 of 1,000 at 1M, 142 of 2,236 at 5M
    (6.4% of the keys), where recall@10 on clustered 64-d keys was 0.999 / 0.993 / 0.965; the
    former 1.5 sqrt(num_leaves) fell to 0.916 at 5M. Re-ordering more than 100 candidates
    changed recall by < 0.002: recall is set by the leaves scanned. The keys scanned grow as
    n**0.75 (a fixed share of the leaves would give n), but a query's fixed part keeps the
    measured cost at n**0.42 from 100k to 5M (62 / 165 / 320 us, idle; README, "The ScaNN
    index"); past ~10M keys per shard the scan would dominate, and shards hold 4M by default.
    """
    wanted = max(MIN_LEAVES_TO_SEARCH, math.ceil(LEAVES_TO_SEARCH_PER_ROOT * math.sqrt(num_leaves)))
    return max(1, min(num_leaves, wanted))


def scann_quantization_threshold(threshold: float) -> float:
    """`anisotropic_quantization_threshold` as ScaNN takes it: <= 0 (plain AH) becomes nan,
    ScaNN's spelling of "off" (configs and JSON say 0: they cannot hold nan)."""
    return threshold if threshold > 0 else math.nan


def _threshold_or_zero(value: Any) -> float:
    """A stored threshold; nan / None (older files: "plain") become 0.0, which means the same
    and, unlike nan, compares equal to itself."""
    value = float("nan") if value is None else float(value)
    return value if value > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class IndexParams:
    """Resolved parameters of one shard's ScaNN searcher (no -1 left, except when brute force).

    num_neighbours: default k the searchers return per query.
    brute_force: exact scoring of every key (shards below `brute_force_below` keys).
    num_leaves / num_leaves_to_search: k-means partitions and how many a query scans.
    training_sample_size: keys sampled to train the partitions and the AH codebooks.
    dims_per_block: asymmetric-hashing block width (16 centres per block, 4 bits).
    anisotropic_quantization_threshold: ScaNN's score-aware AH loss (<= 0: plain AH). It is
        made for dot-product search; with squared L2 it gave the same recall at 2.7x the build
        time (benchmarks/retrieval.py, 1M keys), so 0 is the better setting here.
    reorder_k: AH candidates re-scored with exact float32 distances before the final top-k.
    recall_floor / recall_sample: build-time recall@10 check (see `check_recall`).
    """

    num_neighbours: int = 10
    brute_force_below: int = 20_000
    brute_force: bool = True
    num_leaves: int = -1
    num_leaves_to_search: int = -1
    training_sample_size: int = 250_000
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.0
    reorder_k: int = -1
    recall_floor: float = 0.9
    recall_sample: int = 1000

    @classmethod
    def for_size(cls, num_chunks: int, **overrides: Any) -> IndexParams:
        """Parameters for a shard of `num_chunks` keys; -1 values are scaled with the size."""
        if num_chunks < 1:
            raise ValueError(f"a shard needs at least one key, got num_chunks={num_chunks}")
        values = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = set(overrides) - set(values)
        if unknown:
            raise TypeError(f"unknown IndexParams fields: {sorted(unknown)}")
        values.update(overrides)
        k = int(values["num_neighbours"])
        brute_force = num_chunks < int(values["brute_force_below"])
        num_leaves = int(values["num_leaves"])
        to_search = int(values["num_leaves_to_search"])
        reorder_k = int(values["reorder_k"])
        if not brute_force:
            num_leaves = scaled_num_leaves(num_chunks) if num_leaves < 1 else num_leaves
            num_leaves = min(num_leaves, num_chunks)
            to_search = scaled_leaves_to_search(num_leaves) if to_search < 1 else to_search
            to_search = min(to_search, num_leaves)
            reorder_k = REORDER_PER_NEIGHBOUR * k if reorder_k < 1 else reorder_k
            reorder_k = max(reorder_k, k)
        values.update(
            num_neighbours=k, brute_force=brute_force, num_leaves=num_leaves,
            num_leaves_to_search=to_search, reorder_k=reorder_k,
            training_sample_size=min(int(values["training_sample_size"]), num_chunks),
            dims_per_block=int(values["dims_per_block"]),
            anisotropic_quantization_threshold=_threshold_or_zero(
                values["anisotropic_quantization_threshold"]),
            recall_floor=float(values["recall_floor"]), recall_sample=int(values["recall_sample"]),
            brute_force_below=int(values["brute_force_below"]),
        )
        return cls(**values)

    def replace(self, **changes: Any) -> IndexParams:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IndexParams:
        data = dict(data)
        data["anisotropic_quantization_threshold"] = _threshold_or_zero(
            data.get("anisotropic_quantization_threshold"))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})
