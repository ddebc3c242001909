"""``inrun-bench`` runs end to end and reports what it promises (no timing is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from inrun_megatron.bench import parse_args, validation_layout

pytestmark = pytest.mark.megatron

SMALL = ["--layers", "1", "--hidden", "32", "--heads", "4", "--seq", "32", "--vocab", "64", "--steps", "2"]
BREAKDOWN = ("validation pass", "scoring inside the training pass", "bookkeeping")
#: A printed number is rounded to 3 decimals: up to half a unit of its last digit off.
ROUNDING = 0.0005


def run_bench(*options: str) -> str:
    cmd = [sys.executable, "-m", "inrun_megatron.bench", *SMALL, "--threads", "1", *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    assert "Warning" not in proc.stderr, proc.stderr  # megatron's import warnings are quieted
    return proc.stdout


def number(pattern: str, out: str) -> float:
    match = re.search(pattern, out, re.M)
    assert match, f"{pattern!r} not in the output:\n{out}"
    return float(match.group(1))


def check_report(out: str, *, path: str) -> int:
    """Check the common report (last line, path, step table, a breakdown consistent with it); return G's bytes."""
    lines = out.strip().splitlines()
    assert re.fullmatch(r"overhead_ratio=\d+\.\d{3}", lines[-1])
    assert f"scoring path {path};" in out
    flop_ratio = number(r"flop_ratio=(\d+\.\d+)", out)
    assert flop_ratio > 1.0  # the validation pass and the scoring add work
    plain = number(r"^plain\s+(\d+\.\d+)\s", out)
    assert re.search(r"^scored\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+\s+-?\d+\.\d+$", out, re.M)
    seconds = {}
    for name in BREAKDOWN:
        match = re.search(rf"^  {name}\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)", out, re.M)
        assert match, f"no breakdown row {name!r}:\n{out}"
        seconds[name], share = float(match.group(1)), float(match.group(2))
        # share = seconds / plain step, up to the rounding of the three printed numbers
        assert abs(share * plain - seconds[name]) <= ROUNDING * (1 + share + plain)
    assert seconds["validation pass"] >= 0 and seconds["bookkeeping"] >= 0
    scored_training = number(r"scored training pass (\d+\.\d+) s", out)
    plain_training = number(r"plain training pass (\d+\.\d+) s", out)
    assert abs(seconds["scoring inside the training pass"] - (scored_training - plain_training)) <= 3 * ROUNDING
    return int(number(r"validation-gradient store G .* MiB \((\d+) bytes\)", out.replace(",", "")))


def test_bench_rules_path_reports_breakdown_and_overhead_ratio():
    out = run_bench()
    assert "validation 1 target(s) x 1 x 32 = 32 tokens (validation/training tokens = 0.125)" in out
    check_report(out, path="rules")


def test_bench_microbatch_path_with_targets_sharing_the_validation_budget():
    options = ["--micro-batch-size", "1", "--microbatches", "8"]
    shared = run_bench(*options, "--targets", "3", "--clock", "cpu")
    # 256 training tokens, a budget of 32 validation tokens dealt into 3 targets of one 10-token sequence
    assert "validation 3 target(s) x 1 x 10 = 30 tokens" in shared and "cpu clock" in shared
    g_three = check_report(shared, path="microbatch")
    rules = run_bench(*options, "--path", "rules")
    g_one = check_report(rules, path="rules")
    assert g_three == 3 * g_one  # one float32 gradient of every parameter per target


def test_bench_adam_scores_both_values_with_twice_the_rows_of_g():
    """With Adam the store of G holds P ⊙ G too (docs/DESIGN.md §1.5): twice the bytes, scored in the same
    passes; --sgd-value-only is the same Adam run scoring the SGD value alone."""
    both = run_bench("--optimizer", "adam")
    assert "optimizer adam, values scored: sgd and adam" in both
    sgd_only = run_bench("--optimizer", "adam", "--sgd-value-only")
    assert "optimizer adam, values scored: sgd" in sgd_only and "sgd and adam" not in sgd_only
    assert check_report(both, path="rules") == 2 * check_report(sgd_only, path="rules")
    # more score FLOPs (the rule GEMMs have twice the validation rows), in the same number of passes
    assert number(r"flop_ratio=(\d+\.\d+)", both) > number(r"flop_ratio=(\d+\.\d+)", sgd_only)


def test_validation_layout_deals_the_budget_into_targets():
    assert validation_layout(4096, 512, 1 / 8, 1) == (1, 512)
    assert validation_layout(4096, 512, 1 / 8, 3) == (1, 170)  # 3 x 170 of 512 tokens
    assert validation_layout(16384, 512, 1 / 8, 2) == (2, 512)
    with pytest.raises(ValueError, match="less than one token for each of 40 targets"):
        validation_layout(256, 32, 1 / 8, 40)


def test_bench_refuses_bad_options_before_any_work(capsys):
    for argv, message in (
        (["--path", "microbatch"], "needs --micro-batch-size 1, not 4"),
        (["--targets", "0"], "--targets must be at least 1"),
        ([*SMALL, "--targets", "40"], "less than one token for each of 40 targets"),
        (["--sgd-value-only"], "needs --optimizer adam"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_bench_second_order_times_the_curvature_pass():
    """--second-order (docs/DESIGN.md §1.7, §2.10): the curvature pass is its own part of the breakdown, the
    store of G keeps its size (the curvature pass's stores are temporary), and the scored step does more work
    than a first-order one (two validation passes and the training microbatches once more)."""
    first = run_bench("--clock", "cpu")
    second = run_bench("--clock", "cpu", "--second-order")
    assert "values scored: sgd and curvature" in second
    assert check_report(second, path="rules") == check_report(first, path="rules")
    match = re.search(r"^  curvature pass\s+(\d+\.\d+)\s+(\d+\.\d+)", second, re.M)
    assert match and "curvature pass" not in first
    assert number(r"flop_ratio=(\d+\.\d+)", second) > number(r"flop_ratio=(\d+\.\d+)", first)
    with pytest.raises(SystemExit):
        parse_args(["--second-order", "--dtype", "bfloat16"])
