"""Vocabulary, tokenizers, task sequences, packing, shards, DALI pipelines and demo data."""
