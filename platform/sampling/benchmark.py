"""Benchmark: masked-diffusion image generation vs left-to-right autoregressive decoding.

Times generating one image of 256 codes (REFERENCE §2: a 256 px generated image) for the same
text-to-image prompt and the same HF-class weights (random, ``small`` preset by default):

* the platform sampler (:func:`omnidiff.platform.sampling.generate`) with 16 and 64 steps: every
  step is one forward over the whole sequence (prompt + answer);
* BASELINE ONLY: greedy causal decoding with a KV cache, one token per forward after a causal
  prefill of the prompt. The platform's model is bidirectional, so this loop (attention made
  causal, cache kept per layer) exists only to time what an autoregressive model of the same
  size would spend; its tokens mean nothing.

Variants run interleaved (one repeat of each, then the next repeat) after one untimed warm-up
each; the speed-up over AR is taken within each repeat, whose variants ran back to back, and its
median printed (load on a shared machine drifts between repeats more than within one).

Then what the aim asks of this machine: a step's forward FLOPs (exact count, all positions
scored, as the sampler's forward does), the FLOP rate the sampler reached, the fastest fp32
matrix multiply measured here (the model's MLP shape and a 2048 square, best of 5), and the rate
``--target`` x over AR would need. A one-token AR step reads every weight for little arithmetic
(memory bound), a diffusion step multiplies the whole sequence (compute bound): where compute is
scarce relative to memory bandwidth, as on a CPU, few-step diffusion gains little.

Run: ``python -m omnidiff.platform.sampling.benchmark [--preset small] [--repeats 3]``.
(It lives with the sampler rather than in ``jobs/benchmarks``: it needs the sampler and the HF
class, which sit on the ``platform`` floor above ``jobs``.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from omnidiff.data.tokens.text import ByteTokenizer
from omnidiff.data.tokens.vocab import UnifiedVocab
from omnidiff.monitoring.flops import training_flops
from omnidiff.platform.config import ModelConfig
from omnidiff.platform.hf_convert import hf_config_from
from omnidiff.platform.hf_model import OmniDiffusionForMaskedDiffusion, _rotate_half, rotary_cos_sin
from omnidiff.platform.sampling.models import hf_logits_fn
from omnidiff.platform.sampling.sampler import SamplerConfig, generate
from omnidiff.platform.sampling.tasks import TaskPrompts

IMAGE_CODES = 256
CAPTION = "A red circle above a blue square on a white wall, photographed in soft daylight."


@torch.no_grad()
def autoregressive_decode(model: OmniDiffusionForMaskedDiffusion, prompt: torch.Tensor,
                          count: int) -> torch.Tensor:
    """BASELINE ONLY: greedy causal decoding of ``count`` tokens with a per-layer KV cache."""
    config, inner = model.config, model.model
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(inner.layers)
    ids, start, out = prompt[None], 0, []
    for _ in range(count):
        n = ids.shape[1]
        x = inner.embed_tokens(ids)
        cos, sin = rotary_cos_sin(torch.arange(start, start + n)[None], dim, config.rope_theta,
                                  x.dtype)
        for i, layer in enumerate(inner.layers):
            attn, h = layer.self_attn, layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, n, heads, dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, n, kv_heads, dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, n, kv_heads, dim).transpose(1, 2)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            if cache[i] is not None:
                k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
            cache[i] = (k, v)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1,
                                               enable_gqa=kv_heads != heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, n, heads * dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        ids = model.lm_head(inner.norm(x[:, -1:])).argmax(-1)
        out.append(ids[0])
        start += n
    return torch.cat(out)


def _time(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def matmul_rate(rows: int, inner: int, cols: int, repeats: int = 5) -> float:
    """FLOP/s of an fp32 ``[rows, inner] @ [inner, cols]`` multiply here, best of ``repeats``."""
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    a @ b  # warm-up
    return 2 * rows * inner * cols / min(_time(lambda: a @ b) for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=("tiny", "small"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--target", type=float, default=8.0, help="speed-up over AR aimed at")
    args = parser.parse_args(argv)

    tokenizer = ByteTokenizer()
    vocab = UnifiedVocab.from_text_tokenizer(tokenizer)
    shape = ModelConfig(preset=args.preset)
    torch.manual_seed(0)
    model = OmniDiffusionForMaskedDiffusion(hf_config_from(
        shape, vocab.padded_size(), mask_token_id=vocab.mask_id, pad_token_id=vocab.eos_id)).eval()
    request = TaskPrompts(vocab, tokenizer).text_to_image(CAPTION, IMAGE_CODES).request
    prefix = request.tokens[:request.start + 1]  # the prompt and <|begin_of_image|>
    logits_fn = hf_logits_fn(model)

    def diffusion(steps: int) -> Callable[[], object]:
        timed = replace(request, steps=steps)  # the task's default is one step per code
        return lambda: generate(logits_fn, [timed], SamplerConfig(), mask_id=vocab.mask_id,
                                vocab_size=vocab.size)

    variants = {"autoregressive + KV cache (baseline)":
                lambda: autoregressive_decode(model, prefix, IMAGE_CODES)}
    variants |= {f"diffusion, {s} steps": diffusion(s) for s in args.steps}
    print(f"preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters, vocabulary {vocab.padded_size()}, prompt {request.start} tokens, "
          f"{IMAGE_CODES} image codes, {torch.get_num_threads()} threads")
    for fn in variants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(_time(fn))
    baseline = next(iter(times.values()))
    for name, runs in times.items():
        # speed-up per repeat (the variants of a repeat ran back to back), then the median:
        # robust to load that drifts between repeats on a shared machine
        ratios = [ar / t for ar, t in zip(baseline, runs)]
        print(f"{name:<38} median {statistics.median(runs):7.2f} s "
              f"({', '.join(f'{t:.2f}' for t in runs)})  speed-up vs AR: median "
              f"{statistics.median(ratios):5.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})")

    length = len(request.tokens)
    step_flops = training_flops(shape, vocab.padded_size(), [length], length) // 3  # forward
    autoregressive = statistics.median(baseline)
    rate = max(matmul_rate(length, shape.hidden_size, shape.ffn_hidden_size),
               matmul_rate(2048, 2048, 2048))
    print(f"a diffusion step is {step_flops / 1e9:.1f} GFLOP ({length} tokens); fastest fp32 "
          f"matrix multiply measured here: {rate / 1e9:.0f} GFLOP/s")
    for steps in args.steps:
        flops = steps * step_flops
        reached = flops / statistics.median(times[f"diffusion, {steps} steps"])
        needed = flops * args.target / autoregressive
        print(f"diffusion, {steps} steps: reached {reached / 1e9:.0f} GFLOP/s; {args.target:g}x "
              f"over AR needs {needed / 1e9:.0f} GFLOP/s (all steps in "
              f"{autoregressive / args.target:.2f} s)")


if __name__ == "__main__":
    main()
