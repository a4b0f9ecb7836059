"""omnidiff: a distributed training platform for any-to-any multimodal masked-diffusion models."""

__version__ = "0.1.0"
