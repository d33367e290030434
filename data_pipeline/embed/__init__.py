"""Frozen BERT keys in Flax."""
