"""The demo's corruption AUROC against the pairwise definition (ties count half)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

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
