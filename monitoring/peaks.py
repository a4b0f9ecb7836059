"""Device peaks: dense FLOP/s (the MFU denominator) and a process's peak memory.

GPUs: the vendor's dense (no 2:4 sparsity) tensor-core peaks, looked up by the name
``torch.cuda.get_device_name()`` reports. CPUs have no such number worth trusting (clocks,
vector units and the cores a job may use vary), so the peak is measured: the best sustained rate
of a large GEMM over a fixed short time, best of a few tries, with the threads the run uses.

Memory (:class:`PeakMemory`): on GPU the allocator's peak; on CPU the process's peak resident
set (``VmHWM`` in /proc/self/status), whose high-water mark is first lowered to the current RSS
(proc(5) ``clear_refs`` 5), so the figure is the growth over a baseline, free of earlier
transients. Not ``ru_maxrss``: across fork + exec the kernel carries the parent's peak into the
child's, so a worker spawned by a large process (pytest after many tests) would report the
parent's size.
RSS follows live tensors only when freed memory returns to the system: start the process with
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=131072``, as ``omnidiff bench`` does),
else glibc's free lists (up to 32 MiB chunks) stay resident and inflate the figure.
"""

from __future__ import annotations

import resource
import time

import torch

# (substring of the device name, lower case) -> dense peak FLOP/s by precision (vendor data
# sheets, without 2:4 sparsity). First match wins, so more specific names come first. fp8 is the
# FP8 tensor-core rate (A100 has none); fp32 the non-tensor-core rate (torch's default, no TF32).
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bf16": 756e12, "fp16": 756e12, "fp8": 1513e12, "fp32": 51e12}),
    ("h100 nvl", {"bf16": 835e12, "fp16": 835e12, "fp8": 1671e12, "fp32": 60e12}),
    ("h100", {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "fp32": 67e12}),  # SXM / HBM3
    ("h200", {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "fp32": 67e12}),
    ("b200", {"bf16": 2250e12, "fp16": 2250e12, "fp8": 4500e12}),
    ("a100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
)

# 2048: large enough for BLAS to reach its sustained rate, small enough that measuring at every
# run's start costs about a second (compare sizes: python -c "import torch; from
# omnidiff.monitoring.peaks import measure_gemm_flops as m; print(m(torch.float32, 4096) /
# m(torch.float32, 2048))")
CPU_GEMM_SIZE = 2048
CPU_GEMM_SECONDS = 0.3
CPU_GEMM_TRIES = 3
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_peak(name: str, precision: str) -> float | None:
    """The table's dense peak for a device called ``name`` at ``precision``, if listed."""
    key = precision_key(precision)
    lowered = name.lower()
    for pattern, peaks in GPU_PEAKS:
        if pattern in lowered:
            return peaks.get(key)
    return None


def precision_key(precision: str) -> str:
    """``fp8-delayed`` / ``fp8`` / ``mxfp8`` -> ``fp8``; other names unchanged."""
    return "fp8" if "fp8" in precision else precision


def measure_gemm_flops(dtype: torch.dtype, size: int = CPU_GEMM_SIZE,
                       seconds: float = CPU_GEMM_SECONDS, tries: int = CPU_GEMM_TRIES) -> float:
    """Best sustained FLOP/s of ``size``-square matmuls on the CPU with torch's current threads."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = a @ b  # first call: kernel selection and page faults stay out of the timing
    best = 0.0
    for _ in range(tries):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            torch.matmul(a, b, out=out)
            count += 1
        best = max(best, 2.0 * size**3 * count / elapsed)
    return best


def cpu_peak(precision: str) -> tuple[float, str]:
    """Measured GEMM peak for a CPU run at ``precision``.

    fp32 runs: the fp32 GEMM. Low-precision runs: the faster of their own dtype's GEMM and the
    fp32 one (the best dense rate the run could have used, so MFU is never flattered by a slow
    low-precision kernel).
    """
    if precision_key(precision) == "fp8":
        raise ValueError("fp8 has no CPU kernels to measure")
    rates = {"fp32": measure_gemm_flops(torch.float32)}
    if precision != "fp32":
        rates[precision] = measure_gemm_flops(_DTYPES[precision])
    best = max(rates, key=rates.get)
    detail = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items())
    return rates[best], (f"measured: {CPU_GEMM_SIZE}^3 {best} GEMM, best of {CPU_GEMM_TRIES} x "
                         f"{CPU_GEMM_SECONDS} s on {torch.get_num_threads()} threads ({detail})")


def peak_flops(precision: str, device: torch.device | str | None = None) -> tuple[float, str]:
    """Dense peak FLOP/s of one device for ``precision`` (fp32, bf16, fp16, fp8*), and how it
    was obtained. ``device``: the CUDA device to look up, else the current one; CPU when no GPU
    is visible (or ``device`` is a CPU), measured.

    Raises ``LookupError`` for a GPU the table does not list.
    """
    device = torch.device(device) if device is not None else None
    if (device is not None and device.type == "cpu") or not torch.cuda.is_available():
        return cpu_peak(precision)
    name = torch.cuda.get_device_name(device)
    peak = gpu_peak(name, precision)
    if peak is None:
        raise LookupError(f"no {precision_key(precision)} peak listed for GPU {name!r} "
                          "(monitoring/peaks.py GPU_PEAKS)")
    return peak, f"table: {name} dense {precision_key(precision)}"


def rss_bytes() -> int:
    """This process's current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's own resident-set high-water mark (``VmHWM``, Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM line")


def reset_peak_rss() -> None:
    """Lower the peak-RSS mark to the current RSS (proc(5) clear_refs 5, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Peak memory growth of this process from :meth:`start` on: CUDA allocator statistics on
    GPU, peak RSS (kernel high-water mark, reset at start) on CPU."""

    def __init__(self, cuda: bool | None = None) -> None:
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.base = 0

    @property
    def method(self) -> str:
        return ("torch.cuda.max_memory_allocated growth" if self.cuda
                else "peak RSS growth (VmHWM after clear_refs)")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        reset_peak_rss()
        self.base = rss_bytes()

    def growth(self) -> int:
        """Peak bytes above the baseline since :meth:`start`."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return peak_rss_bytes() - self.base
