"""The demo report's numbers against their definitions: the corruption AUROC (pairwise, ties count
half), per kind of corruption, the timing correlation, and the view the report recommends."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from inrun_megatron.analysis.views import VIEWS

spec = importlib.util.spec_from_file_location("demo_report", Path(__file__).parents[1] / "tools" / "demo_report.py")
demo_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_report)


def test_auroc_is_the_pairwise_win_rate():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 200).astype(float)  # many ties
    positive = rng.random(200) < 0.3
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert demo_report.auroc(scores, positive) == wins / (len(pos) * len(neg))
    assert demo_report.auroc(np.arange(4.0), np.array([False, False, True, True])) == 1.0


def test_corruption_aurocs_rank_low_values_per_kind():
    # sample 0 garbage, 1 mostly shuffled, 2 partly garbage (neither corrupted nor clean), 3-5 clean
    values = np.array([-3.0, 2.0, -2.0, -1.0, 1.0, 3.0])
    fractions = {"random": np.array([1.0, 0, 0.3, 0, 0, 0]), "shuffled": np.array([0, 0.8, 0, 0, 0, 0])}
    cells = demo_report.corruption_aurocs(values, fractions)
    # all kinds: 0 and 1 against 2-5; 0 is below all four, 1 only above sample 5
    assert cells["all kinds"] == pytest.approx((4 + 1) / (2 * 4))
    assert cells["random vs clean"] == 1.0  # sample 2 counts neither way
    assert cells["shuffled vs clean"] == pytest.approx(1 / 3)


def test_timing_correlation_sees_values_that_grow_with_the_step():
    step = np.arange(5)
    assert demo_report.timing_correlation(np.array([0.0, 1, -2, 3, -4]), step) == pytest.approx(1.0)
    assert demo_report.timing_correlation(np.array([4.0, -3, 2, -1, 0]), step) == pytest.approx(-1.0)


def test_the_report_recommends_a_view_with_a_sign():
    """The lists are read as helped/hurt, so the recommended view must keep the sign (docs/DESIGN.md §1.6)."""
    assert VIEWS[demo_report.RECOMMENDED_VIEW].signed and demo_report.RECOMMENDED_VIEW != "accumulated"


def test_sign_flips_counts_negative_dots_and_rising_losses():
    import pyarrow as pa

    totals = pa.table(
        {
            "step": [0, 1, 2, 0, 1, 2],
            "target": ["a", "a", "a", "b", "b", "b"],
            "batch_dot": [1.0, -2.0, -0.5, 3.0, 1.0, 2.0],
            "validation_loss": [5.0, 4.0, 4.5, 5.0, 4.0, 3.0],
        }
    )
    assert demo_report.sign_flips(totals, ["a", "b"]) == {
        "a": {"steps": 3, "negative_batch_dot": 2, "loss_rose": 1},
        "b": {"steps": 3, "negative_batch_dot": 0, "loss_rose": 0},
    }
