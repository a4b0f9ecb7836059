"""Activation recomputation: same gradients, really recomputed, less saved, right config route."""

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_config import TransformerConfig

from omnidiff.kernels.attention import PackedSDPAttention
from omnidiff.parallel import topology
from omnidiff.parallel.launcher import spawn
from omnidiff.parallel.recompute import recompute_settings
from omnidiff.platform.config import load_config
from omnidiff.parallel.model import build_model, transformer_config

VOCAB, LAYERS = 300, 2


def _batch(seq=48):
    """Two packed samples and a padding tail, so the block-diagonal mask matters."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, seq), generator=gen)
    seg = torch.zeros(2, seq, dtype=torch.long)
    pos = torch.zeros(2, seq, dtype=torch.long)
    end = seq - 5
    for row, cut in enumerate((seq * 2 // 5, seq * 3 // 5)):
        seg[row, :cut], seg[row, cut:end] = 1, 2
        pos[row, :cut] = torch.arange(cut)
        pos[row, cut:end] = torch.arange(end - cut)
    return ids, pos, seg


def _model(mode, weights=None):
    cfg = load_config(None, [f"model.num_layers={LAYERS}", f"parallel.recompute={mode}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.parallel, VOCAB)
    if weights is not None:
        model.load_state_dict(weights)
    return model.train()


def _count_calls(model):
    """Forward calls of each MLP and each core attention (recomputation calls them again).

    Pre-hooks: torch's checkpoint stops a recomputation once it has every tensor backward
    needs, so a recomputed module may never reach its forward post-hooks.
    """
    counts = {"mlp": 0, "attention": 0}
    for module in model.modules():
        key = ("mlp" if isinstance(module, MLP)
               else "attention" if isinstance(module, PackedSDPAttention) else None)
        if key:
            module.register_forward_pre_hook(
                lambda *_, key=key: counts.__setitem__(key, counts[key] + 1))
    return counts


def _loss(model, batch):
    """Weights every vocabulary logit differently (this rank's shard of them under TP)."""
    logits = model.logits(model(*batch)).float()
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    probe = torch.linspace(-1.0, 1.0, VOCAB)[start:start + shard]
    return (logits * probe).sum() / logits.shape[0]


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_gradients(single_process, mode):
    batch = _batch()
    reference = _model("none")
    ref_loss = _loss(reference, batch)
    ref_loss.backward()

    model = _model(mode, reference.state_dict())
    counts = _count_calls(model)
    loss = _loss(model, batch)
    forward_counts = dict(counts)
    loss.backward()

    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-6, rtol=0,
                                   msg=f"{mode} recompute changed the gradient of {name}")
    # Backward re-ran exactly the recomputed part once per layer.
    assert forward_counts == {"mlp": LAYERS, "attention": LAYERS}
    expected = {"selective": {"mlp": LAYERS, "attention": 2 * LAYERS},
                "full": {"mlp": 2 * LAYERS, "attention": 2 * LAYERS}}[mode]
    assert counts == expected


def _saved_bytes(model, batch):
    """Bytes autograd keeps for backward outside recomputed regions."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(*batch)
    return total


def test_recompute_saves_less(single_process):
    batch = _batch(seq=64)
    weights = _model("none").state_dict()
    saved = {mode: _saved_bytes(_model(mode, weights), batch)
             for mode in ("none", "selective", "full")}
    assert saved["none"] > saved["selective"] > saved["full"]


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_eval_mode_does_not_recompute(single_process, mode):
    """Like megatron: recomputation is for training only, even when gradients are taken."""
    model = _model(mode).eval()
    counts = _count_calls(model)
    _loss(model, _batch()).backward()
    assert counts == {"mlp": LAYERS, "attention": LAYERS}


def test_config_routes_recompute_by_spec():
    cfg = load_config(None, ["parallel.recompute=full"])
    portable = transformer_config(cfg.model, cfg.parallel)
    # megatron's own recompute (CUDA RNG) stays off for the portable spec
    assert portable.recompute_granularity is None
    assert portable.portable_recompute == "full"
    # the TE spec (GPU) uses megatron's path; its keys pass megatron's own validation
    expected = {"none": (None, None), "selective": ("selective", ["core_attn"]),
                "full": ("full", None)}
    for mode, (granularity, modules) in expected.items():
        native = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                   **recompute_settings(mode, megatron_native=True))
        assert native.recompute_granularity == granularity
        if modules:
            assert native.recompute_modules == modules


def _tensor_parallel_worker(modes):
    """TP = 2: recomputation replays the TP collectives; gradients must not change."""
    topology.initialize(tp=2)
    try:
        batch = _batch(seq=32)
        grads = {}
        for mode in ("none", *modes):
            cfg = load_config(None, [f"model.num_layers={LAYERS}", "parallel.tensor_parallel=2",
                                     f"parallel.recompute={mode}"])
            torch.manual_seed(0)
            model = build_model(cfg.model, cfg.parallel, VOCAB).train()
            _loss(model, batch).backward()
            grads[mode] = {name: p.grad for name, p in model.named_parameters()}
        for mode in modes:
            for name, grad in grads[mode].items():
                torch.testing.assert_close(grad, grads["none"][name], atol=1e-6, rtol=0,
                                           msg=f"TP=2 {mode} recompute changed {name}")
    finally:
        topology.destroy()


@pytest.mark.slow
def test_recompute_under_tensor_parallelism():
    spawn(_tensor_parallel_worker, 2, ("selective", "full"))
