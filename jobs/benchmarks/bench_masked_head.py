"""Peak memory and time of the masked LM head vs the full-logits reference (forward + backward).

Each variant runs in its own fresh subprocess (one after the other, never concurrently), so
neither inherits the other's allocator state. Memory is what the step adds on top of its
inputs: on GPU ``torch.cuda.max_memory_allocated`` minus the allocation after the inputs were
made; on CPU (no allocator statistics) the process's peak RSS (``VmHWM``) minus its RSS after
the warm-up steps, with their gradients freed (``monitoring.peaks.PeakMemory``). Nothing before
that point counts: the peak-RSS mark is reset there (proc(5) clear_refs), so the difference is
a steady-state step's own high-water mark, weight and hidden gradients included (a training
step keeps them), and first-iteration one-off costs (code paged in, library buffers) left out,
as the GPU allocator's statistics leave them out.

Run: ``python -m omnidiff.jobs.benchmarks.bench_masked_head`` (or this file directly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from omnidiff.kernels.masked_head import DEFAULT_CHUNK_SIZE, masked_lm_loss, reference_lm_loss
from omnidiff.monitoring.peaks import PeakMemory

VARIANTS = ("masked", "reference")
GIB = 2.0**30


def _make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Hidden states for all tokens, output-layer weight, labels with exactly half masked."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).mul_(0.5).to(device, dtype)
    weight = torch.randn(args.vocab, args.hidden, generator=gen).mul_(0.02).to(device, dtype)
    ids = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
    masked = torch.zeros(args.tokens, dtype=torch.bool)
    masked[torch.randperm(args.tokens, generator=gen)[: args.tokens // 2]] = True
    masked = masked.to(device)
    labels = torch.where(masked, ids, -100)
    # plain mean over the masked tokens of the micro-batch (the released recipe)
    token_weights = masked.float() / masked.sum()
    return hidden.requires_grad_(), weight.requires_grad_(), labels, masked, token_weights


def _step(variant: str, hidden, weight, labels, masked, token_weights, chunk_size: int) -> float:
    """One forward + backward from the full hidden states, as the model would run it."""
    hidden.grad = weight.grad = None
    if variant == "masked":
        loss = masked_lm_loss(hidden[masked], weight, labels[masked], token_weights[masked],
                              chunk_size=chunk_size)
    else:
        loss = reference_lm_loss(hidden, weight, labels, token_weights)
    loss.backward()
    return loss.item()


def run_worker(args: argparse.Namespace) -> dict:
    """Measure one variant in this (fresh) process; return its figures."""
    from omnidiff.parallel import topology

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    topology.initialize(tp=1)  # world of one: the loss goes through megatron's TP code path
    inputs = _make_inputs(args, device, dtype)
    for _ in range(args.warmup):  # one-off costs (code paged in, library buffers) stay out
        _step(args.worker, *inputs, args.chunk_size)
    inputs[0].grad = inputs[1].grad = None  # the measured steps make their gradients anew
    memory = PeakMemory(cuda)
    memory.start()
    times, cpu_times, loss = [], [], 0.0
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = _step(args.worker, *inputs, args.chunk_size)  # .item() synchronises
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = memory.growth()
    topology.destroy()
    return {"variant": args.worker, "peak_bytes": peak, "times": times,
            "cpu_times": cpu_times, "loss": loss,
            "device": f"{device.type} {str(dtype).removeprefix('torch.')}",
            "threads": torch.get_num_threads()}


def _launch(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, "-m", "omnidiff.jobs.benchmarks.bench_masked_head", "--worker", variant,
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--tokens", str(args.tokens),
           "--chunk-size", str(args.chunk_size), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"benchmark worker '{variant}' failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()[0]
    res = {v: _launch(v, args) for v in VARIANTS}
    load_after = os.getloadavg()[0]
    m, r = res["masked"], res["reference"]
    print(f"masked LM head vs full-logits reference, forward+backward: vocab {args.vocab}, "
          f"hidden {args.hidden}, {args.tokens} tokens ({args.tokens // 2} masked), "
          f"{m['device']}, {m['threads']} threads, chunk {args.chunk_size}, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'variant':<10} {'peak mem (GiB)':>15} {'wall median (s)':>16} {'min..max (s)':>15} "
          f"{'CPU median (s)':>15} {'loss':>12}")
    for name in VARIANTS:
        t, cpu = res[name]["times"], res[name]["cpu_times"]
        print(f"{name:<10} {res[name]['peak_bytes'] / GIB:>15.3f} {statistics.median(t):>16.3f} "
              f"{min(t):>7.3f}..{max(t):<7.3f} {statistics.median(cpu):>15.3f} "
              f"{res[name]['loss']:>12.6f}")
    mem_ratio = m["peak_bytes"] / r["peak_bytes"]
    speedup = statistics.median(r["times"]) / statistics.median(m["times"])
    cpu_speedup = statistics.median(r["cpu_times"]) / statistics.median(m["cpu_times"])
    print(f"memory masked/reference = {mem_ratio:.3f} (target <= 0.35); "
          f"speed reference/masked = {speedup:.2f}x by wall time (target >= 1.5), "
          f"{cpu_speedup:.2f}x by process CPU time (less sensitive to sharing the cores)")
    grad_bytes = args.vocab * args.hidden * 4  # the fp32 weight gradient the masked head keeps
    print(f"floor of the memory ratio set by that fp32 weight gradient alone: "
          f"{grad_bytes / r['peak_bytes']:.3f} ({grad_bytes / GIB:.3f} GiB)")
    print(f"1-min load average {load_before:.2f} before, {load_after:.2f} after, on "
          f"{os.cpu_count()} CPUs: a load above that means other jobs shared the cores "
          "and the timings are noisy")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=176_264)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
    else:
        report(args)


if __name__ == "__main__":
    main()
