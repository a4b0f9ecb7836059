"""The diffusion-vs-autoregressive benchmark runs end to end and reports its ceiling."""

from __future__ import annotations

import re

import pytest

from omnidiff.platform.sampling import benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_benchmark_prints_speed_ups_and_this_machines_ceiling(capsys):
    benchmark.main(["--preset", "tiny", "--repeats", "1", "--steps", "2"])
    out = capsys.readouterr().out
    assert re.search(r"diffusion, 2 steps .* speed-up vs AR: median +\d+\.\d+x", out)
    ceiling = re.search(r"diffusion, 2 steps: achieved (\d+) GFLOP/s; at the matmul rate "
                        r"([\d.]+) s, at most ([\d.]+)x vs AR", out)
    assert ceiling, out
    assert float(ceiling[2]) > 0 and float(ceiling[3]) > 0


def test_matmul_rate_is_a_rate():
    assert benchmark.matmul_rate(size=128, repeats=2) > 1e6  # FLOP/s; any CPU does 1 MFLOP/s
