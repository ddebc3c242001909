"""``inrun-bench`` runs end to end and reports what it promises (no timing is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.megatron


def test_bench_reports_flops_memory_and_overhead_ratio():
    cmd = [sys.executable, "-m", "inrun_megatron.bench", "--layers", "1", "--hidden", "32", "--heads", "4"]
    cmd += ["--seq", "32", "--vocab", "64", "--steps", "2", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    assert "Warning" not in proc.stderr, proc.stderr  # megatron's import warnings are quieted
    out = proc.stdout
    lines = out.strip().splitlines()
    assert re.fullmatch(r"overhead_ratio=\d+\.\d{3}", lines[-1])
    assert "validation/training tokens = 0.125" in out
    flop_ratio = float(re.search(r"flop_ratio=(\d+\.\d+)", out).group(1))
    assert flop_ratio > 1.0  # the validation pass and the projections add work
    assert re.search(r"^scored\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+-?\d+\.\d+$", out, re.M)
