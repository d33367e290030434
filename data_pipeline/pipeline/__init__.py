"""The tf.data input pipeline, one concept per module.

- `sequences`  which chunks make each example (packed / per document / eval windows) and the
               arithmetic order of examples per host and epoch (shuffle, sharding, resume).
- `tables`     the chunk arrays as tf.Variables, the per-batch example builder (inputs/targets).
- `retrieval`  in-graph ScaNN search, the same-document / excluded-document filter, and the
               [neighbour ; continuation] token gather.
- `precompute` neighbours written once to sharded TFRecord files and read back.
- `checks`     database / split / argument checks that fail before the first batch.
- `device`     per-host numpy batches -> global sharded jax.Arrays, prefetched.

`data_pipeline.input_pipeline` assembles them into `make_dataset` and `make_eval_windows`.
"""
