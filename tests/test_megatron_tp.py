"""Tensor parallelism: TP=2 and TP=4 give the single-process scores per sample id, and the
DESIGN §1 identities hold at every layout (gloo, several processes)."""

from __future__ import annotations

import json

import pytest
import torch

from common import CASES, run_case, shape_to_json
from launcher import launch

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

TP_CASES = [
    ("layernorm-gelu-bias-untied", torch.float32, 3),
    ("rmsnorm-swiglu-nobias-tied-recompute", torch.float64, 2),
    ("layernorm-swiglu-bias-tied-rope", torch.float64, 1),
]
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


def _cases():
    from inrun_megatron.megatron.model import GPTShape

    out = []
    for name, dtype, n_micro in TP_CASES:
        shape = GPTShape(num_layers=2, params_dtype=dtype, **CASES[name])
        out.append((name, shape, dict(n_micro=n_micro, mbs=2, steps=3, lr=0.5, seed=21)))
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_scores_equal_single_process(megatron_world, tmp_path, tp):
    cases = _cases()
    payload = json.dumps([dict(shape=shape_to_json(shape), **kw) for _, shape, kw in cases])
    ranks = launch("megatron_tp.py", tp, tmp_path, payload)
    for i, (name, shape, kw) in enumerate(cases):
        reference = run_case(shape, **kw)
        tol = TOLERANCE[shape.params_dtype]
        for rank_results in ranks:
            got = rank_results[i]
            assert got["bit_identical_to_unscored"], f"{name}: scoring changed the TP={tp} run"
            for step, (ours, ref) in enumerate(zip(got["raw"], reference["raw"])):
                assert sorted(ours) == sorted(ref)
                scale = max(abs(v) for v in ref.values())
                worst = max(abs(ours[s] - ref[s]) for s in ref) / scale
                assert worst <= tol, f"{name} step {step}: TP={tp} differs from TP=1 by {worst:.2e}"
            for total, batch_dot in got["efficiency"]:
                assert total == pytest.approx(batch_dot, rel=tol, abs=1e-12), f"{name}: efficiency"
            for total, change in got["sgd"]:
                assert total == pytest.approx(change, rel=tol * 10, abs=1e-12), f"{name}: SGD identity"
