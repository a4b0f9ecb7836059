"""Media on disk: WebDataset shards, their validation, DALI decoding and the media reader."""
