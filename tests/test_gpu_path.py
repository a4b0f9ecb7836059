"""The GPU path: Transformer Engine spec, FP8 recipes, apex kernels, and their clear errors.

The CPU part runs everywhere: the one-line errors when TE / FP8 / a GPU are missing, which spec
and which modules are selected, the FP8 keys megatron receives, the TE <-> portable parameter
names, and that megatron's FP8 amax group stays inside a pipeline stage. The ``gpu`` part
builds the TE spec, compares it with the portable spec on the same weights, runs each FP8
recipe the GPU supports against bf16, TE recompute, and apex against torch.

Tolerances (relative L2 error ``|a - b| / |b|`` of hidden states and of each gradient):
- TE vs portable, fp32: 5e-3 (different kernels, same math; allows TF32 GEMMs); bf16: hidden
  2e-2, grads 5e-2 (TE scales the norm in fp32 before one cast, the portable norm casts
  first; other GEMMs).
- TE recompute vs none, bf16: 5e-3 (replayed kernels; only the embedding's atomic bf16
  gradient accumulation may change order).
- FP8 (format ``hybrid``: E4M3 forward, E5M2 gradients) vs bf16, after three warm-up steps
  that fill the delayed-scaling amax history: hidden 0.1, gradients 0.25 (E4M3 rounds to
  2^-4 relative, E5M2 to 2^-3).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer

from omnidiff.kernels.attention import PackedSDPAttention
from omnidiff.kernels.rmsnorm import RMSNorm, reference_rms_norm
from omnidiff.parallel import gpu_stack, specs, topology
from omnidiff.parallel.optim import adamw
from omnidiff.parallel.resharding import to_portable_names, to_transformer_engine_names
from omnidiff.parallel.launcher import spawn
from omnidiff.parallel.recompute import RecomputedSelfAttention, RecomputedTransformerLayer
from omnidiff.parallel.specs import portable_spec, transformer_engine_layer_spec, transformer_engine_spec
from omnidiff.platform.cli import main as cli_main
from omnidiff.platform.config import ConfigError, load_config
from omnidiff.parallel.model import build_model, transformer_config
from omnidiff.parallel.optim import build_optimizer

RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
TE_MISSING = importlib.util.find_spec("transformer_engine") is None


# --- CPU: clear errors ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, request_text", [
    (["parallel.transformer_engine=true"], "parallel.transformer_engine=true"),
    *[(["parallel.transformer_engine=true", "parallel.fp8=hybrid",
        f"parallel.fp8_recipe={recipe}"], f"parallel.fp8=hybrid (fp8_recipe {recipe})")
      for recipe in RECIPES],
])
def test_missing_gpu_stack_is_one_clear_error(monkeypatch, overrides, request_text):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:  # MissingGPUStackError: the CLI's "error:" line
        transformer_config(cfg.model, cfg.parallel)
    message = str(err.value)
    assert isinstance(err.value, gpu_stack.MissingGPUStackError)
    assert "\n" not in message
    assert message.startswith(f"{request_text} needs a CUDA GPU")
    assert ("transformer-engine package (not installed" in message) == TE_MISSING


def test_error_names_only_what_is_missing(monkeypatch):
    cfg = load_config(None, ["parallel.transformer_engine=true", "parallel.fp8=e4m3",
                             "parallel.fp8_recipe=mxfp8"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_stack, "transformer_engine_problem", lambda: "not installed")
    with pytest.raises(gpu_stack.MissingGPUStackError,
                       match=r"^parallel.fp8=e4m3 \(fp8_recipe mxfp8\) needs the "
                             r"transformer-engine package \(not installed\)$"):
        gpu_stack.require_gpu_stack(cfg.parallel)

    reason = "Device compute capability 10.0 or higher required for MXFP8 execution."
    monkeypatch.setattr(gpu_stack, "transformer_engine_problem", lambda: None)
    monkeypatch.setattr(gpu_stack, "fp8_recipe_support", lambda recipe: (False, reason))
    with pytest.raises(gpu_stack.MissingGPUStackError) as err:
        gpu_stack.require_gpu_stack(cfg.parallel)
    assert str(err.value) == ("parallel.fp8=e4m3 (fp8_recipe mxfp8) needs FP8 support for it "
                              f"({reason})")

    monkeypatch.setattr(gpu_stack, "fp8_recipe_support", lambda recipe: (True, ""))
    gpu_stack.require_gpu_stack(cfg.parallel)  # everything present: no error


def test_block_spec_refuses_transformer_engine_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu_stack.MissingGPUStackError,
                       match="^the Transformer Engine spec needs a CUDA GPU"):
        transformer_engine_spec()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cli_prints_one_error_line(tmp_path, capsys):
    try:
        code = cli_main(["train", "parallel.transformer_engine=true", "schedule.train_steps=1",
                         f"output_dir={tmp_path}"])
    finally:
        topology.destroy()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert [line for line in err if line.startswith("error:")] == [err[-1]]
    assert err[-1].startswith("error: parallel.transformer_engine=true needs a CUDA GPU")


# --- CPU: what gets selected ------------------------------------------------------------------

def test_portable_spec_selection():
    spec = portable_spec().block(3)
    layer = spec.layer_specs[0].submodules
    assert len(spec.layer_specs) == 3
    assert spec.layer_specs[0].module is RecomputedTransformerLayer
    assert layer.self_attention.module is RecomputedSelfAttention
    assert layer.self_attention.submodules.core_attention is PackedSDPAttention
    assert layer.self_attention.params["attn_mask_type"] == AttnMaskType.no_mask
    norm = specs.ApexRMSNorm if gpu_stack.apex_extension_available(
        "fused_layer_norm_cuda") else RMSNorm
    assert layer.input_layernorm is norm and layer.pre_mlp_layernorm is norm
    assert spec.layer_norm is norm


def test_transformer_engine_spec_selection():
    import megatron.core.extensions.transformer_engine as te_ext

    spec = transformer_engine_layer_spec()
    layer = spec.submodules
    attention = layer.self_attention
    assert spec.module is TransformerLayer  # megatron's own recompute (TE checkpoint for FP8)
    assert attention.params["attn_mask_type"] == AttnMaskType.no_mask  # THD: TE padding, fused
    assert attention.submodules.linear_qkv is te_ext.TELayerNormColumnParallelLinear
    assert attention.submodules.core_attention is te_ext.TEDotProductAttention
    assert attention.submodules.linear_proj is te_ext.TERowParallelLinear
    assert layer.mlp.submodules.linear_fc1 is te_ext.TELayerNormColumnParallelLinear
    assert layer.mlp.submodules.linear_fc2 is te_ext.TERowParallelLinear
    # the pre-norms are fused into linear_qkv / linear_fc1
    assert layer.input_layernorm is IdentityOp and layer.pre_mlp_layernorm is IdentityOp


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_config_reaches_megatron(monkeypatch, recipe):
    monkeypatch.setattr("omnidiff.parallel.model.require_gpu_stack", lambda parallel: None)
    cfg = load_config(None, ["parallel.transformer_engine=true", "parallel.precision=bf16",
                             "parallel.fp8=hybrid", f"parallel.fp8_recipe={recipe}",
                             "parallel.fp8_amax_history_len=16", "parallel.recompute=full"])
    config = transformer_config(cfg.model, cfg.parallel)
    assert (config.fp8, config.fp8_recipe) == ("hybrid", recipe)
    assert (config.fp8_amax_history_len, config.fp8_amax_compute_algo) == (16, "max")
    assert config.disable_parameter_transpose_cache  # our engines never reset TE's weight cache
    assert config.recompute_granularity == "full" and config.portable_recompute == "none"
    assert config.bf16 and config.params_dtype == torch.bfloat16


@pytest.mark.parametrize("cuda, te", [(False, False), (True, False), (True, True)])
def test_cuda_fusions_are_chosen_where_megatron_supports_them(monkeypatch, cuda, te):
    """Fused SwiGLU on any CUDA run; fused RoPE only with Transformer Engine (megatron refuses
    the flag without it); neither on the CPU, where the suite runs the unfused reference."""
    monkeypatch.setattr("omnidiff.parallel.model.require_gpu_stack", lambda parallel: None)
    monkeypatch.setattr("omnidiff.parallel.model.transformer_engine_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    # megatron checks that TE's fused RoPE kernel exists: pretend it does (it is never called)
    monkeypatch.setattr("megatron.core.models.common.embeddings.rope_utils."
                        "fused_apply_rotary_pos_emb", lambda *args: None)
    cfg = load_config(None, [f"parallel.transformer_engine={str(te).lower()}"])
    config = transformer_config(cfg.model, cfg.parallel)
    assert (config.bias_activation_fusion, config.apply_rope_fusion) == (cuda, te)
    assert not config.gradient_accumulation_fusion  # DeepSpeed never creates main_grad


def test_optimizer_on_cpu_is_torch_adamw():
    cfg = load_config(None, ["model.num_layers=1"])
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, cfg.optimizer)
    assert type(optimizer) is torch.optim.AdamW
    assert not optimizer.defaults["fused"]


def test_parameter_names_between_specs():
    portable = {"decoder.layers.0.input_layernorm.weight": 1,
                "decoder.layers.0.self_attention.linear_qkv.weight": 2,
                "decoder.layers.0.pre_mlp_layernorm.weight": 3,
                "decoder.layers.0.mlp.linear_fc1.weight": 4,
                "decoder.final_layernorm.weight": 5}
    local_extra = {"decoder.layers.0.self_attention.linear_qkv._extra_state": None}
    te = to_transformer_engine_names({**portable, **local_extra})
    assert te == {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": 1,
                  "decoder.layers.0.self_attention.linear_qkv.weight": 2,
                  "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": 3,
                  "decoder.layers.0.mlp.linear_fc1.weight": 4,
                  "decoder.final_layernorm.weight": 5}
    fp8_meta = {"decoder.layers.0.self_attention.core_attention._extra_state": b"fp8"}
    assert to_portable_names({**te, **fp8_meta}) == portable


def _amax_group_worker(layouts):
    """megatron's FP8 amax group (what TransformerBlock's fp8_autocast reduces over)."""
    for tp, pp in layouts:
        dims = topology.initialize(tp=tp, pp=pp)
        try:
            cfg = load_config(None, [f"parallel.tensor_parallel={tp}",
                                     f"parallel.pipeline_parallel={pp}"])
            config = transformer_config(cfg.model, cfg.parallel)
            group = parallel_state.get_amax_reduction_group(
                with_context_parallel=True, tp_only_amax_red=config.tp_only_amax_red)
            ranks = torch.distributed.get_process_group_ranks(group)
            # TP fastest, then DP, then PP: stage k holds ranks [k * tp * dp, (k + 1) * tp * dp)
            width = dims.tp * dims.dp
            stage = torch.distributed.get_rank() // width
            assert sorted(ranks) == list(range(stage * width, (stage + 1) * width)), (tp, pp)
        finally:
            parallel_state.destroy_model_parallel()
    topology.destroy()


@pytest.mark.slow
def test_fp8_amax_group_stays_inside_a_pipeline_stage():
    """An amax all-reduce spanning stages would hang 1F1B (DeepSpeed #5760)."""
    spawn(_amax_group_worker, 2, ((1, 2), (2, 1)))


# --- GPU ----------------------------------------------------------------------------------------

GPU_SHAPE = ["model.preset=custom", "model.hidden_size=256", "model.num_layers=2",
             "model.num_attention_heads=4", "model.num_query_groups=2",
             "model.ffn_hidden_size=512", "model.rope_theta=10000"]  # FP8 GEMMs: multiples of 128
VOCAB, SEQ = 512, 128


@pytest.fixture(scope="module")
def gpu_process(single_process):
    yield single_process


def _requires_transformer_engine():
    problem = gpu_stack.transformer_engine_problem()
    if problem:
        pytest.skip(f"transformer-engine: {problem}")


def _gpu_model(precision_name, transformer_engine, extra=()):
    cfg = load_config(None, [*GPU_SHAPE, f"parallel.precision={precision_name}",
                             f"parallel.transformer_engine={str(transformer_engine).lower()}",
                             *extra])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.parallel, VOCAB).cuda().train()


