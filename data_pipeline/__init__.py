"""data_pipeline: corpora -> tokenizer -> chunks -> BERT keys -> ScaNN index -> tf.data batches."""
