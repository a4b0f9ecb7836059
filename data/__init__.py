"""The data path, by stage: ``media`` (shards, validation, DALI decode) -> ``tokenizers`` (image,
speech) -> ``tokens`` (vocabulary, text tokenizer, task sequences, packing, noising) ->
``streams`` (sources, mixtures, token shards, synthetic data, batches); ``demo`` builds the
demo dataset."""
