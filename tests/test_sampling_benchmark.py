"""The diffusion-vs-autoregressive benchmark runs end to end and reports its ceiling."""

from __future__ import annotations

import re

import pytest

from omnidiff.platform.sampling import benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_benchmark_prints_speed_ups_and_what_the_target_needs(capsys):
    benchmark.main(["--preset", "tiny", "--repeats", "1", "--steps", "2", "--target", "4"])
    out = capsys.readouterr().out
    timed = re.search(r"autoregressive \+ KV cache \(baseline\) +median +([\d.]+) s", out)
    assert timed and re.search(r"diffusion, 2 steps .* speed-up vs AR: median +\d+\.\d+x", out)
    needs = re.search(r"diffusion, 2 steps: reached (\d+) GFLOP/s; 4x over AR needs (\d+) GFLOP/s "
                      r"\(all steps in ([\d.]+) s\)", out)
    assert needs, out
    assert float(needs[3]) == pytest.approx(float(timed[1]) / 4, abs=0.01)


def test_matmul_rate_is_a_rate():
    assert benchmark.matmul_rate(64, 128, 32, repeats=2) > 1e6  # FLOP/s; any CPU does 1 MFLOP/s
