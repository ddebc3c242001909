"""DeepSpeed data parallelism (gloo, several processes): ZeRO stages 0/1/2/3 at DP=2 give the
single-process scores per sample id, the identities hold, scoring changes nothing, and ZeRO-3
keeps the validation gradient partitioned. At micro-batch size 1 the microbatch-gradient path
scores (each micro-step's local gradient, before DeepSpeed reduces or partitions it) and gives,
per sample id, the single-process scores of the per-layer rules."""

from __future__ import annotations

import json

import pytest
import torch
from ds_common import run_deepspeed_case, second_order_case
from test_deepspeed import MODELS

from launcher import launch

pytestmark = pytest.mark.slow

DP = 2
RUN = dict(gas=2, mbs=2, steps=2, lr=0.5, seed=3)  # gradient accumulation, clipping at DeepSpeed's default 1.0
TARGETS = {"llama-tied": 1, "gpt-untied": 2}  # the GPT cases score two validation sets at once
LAYERS = 4  # deep enough that one layer's G is a small part of the model's
CASES = [dict(model="llama-tied", stage=s, split=split) for s in (0, 1, 2, 3) for split in (False, True)]
CASES += [dict(model="gpt-untied", stage=1, split=False), dict(model="gpt-untied", stage=3, split=True)]
# Micro-batch size 1: path "auto" takes the microbatch-gradient path; the reference runs the rules.
CASES += [dict(model="llama-tied", stage=s, split=s % 2 == 1, mbs=1) for s in (0, 1, 2, 3)]
CASES += [dict(model="gpt-untied", stage=3, split=True, mbs=1)]
# Adam: the Adam-aware scores (docs/DESIGN.md §1.5) from the ZeRO-partitioned second moment, per sample id equal to
# the single process's, from the second of three steps on; both paths. P = c / (sqrt(v_hat) + eps) amplifies rounding:
# after one step v_hat = g^2, and coordinates whose gradient sums to rounding noise in fp32 get P up to c / eps
# (3.6e7 here at eps 1e-8, against a median of 1e3), set by the summation order, which differs between layouts. With
# eps 1e-3 (P at most 530) the comparison measures the layouts, not fp32 noise; the single-process brute-force test
# (test_adam_values) runs at eps 1e-8.
ADAM = dict(optimizer="adam", lr=1e-3, steps=3, adam_eps=1e-3)
CASES += [dict(model="llama-tied", stage=s, split=s == 3, **ADAM) for s in (1, 2, 3)]
CASES += [dict(model="llama-tied", stage=3, split=False, mbs=1, **ADAM)]
# Dropout: the validation pass must leave every RNG stream as it found it (no single-process twin).
EQUIVALENCE_ONLY = [dict(model="gpt-untied", stage=s, split=False, dropout=0.2) for s in (2, 3)]


def _run(case: dict) -> dict:
    """The training options of a case: RUN, with its micro-batch size and optimizer settings."""
    return dict(RUN, **{k: case[k] for k in ("mbs", "optimizer", "lr", "steps", "adam_eps") if k in case})


def _reference(model: str, run: dict) -> dict:
    """The same global batches in one process: DP=1 with DP times the accumulation steps, scored by
    the per-layer rules."""
    from inrun_megatron.deepspeed.model import llama_shape

    run = dict(run, gas=RUN["gas"] * DP)
    shape = llama_shape(**MODELS[model], num_layers=LAYERS)
    return run_deepspeed_case(shape, stage=0, n_targets=TARGETS[model], keep_gradients=True, path="rules", **run)


def _relative_error(ranks: list, i: int, step: int, ref: dict) -> float:
    """Largest difference of the case's per-sample scores (all DP ranks, every target) from the
    reference's, relative to the reference's largest score of that target."""
    worst = 0.0
    for target, expected in ref.items():
        ours = {sid: raw for rank in ranks for sid, raw in rank[i]["raw"][step][target].items()}
        assert sorted(ours) == sorted(expected)
        scale = max(abs(v) for v in expected.values())
        worst = max(worst, max(abs(ours[s] - expected[s]) for s in expected) / scale)
    return worst


