"""Model shape presets (the ``model.preset`` key). ``dream-7b`` is the exact Dream-7B / Qwen2.5-7B shape (REFERENCE §1)."""

from __future__ import annotations

MODEL_PRESETS: dict[str, dict[str, object]] = {
    "dream-7b": {
        "hidden_size": 3584,
        "num_layers": 28,
        "num_attention_heads": 28,
        "num_query_groups": 4,
        "ffn_hidden_size": 18944,
        "rope_theta": 1_000_000.0,
        "norm_eps": 1e-6,
        "qkv_bias": True,
        "max_position_embeddings": 131_072,
    },
    # ~97M parameters besides the embeddings: a model that learns something on one GPU.
    "small": {
        "hidden_size": 768,
        "num_layers": 12,
        "num_attention_heads": 12,
        "num_query_groups": 4,
        "ffn_hidden_size": 2816,
    },
    # A few million parameters (mostly the embeddings): CPU tests and the demo curriculum.
    "tiny": {
        "hidden_size": 128,
        "num_layers": 4,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "ffn_hidden_size": 352,
        "rope_theta": 10_000.0,
        "init_std": 0.02,
    },
}
