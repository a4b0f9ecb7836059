"""DALI media pipelines (reader, image and audio decode) and their plain references."""
