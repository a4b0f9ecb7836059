"""Endless, resumable sample streams: sources, mixtures, token shards, synthetic data, batches."""
