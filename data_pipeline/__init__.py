"""The data side of retro-jax, in the order data flows through it:

    corpora         documents {id, title, text, source} from corpus files
    text            SentencePiece tokenizer, 64-token chunks, dedup, word/byte counting
    retrieval       the Retriever interface: frozen BERT + ScaNN ("bert"), BM25 ("bm25")
    database        the retrieval database: layout, reader, writer, resumable build
    input_pipeline  tf.data: sequences with neighbours retrieved in-graph, device feed

A module imports only from packages above it in this list (and errors, fileio, progress,
resumable); nothing here imports retro_jax (tests/test_imports.py checks both).
"""