def _gpu_batch():
    """Two rows, each two packed samples and a padding tail."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    seg = torch.zeros(2, SEQ, dtype=torch.long)
    pos = torch.zeros(2, SEQ, dtype=torch.long)
    for row, (cut, end) in enumerate(((50, 120), (70, 128))):
        seg[row, :cut], seg[row, cut:end] = 1, 2
        pos[row, :cut], pos[row, cut:end] = torch.arange(cut), torch.arange(end - cut)
    return ids.cuda(), pos.cuda(), seg.cuda()


def _forward_backward(model, batch):
    """Final hidden states and gradients (portable names) of a fixed projection of them."""
    model.zero_grad(set_to_none=True)
    hidden = model(*batch)
    probe = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3)).to(hidden)
    (hidden.float() * probe.float()).sum().backward()
    grads = {name: p.grad.float() for name, p in model.named_parameters()
             if p.grad is not None}  # the LM head is not part of this objective
    return hidden.detach().float(), to_portable_names(grads)


def _relative_error(value, reference):
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))


def _copy_parameters(source, target):
    with torch.no_grad():
        params = dict(target.named_parameters())
        for name, param in source.named_parameters():
            params[name].copy_(param)


@pytest.mark.gpu
@pytest.mark.parametrize("precision_name, hidden_tol, grad_tol",
                         [("fp32", 5e-3, 5e-3), ("bf16", 2e-2, 5e-2)])
def test_te_spec_matches_portable_spec(gpu_process, precision_name, hidden_tol, grad_tol):
    _requires_transformer_engine()
    portable = _gpu_model(precision_name, transformer_engine=False)
    te = _gpu_model(precision_name, transformer_engine=True)
    loaded = te.load_state_dict(to_transformer_engine_names(portable.state_dict()),
                                strict=False)
    assert not loaded.unexpected_keys
    assert all(key.endswith("._extra_state") for key in loaded.missing_keys)

    batch = _gpu_batch()
    ref_hidden, ref_grads = _forward_backward(portable, batch)
    hidden, grads = _forward_backward(te, batch)
    assert grads.keys() == ref_grads.keys()
    assert _relative_error(hidden, ref_hidden) < hidden_tol
    for name, grad in grads.items():
        assert _relative_error(grad, ref_grads[name]) < grad_tol, name


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_recipe_close_to_bf16(gpu_process, recipe):
    _requires_transformer_engine()
    supported, reason = gpu_stack.fp8_recipe_support(recipe)
    if not supported:
        pytest.skip(f"fp8_recipe {recipe}: {reason}")
    bf16 = _gpu_model("bf16", transformer_engine=True)
    fp8 = _gpu_model("bf16", transformer_engine=True,
                     extra=["parallel.fp8=hybrid", f"parallel.fp8_recipe={recipe}"])
    _copy_parameters(bf16, fp8)
    batch = _gpu_batch()
    for _ in range(3):  # fills the delayed-scaling amax history; harmless for the others
        _forward_backward(fp8, batch)
    ref_hidden, ref_grads = _forward_backward(bf16, batch)
    hidden, grads = _forward_backward(fp8, batch)
    assert torch.isfinite(hidden).all()
    assert _relative_error(hidden, ref_hidden) < 0.1
    for name, grad in grads.items():
        assert _relative_error(grad, ref_grads[name]) < 0.25, name


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_te_recompute_gives_the_same_gradients(gpu_process, mode):
    _requires_transformer_engine()
    reference = _gpu_model("bf16", transformer_engine=True)
    model = _gpu_model("bf16", transformer_engine=True, extra=[f"parallel.recompute={mode}"])
    _copy_parameters(reference, model)
    batch = _gpu_batch()
    _, ref_grads = _forward_backward(reference, batch)
    _, grads = _forward_backward(model, batch)
    for name, grad in grads.items():
        assert _relative_error(grad, ref_grads[name]) < 5e-3, name


@pytest.mark.gpu
def test_cuda_optimizer_is_fused():
    cfg = load_config(None, [])
    optimizer = build_optimizer(torch.nn.Linear(8, 8).cuda(), cfg.optimizer)
    if gpu_stack.apex_extension_available("amp_C"):
        from apex.optimizers import FusedAdam

        assert isinstance(optimizer, FusedAdam)
    else:
        assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]


@pytest.mark.gpu
def test_apex_fused_adam_matches_torch_adamw():
    if not gpu_stack.apex_extension_available("amp_C"):
        pytest.skip("apex with its CUDA extensions (amp_C) is not installed")
    torch.manual_seed(0)
    fused_model = torch.nn.Linear(64, 32).cuda()
    torch_model = torch.nn.Linear(64, 32).cuda()
    torch_model.load_state_dict(fused_model.state_dict())
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    groups = lambda m: [{"params": [m.weight], "weight_decay": 0.1},  # noqa: E731
                        {"params": [m.bias], "weight_decay": 0.0}]
    fused = adamw(groups(fused_model), **kwargs)
    reference = torch.optim.AdamW(groups(torch_model), **kwargs)
    for step in range(5):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step)).cuda()
        for model, optimizer in ((fused_model, fused), (torch_model, reference)):
            optimizer.zero_grad()
            model(x).pow(2).mean().backward()
            optimizer.step()
    for fused_param, torch_param in zip(fused_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(fused_param, torch_param, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_apex_rms_norm_matches_reference(dtype, tol):
    if not gpu_stack.apex_extension_available("fused_layer_norm_cuda"):
        pytest.skip("apex with its CUDA extensions (fused_layer_norm_cuda) is not installed")
    cfg = load_config(None, [])
    config = transformer_config(cfg.model, cfg.parallel)
    norm = specs.ApexRMSNorm(config, 128, eps=1e-6).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 128))
    x = torch.randn(8, 3, 128, device="cuda", dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    weight_ref = norm.weight.detach().clone().requires_grad_()
    fused = norm(x)
    reference = reference_rms_norm(x_ref, weight_ref, 1e-6)
    fused.float().pow(2).sum().backward()
    reference.float().pow(2).sum().backward()
    assert _relative_error(fused.float(), reference.float()) < tol
    assert _relative_error(x.grad.float(), x_ref.grad.float()) < tol
    assert _relative_error(norm.weight.grad.float(), weight_ref.grad.float()) < tol
