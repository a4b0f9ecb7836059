"""Token space: the unified vocabulary, text tokenizers, task sequences, packing and noising."""
