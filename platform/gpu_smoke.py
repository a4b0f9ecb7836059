"""Checks for the first GPU machine (driven by ``jobs/gpu_smoke.sh``), one subcommand each.

``versions`` prints the stack and exits 3 when no CUDA GPU is visible (the script then stops);
``backend`` asserts Transformer Engine picks a fused attention backend for packed THD at the
Dream-7B head shape; ``shape`` times one training step of two Dream-7B-shape layers at s = 3072
(masked head and attention included) and prints the peak memory.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

NO_GPU = 3
DREAM_2_LAYERS = ["model.preset=dream-7b", "model.num_layers=2", "data.seq_length=3072",
                  "data.micro_batch_size=1", "data.global_batch_size=1", "data.text_vocab_size=151667",
                  "parallel.precision=bf16", "parallel.transformer_engine=true",
                  "logging.progress_bar=false"]


def versions() -> int:
    for name in ("torch", "transformer_engine", "megatron.core", "deepspeed", "nvidia.dali",
                 "apex"):
        try:
            module = importlib.import_module(name)
            print(f"{name:20s} {getattr(module, '__version__', 'installed')}")
        except Exception as err:  # noqa: BLE001 - any import failure is the answer here
            print(f"{name:20s} unavailable ({type(err).__name__}: {err})")
    print(f"{'CUDA':20s} {torch.version.cuda}, {torch.cuda.device_count()} GPU(s) visible")
    if not torch.cuda.is_available():
        print("no CUDA GPU is visible: the remaining checks (gpu tests, TE attention backend, "
              "bf16 / TE / ZeRO / TP / PP / FP8 trainings, Dream-7B-shape timings) need one; "
              "stopping here.")
        return NO_GPU
    for index in range(torch.cuda.device_count()):
        print(f"GPU {index}: {torch.cuda.get_device_name(index)}")
    return 0


def _dream_step(attention_check: bool) -> None:
    from omnidiff.data.streams.batches import batch_stream, noised_micro_batches
    from omnidiff.data.streams.sources import build_sample_source
    from omnidiff.data.tokens.text import build_vocab
    from omnidiff.parallel import topology
    from omnidiff.parallel.engines import build_engine
    from omnidiff.platform.config import load_config
    from omnidiff.platform.objective import DiffusionObjective

    cfg = load_config(None, DREAM_2_LAYERS)
    dims = topology.initialize()
    vocab, text = build_vocab(cfg.data)
    engine = build_engine(cfg, dims, vocab.padded_size(), DiffusionObjective(cfg.diffusion))
    stream = batch_stream(build_sample_source(cfg.data, cfg.seed, vocab, text), cfg.data,
                          cfg.diffusion, vocab, cfg.seed)
    for step in range(3):
        batches = [b.to(dims.device) for b in
                   noised_micro_batches(stream, cfg.diffusion, vocab, cfg.seed, step, 1)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        result = engine.train_step(batches)
        torch.cuda.synchronize()
        print(f"step {step}: {time.perf_counter() - began:.3f} s, loss {result.loss:.3f}, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if attention_check:
        from transformer_engine.pytorch.attention.dot_product_attention import (
            dot_product_attention as dpa)

        chosen = dpa._attention_backends
        print(f"TE attention backends: {chosen}")
        if chosen.get("use_unfused_attention") or not (chosen.get("use_fused_attention")
                                                      or chosen.get("use_flash_attention")):
            raise SystemExit("TE chose unfused attention for packed THD: expected fused")
    topology.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("versions", "backend", "shape"))
    args = parser.parse_args()
    if args.check == "versions":
        return versions()
    _dream_step(attention_check=args.check == "backend")
    return 0


if __name__ == "__main__":
    sys.exit(main())
