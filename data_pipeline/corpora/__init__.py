"""Corpus readers: documents {id, title, text, source}, streamed."""