def _residuals(got: dict, lr: float) -> tuple[float, float]:
    """Largest efficiency and SGD identity residuals, relative to the size of what is summed
    (sum of |raw| over the global batch; times lr * clip for the SGD identity): sums of scores of
    either sign can cancel, so relative to the sum itself a residual says nothing."""
    per_step = len(got["sgd"]) // len(got["clip"])  # one entry per step and target
    efficiency = max(abs(t - d) / a for (t, d), a in zip(got["efficiency"], got["abs_raw"]))
    sgd = max(
        abs(t - d) / (lr * got["clip"][j // per_step] * a)
        for j, ((t, d), a) in enumerate(zip(got["sgd"], got["abs_raw"]))
    )
    return efficiency, sgd


def _assert_rank_result(name: str, got: dict, stage: int, lr: float, plain_sgd: bool = True) -> str:
    """What every rank shows in every case: training unchanged by scoring, DeepSpeed's state
    untouched by the validation pass, and the efficiency and (plain SGD) SGD identities (returned as text)."""
    assert not got["changed_by_scoring"], f"{name}: scoring changed {got['changed_by_scoring']}"
    iso = got["isolation"]
    assert iso["accumulate_grad_hooks_fired"] == 0 and iso["grads_untouched"], f"{name}: {iso}"
    assert iso["partitions_unchanged"] and iso["parameters_released"], f"{name}: {iso}"
    assert (iso["zero3_parameters"] > 0) == (stage == 3), f"{name}: {iso}"
    if not plain_sgd:  # efficiency of both values; no SGD identity for Adam
        efficiency = max(abs(t - d) / a for (t, d), a in zip(got["efficiency"], got["abs_raw"]))
        assert efficiency <= 1e-5, f"{name}: efficiency identity off by {efficiency:.1e}"
        assert not got["sgd"]
        return f"efficiency residual (both values) {efficiency:.1e}"
    efficiency, sgd = _residuals(got, lr)
    assert efficiency <= 1e-5, f"{name}: efficiency identity off by {efficiency:.1e}"
    assert sgd <= 1e-4, f"{name}: SGD identity off by {sgd:.1e}"
    return f"efficiency residual {efficiency:.1e}, SGD residual {sgd:.1e}"


def test_zero_stages_equal_single_process(deepspeed_world, tmp_path):
    payload = [
        dict(
            shape=dict(MODELS[c["model"]], num_layers=LAYERS, dropout=c.get("dropout", 0.0)),
            stage=c["stage"],
            split=c["split"],
            n_targets=TARGETS[c["model"]],
            **_run(c),
        )
        for c in CASES + EQUIVALENCE_ONLY
    ]
    outputs = launch("deepspeed_zero.py", DP, tmp_path, json.dumps(payload))
    ranks = [out["cases"] for out in outputs]
    # Bad input on one rank is refused on every rank before any collective work (no hang).
    assert "rank(s) [1] rejected their input" in outputs[0]["rejection"], outputs[0]["rejection"]
    assert "has no 'sample_ids'" in outputs[1]["rejection"], outputs[1]["rejection"]
    # Second-order values (docs/DESIGN.md §2.10) at DP=2, ZeRO-1 replicated, ZeRO-2 and ZeRO-3 split validation:
    # per sample id the single process's (the curvature is a central difference over ε·‖g‖ = 2.4e-4·‖w‖ in fp32,
    # so the layouts' rounding of G, divided by 2ε, moves it by up to ~1e-4 of the largest), and efficient.
    single = second_order_case(stage=0, split=False)
    for (stage, split), got in outputs[0]["second_order"].items():
        for step, ((rows, dots), (reference, _)) in enumerate(zip(got["steps"], single["steps"])):
            for row, expected in reference.items():
                assert sorted(rows[row]) == sorted(expected)
                scale = max(abs(v) for v in expected.values())
                error = max(abs(rows[row][s] - expected[s]) for s in expected) / scale
                residual = abs(sum(rows[row].values()) - dots[row]) / sum(abs(v) for v in rows[row].values())
                print(f"second order ZeRO-{stage} split={split} step {step} {row}: {error:.1e} from single process")
                assert error <= (1e-3 if row.endswith(":curvature") else 1e-4), (stage, split, step, row, error)
                assert residual <= 1e-5, (stage, split, step, row, residual)
    # ZeRO-3's curvature pass moves and restores every rank's partitions and the gathered persistent parameters:
    # training bitwise as with first-order scoring (itself the unscored training: changed_by_scoring above)
    for out in outputs:
        second, first = out["second_order"][(3, True)], out["zero3_first_order"]
        assert second["losses"] == first["losses"]
        for name, w in first["weights"].items():
            assert torch.equal(second["weights"][name], w), name
    keys = {(c["model"], tuple(sorted(_run(c).items()))) for c in CASES}
    references = {key: _reference(key[0], dict(key[1])) for key in keys}
    for (_, run), ref in references.items():  # the reference itself satisfies the identities
        plain_sgd = dict(run).get("optimizer", "sgd") == "sgd"
        assert _assert_rank_result("reference", dict(ref, changed_by_scoring=[]), 0, dict(run)["lr"], plain_sgd)
    for i, case in enumerate(CASES + EQUIVALENCE_ONLY):
        run = _run(case)
        mbs, plain_sgd = run["mbs"], run.get("optimizer", "sgd") == "sgd"
        path = "microbatch" if mbs == 1 else "rules"
        name = f"ZeRO-{case['stage']} {case['model']} {'split' if case['split'] else 'replicated'} validation, {path}"
        name += "" if plain_sgd else ", Adam"
        residuals = [_assert_rank_result(name, rank[i], case["stage"], run["lr"], plain_sgd) for rank in ranks]
        assert all(rank[i]["path"] == path for rank in ranks), f"{name}: scored by {ranks[0][i]['path']}"
        for rank in ranks:
            assert min(rank[i]["clip"]) < 1.0, f"{name}: clipping at 1.0 should be active in some step"
        if case in EQUIVALENCE_ONLY:
            continue
        ref = references[case["model"], tuple(sorted(run.items()))]
        if not plain_sgd:  # Adam-aware rows from the second step on, on every rank
            assert [sorted(raw) for raw in ref["raw"]] == [["validation"]] + [["validation", "validation:adam"]] * 2
        errors = []
        for step in range(run["steps"]):
            errors.append(_relative_error(ranks, i, step, ref["raw"][step]))
            assert errors[-1] <= 1e-4, f"{name} step {step}: {errors[-1]:.2e} from the single-process scores"
            assert ranks[0][i]["clip"][step] == pytest.approx(ref["clip"][step], rel=1e-5), f"{name}: clip_coef"
        print(f"{name}: max relative error vs single process {max(errors):.2e}, {residuals[0]}")
        for rank in ranks:  # G on each rank (ZeRO-3: partitions gathered layer by layer) = the full G
            for key, g in ref["G"].items():
                assert torch.allclose(rank[i]["G"][key], g, rtol=0, atol=1e-5 * float(g.abs().max())), key
        if case["stage"] == 3:
            for rank in ranks:
                memory = rank[i]["G_memory"]
                assert memory["local"] * DP <= memory["full"] + DP * len(ref["G"]), memory  # 1/DP, up to padding
                # Partitions plus the most ever gathered at once stay below one full copy of G. What is
                # gathered is one layer's G, plus what the collective library has not let go of yet: gloo
                # runs a process group's collectives on two worker threads, each of which can still hold
                # the tensors of the collective it finished last.
                assert memory["local"] + memory["peak"] < memory["full"], f"{name}: a rank held all of G: {memory}"
                per_parameter = {}  # the store gathers all targets of a parameter at once
                for (_, pname), g in ref["G"].items():
                    per_parameter[pname] = per_parameter.get(pname, 0) + g.numel()
                three_largest = sum(sorted(per_parameter.values())[-3:])
                assert memory["peak"] <= three_largest, f"{name}: gathered more than a layer at a time: {memory}"
            fractions = [
                (r[i]["G_memory"]["local"] + r[i]["G_memory"]["peak"]) / r[i]["G_memory"]["full"] for r in ranks
            ]
            print(f"{name}: G held per rank at most {max(fractions):.3f} of the full G ({ranks[0][i]['G_memory']})")


@pytest.mark.megatron
def test_tensor_parallel_inside_deepspeed_equals_single_process(megatron_world, tmp_path):
    """megatron-core TP=2 layers in DeepSpeed engines at DP=2, every ZeRO stage, against the
    single-process Megatron adapter on the same global batches (no clipping: plain SGD). At
    micro-batch size 1 (ZeRO-1 and ZeRO-3) the microbatch-gradient path scores: tensor-parallel
    shards summed over TP, TP duplicates (norms) counted on one TP rank. Second-order values
    (docs/DESIGN.md §2.10) at ZeRO-0/1/2/3, both paths: per sample id the single process's curvature
    (the reference's curvature pass is the Megatron adapter's; both are central differences in
    fp32, so the layouts' rounding of G divided by 2ε moves it, within 10⁻³ of the largest as in
    the other DeepSpeed second-order tests), its efficiency identity, training bitwise unchanged."""
    from inrun_megatron.megatron.model import GPTShape

    from common import CASES as GPT_CASES
    from common import run_case, shape_to_json

    shape = GPTShape(num_layers=2, **GPT_CASES["rmsnorm-swiglu-nobias-tied-recompute"])
    run = dict(gas=2, mbs=2, steps=2, lr=0.5, seed=21)
    cases = [dict(shape=shape_to_json(shape), stage=s, **run) for s in (0, 1, 2, 3)]
    cases += [dict(shape=shape_to_json(shape), stage=s, **dict(run, mbs=1)) for s in (1, 3)]
    cases += [dict(shape=shape_to_json(shape), stage=s, second_order=True, **run) for s in (0, 2)]
    cases += [dict(shape=shape_to_json(shape), stage=s, second_order=True, **dict(run, mbs=1)) for s in (1, 3)]
    ranks = launch("deepspeed_tp.py", 4, tmp_path, json.dumps(dict(tp=2, cases=cases)))
    # with the curvature rows; its first-order scores are bitwise those of an unscored-curvature run (§2.10)
    references = {
        mbs: run_case(
            shape, n_micro=run["gas"] * DP, mbs=mbs, steps=run["steps"], lr=run["lr"], seed=21, second_order=True
        )
        for mbs in (1, run["mbs"])
    }
    for i, case in enumerate(cases):
        path = "microbatch" if case["mbs"] == 1 else "rules"
        name = f"TP=2 x DP=2 ZeRO-{case['stage']}, {path}{', second order' if case.get('second_order') else ''}"
        reference = references[case["mbs"]]
        residuals = [_assert_rank_result(name, rank[i], case["stage"], run["lr"]) for rank in ranks]
        assert all(rank[i]["path"] == path for rank in ranks), f"{name}: scored by {ranks[0][i]['path']}"
        errors = []
        for step in range(run["steps"]):
            # TP ranks of one DP replica hold the same (TP-reduced) scores; DP replicas own different samples.
            assert ranks[0][i]["raw"][step] == ranks[1][i]["raw"][step], f"{name}: TP ranks disagree"
            errors.append(_relative_error(ranks, i, step, {"validation": reference["raw"][step]}))
            assert errors[-1] <= 1e-4, f"{name} step {step}: {errors[-1]:.2e} from the single-process scores"
        print(f"{name}: max relative error vs single process {max(errors):.2e}, {residuals[0]}")
        if not case.get("second_order"):
            continue
        curvature_errors = []
        for step in range(run["steps"]):
            curvature_errors.append(
                _relative_error(ranks, i, step, {"validation:curvature": reference["raw_curvature"][step]})
            )
            assert curvature_errors[-1] <= 1e-3, f"{name} step {step}: curvature {curvature_errors[-1]:.2e} off"
        got = ranks[0][i]["efficiency_curvature"]
        assert len(got) == run["steps"]
        efficiency = max(abs(total - batch_dot) / abs_sum for total, batch_dot, abs_sum in got)
        assert efficiency <= 1e-5, f"{name}: curvature efficiency identity off by {efficiency:.1e}"
        curvature_error = max(curvature_errors)
        print(
            f"{name}: curvature max relative error vs single process {curvature_error:.2e}, efficiency {efficiency:.1e}"
        )
