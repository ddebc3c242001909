"""DeepSpeed data parallelism (gloo, several processes): ZeRO stages 0/1/2/3 at DP=2 give the
single-process scores per sample id, the identities hold, scoring changes nothing, and ZeRO-3
keeps the validation gradient partitioned."""

from __future__ import annotations

import json

import pytest
import torch
from ds_common import run_deepspeed_case
from test_deepspeed import MODELS

from launcher import launch

pytestmark = pytest.mark.slow

DP = 2
RUN = dict(gas=2, mbs=2, steps=2, lr=0.5, seed=3)  # gradient accumulation, clipping at DeepSpeed's default 1.0
CASES = [dict(model="llama-tied", stage=s, split=split) for s in (0, 1, 2, 3) for split in (False, True)]
CASES += [dict(model="gpt-untied", stage=1, split=False), dict(model="gpt-untied", stage=3, split=True)]
# Dropout: the validation pass must leave every RNG stream as it found it (no single-process twin).
EQUIVALENCE_ONLY = [dict(model="gpt-untied", stage=s, split=False, dropout=0.2) for s in (2, 3)]


def _reference(model: str) -> dict:
    """The same global batches in one process: DP=1 with DP times the accumulation steps."""
    from inrun_megatron.deepspeed.model import LMShape

    return run_deepspeed_case(LMShape(**MODELS[model]), stage=0, **dict(RUN, gas=RUN["gas"] * DP), keep_gradients=True)


def _relative_error(ours: dict, ref: dict) -> float:
    assert sorted(ours) == sorted(ref)
    scale = max(abs(v) for v in ref.values())
    return max(abs(ours[s] - ref[s]) for s in ref) / scale


def test_zero_stages_equal_single_process(deepspeed_world, tmp_path):
    payload = [
        dict(shape=dict(MODELS[c["model"]], dropout=c.get("dropout", 0.0)), stage=c["stage"], split=c["split"], **RUN)
        for c in CASES + EQUIVALENCE_ONLY
    ]
    outputs = launch("deepspeed_zero.py", DP, tmp_path, json.dumps(payload))
    ranks = [out["cases"] for out in outputs]
    # Bad input on one rank is refused on every rank before any collective work (no hang).
    assert "rank(s) [1] rejected their input" in outputs[0]["rejection"], outputs[0]["rejection"]
    assert "has no 'sample_ids'" in outputs[1]["rejection"], outputs[1]["rejection"]
    references = {m: _reference(m) for m in {c["model"] for c in CASES}}
    for ref in references.values():  # the reference itself satisfies the identities
        for total, dot in ref["efficiency"] + ref["sgd"]:
            assert total == pytest.approx(dot, rel=1e-5)
    for i, case in enumerate(CASES + EQUIVALENCE_ONLY):
        name = f"ZeRO-{case['stage']} {case['model']} {'split' if case['split'] else 'replicated'} validation"
        for rank in ranks:
            got = rank[i]
            assert not got["changed_by_scoring"], f"{name}: scoring changed {got['changed_by_scoring']}"
            iso = got["isolation"]
            assert iso["accumulate_grad_hooks_fired"] == 0 and iso["grads_untouched"], f"{name}: {iso}"
            assert iso["partitions_unchanged"] and iso["parameters_released"], f"{name}: {iso}"
            assert iso["zero3_parameters"] == (len(got["G"]) if case["stage"] == 3 else 0), name
            for total, dot in got["efficiency"]:
                assert total == pytest.approx(dot, rel=1e-5), f"{name}: efficiency"
            for total, change in got["sgd"]:
                assert total == pytest.approx(change, rel=1e-4), f"{name}: SGD identity"
            assert min(got["clip"]) < 1.0, f"{name}: clipping at 1.0 should be active in some step: {got['clip']}"
        if case in EQUIVALENCE_ONLY:
            continue
        ref = references[case["model"]]
        for step in range(RUN["steps"]):
            ours = {sid: raw for rank in ranks for sid, raw in rank[i]["raw"][step].items()}
            assert _relative_error(ours, ref["raw"][step]) <= 1e-4, f"{name} step {step}"
            assert ranks[0][i]["clip"][step] == pytest.approx(ref["clip"][step], rel=1e-5), f"{name}: clip_coef"
        for rank in ranks:  # G on each rank (ZeRO-3: partitions gathered layer by layer) = the full G
            for pname, g in ref["G"].items():
                assert torch.allclose(rank[i]["G"][pname], g, rtol=0, atol=1e-5 * float(g.abs().max())), pname
        if case["stage"] == 3:
            for rank in ranks:
                memory = rank[i]["G_memory"]
                assert memory["local"] * DP <= memory["full"] + DP * len(ref["G"]), memory  # 1/DP, up to padding
                # Partitions plus the most ever gathered at once stay below one full copy of G.
                assert memory["local"] + memory["peak"] < memory["full"], f"{name}: a rank held all of G: {memory}"


@pytest.mark.megatron
def test_tensor_parallel_inside_deepspeed_equals_single_process(megatron_world, tmp_path):
    """megatron-core TP=2 layers in DeepSpeed engines at DP=2, every ZeRO stage, against the
    single-process Megatron adapter on the same global batches (no clipping: plain SGD)."""
    from inrun_megatron.megatron.model import GPTShape

    from common import CASES as GPT_CASES
    from common import run_case, shape_to_json

    shape = GPTShape(num_layers=2, **GPT_CASES["rmsnorm-swiglu-nobias-tied-recompute"])
    run = dict(gas=2, mbs=2, steps=2, lr=0.5, seed=21)
    cases = [dict(shape=shape_to_json(shape), stage=s, **run) for s in (0, 1, 2, 3)]
    ranks = launch("deepspeed_tp.py", 4, tmp_path, json.dumps(dict(tp=2, cases=cases)))
    reference = run_case(shape, n_micro=run["gas"] * DP, mbs=run["mbs"], steps=run["steps"], lr=run["lr"], seed=21)
    for i, case in enumerate(cases):
        name = f"TP=2 x DP=2 ZeRO-{case['stage']}"
        for rank in ranks:
            got = rank[i]
            assert not got["changed_by_scoring"], f"{name}: scoring changed {got['changed_by_scoring']}"
            for total, dot in got["efficiency"]:
                assert total == pytest.approx(dot, rel=1e-5), f"{name}: efficiency"
        for step in range(run["steps"]):
            # TP ranks of one DP replica hold the same (TP-reduced) scores; DP replicas own different samples.
            assert ranks[0][i]["raw"][step] == ranks[1][i]["raw"][step], f"{name}: TP ranks disagree"
            ours = {sid: raw for rank in ranks for sid, raw in rank[i]["raw"][step].items()}
            assert _relative_error(ours, reference["raw"][step]) <= 1e-4, f"{name} step {step}"
