"""Adam-aware values (docs/DESIGN.md §1.5) against brute force and their efficiency identity.

A single-process megatron GPT trained by torch's AdamW (megatron's CPU fallback) is scored for a
few steps; at every step after the first, each sample's Adam-aware raw score must equal its
brute-force gradient dotted with ``P_t ⊙ G_t``, ``P_t`` written out independently from the
optimizer's state before the step (``oracle.adam_preconditioner``), on both scoring paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle
from common import (
    case_shape,
    dumped_run_case,
    load_canonical_weights,
    make_data,
    manifest_for_tests,
    raw_by_sample,
    scored_forward_backward,
    token_losses,
    top_answer,
    torch_adamw,
)

LR = 1e-3


def test_preconditioner_is_undefined_before_the_first_step_and_follows_adams_state():
    from inrun_megatron.optimizer_values import adam_preconditioner, torch_adam_preconditioner

    param = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    optimizer = torch_adamw([param], LR)
    assert torch_adam_preconditioner(optimizer, param) is None  # no state at all
    assert adam_preconditioner(torch.ones(7), 0, (0.9, 0.95), 1e-8) is None  # v_0: 0/0
    for step in range(1, 4):
        param.grad = torch.randn(7, dtype=torch.float64) * 10.0**-step
        optimizer.step()
        ours = torch_adam_preconditioner(optimizer, param)
        assert torch.allclose(ours, oracle.adam_preconditioner(optimizer, param), rtol=1e-15, atol=0)
    # Without bias correction (apex / DeepSpeed option) neither moment is corrected.
    v = torch.rand(7, dtype=torch.float64)
    plain = adam_preconditioner(v, 3, (0.9, 0.95), 1e-8, bias_correction=False)
    assert torch.allclose(plain, 0.1 / (v.sqrt() + 1e-8), rtol=1e-15, atol=0)
    amsgrad = torch.optim.Adam([param], lr=LR, amsgrad=True)
    param.grad = torch.ones(7, dtype=torch.float64)
    amsgrad.step()
    with pytest.raises(NotImplementedError, match="amsgrad"):
        torch_adam_preconditioner(amsgrad, param)


@pytest.mark.megatron
@pytest.mark.parametrize("mbs", [3, 1], ids=["rules", "microbatch"])
@pytest.mark.parametrize("case", ["layernorm-gelu-bias-untied", "rmsnorm-swiglu-nobias-tied-recompute"])
def test_adam_values_match_brute_force_and_efficiency(megatron_world, case, mbs):
    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.megatron.model import build_gpt

    shape = case_shape(case)
    model = build_gpt(shape)
    load_canonical_weights(model, seed=3)
    optimizer = torch_adamw(list(model.parameters()), LR)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    scorer = MegatronScorer(model, validation, optimizer=optimizer)
    assert scorer.score_rows == ["validation", "validation:adam"]
    n_micro = 6 // mbs
    for step in range(3):
        train = make_data(shape, n_micro, mbs, seed=5 + step, first_id=100 * step)
        optimizer.zero_grad(set_to_none=True)
        scored_forward_backward(scorer, model, shape, train)
        params = dict(model.named_parameters())
        g_train = {name: p.grad.clone() for name, p in params.items()}
        g_val = oracle.validation_gradient(model, validation, token_losses)
        reference = {"validation": oracle.per_sample_raw(model, train, token_losses, g_val)}
        dots = {"validation": oracle.dot(g_train, g_val)}
        if step > 0:
            pg = {name: oracle.adam_preconditioner(optimizer, p) * g_val[name].double() for name, p in params.items()}
            reference["validation:adam"] = oracle.per_sample_raw(model, train, token_losses, pg)
            dots["validation:adam"] = oracle.dot(g_train, pg)
        optimizer.step()
        result = scorer.end_step(lr=LR)
        records = result.records
        # The first step has no second moment before it: its records hold no Adam row (a plain sum of
        # a sample's Adam-aware values skips it), every later step both kinds.
        assert set(records.columns["target"]) == set(reference)
        for name, ref in reference.items():
            ours = raw_by_sample(records, name)
            assert sorted(ours) == sorted(ref)
            scale = max(abs(v) for v in ref.values())
            error = max(abs(ours[sid] - ref[sid]) for sid in ref) / scale
            print(f"{case} mbs{mbs} step {step} {name}: max relative error vs brute force {error:.1e}")
            assert error <= 1e-9, (name, error)
            # efficiency: the rows sum to <g, G> (SGD) and <g, P ⊙ G> (Adam), as recorded for the step
            assert sum(ours.values()) == pytest.approx(dots[name], rel=1e-9)
            assert result.batch_dots[name] == pytest.approx(dots[name], rel=1e-9)
        mine = records.columns["target"] == "validation:adam"
        assert np.array_equal(records.values[mine], LR * records.columns["raw"][mine])
    if mbs == 3:  # the preconditioned score is not the SGD score rescaled: it ranks samples differently
        sgd, adam = raw_by_sample(records, "validation"), raw_by_sample(records, "validation:adam")
        ids = sorted(sgd)
        assert np.argsort([sgd[i] for i in ids]).tolist() != np.argsort([adam[i] for i in ids]).tolist()
    scorer.detach()


@pytest.mark.megatron
def test_sgd_value_is_the_optimizer_aware_value_under_sgd(megatron_world):
    """Under SGD nothing but today's value is recorded, bit for bit; under Adam with
    ``optimizer_values=False`` too."""
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.megatron.model import build_gpt

    shape = case_shape("layernorm-gelu-bias-untied", torch.float32)
    model = build_gpt(shape)
    load_canonical_weights(model, seed=3)
    train = make_data(shape, 2, 2, seed=5)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    optimizers = {
        "none": None,
        "sgd": torch.optim.SGD(model.parameters(), lr=LR),
        "adam, optimizer_values off": torch_adamw(list(model.parameters()), LR),
    }
    records = {}
    for name, optimizer in optimizers.items():
        config = ScoringConfig(optimizer_values=optimizer is None or name == "sgd")
        scorer = MegatronScorer(model, validation, config, optimizer=optimizer)
        assert scorer.score_rows == ["validation"]
        for p in model.parameters():
            p.grad = None
        scored_forward_backward(scorer, model, shape, train)
        records[name] = scorer.end_step(lr=LR).records
        scorer.detach()
    for name, got in records.items():
        for column, values in records["none"].columns.items():
            assert np.array_equal(got.columns[column], values), (name, column)


@pytest.mark.megatron
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_dump_holds_both_values_and_the_analysis_reads_either(megatron_world, tmp_path, capsys, optimizer):
    """Rows ``validation`` (SGD value) and ``validation:adam``; ``inrun-scores verify`` checks the
    efficiency identity of both; commands read the Adam-aware value by default where recorded."""
    from inrun_megatron.analysis.cli import main
    from inrun_megatron.analysis.commands import verify
    from inrun_megatron.optimizer_values import ADAM, SGD, values_manifest

    run = tmp_path / "run"
    kinds = [SGD, ADAM] if optimizer == "adam" else [SGD]
    manifest = manifest_for_tests(values=values_manifest(["validation"], kinds))
    shape = case_shape("layernorm-gelu-bias-untied")
    result = dumped_run_case(run, shape, manifest, n_micro=2, mbs=2, steps=3, lr=LR, seed=4, optimizer=optimizer)
    report = verify(run)
    assert report.ok, report.data["problems"]
    checked = report.data["checked"]["efficiency"]
    expected = {"validation": result["raw"]}
    if optimizer == "adam":
        expected["validation:adam"] = result["raw_adam"]
    assert sorted(checked) == sorted(expected)
    for row in expected:  # the Adam-aware value at every step after the first
        assert checked[row]["steps_measured"] == (3 if row == "validation" else 2)
        assert checked[row]["max_rel_error"] <= 1e-9

    for options, row in [
        ((), "validation:adam" if optimizer == "adam" else "validation"),
        (("--value", "sgd"), "validation"),
    ]:
        answer = top_answer(capsys, run, *options)
        assert answer["target"] == row
        values = {s["sample_id"]: s["value"] for s in answer["samples"]}
        steps = [raw for raw in expected[row] if raw is not None]
        assert values == pytest.approx({sid: LR * raw[sid] for raw in steps for sid in raw}, rel=1e-12)
    # --value and --view compose: the step-scaled view of the chosen value (docs/DESIGN.md §1.6),
    # each sample seen once, so its view is its raw score over the mean |raw| of its step's rows
    for row in expected:
        answer = top_answer(capsys, run, "--value", "adam" if row.endswith(":adam") else "sgd", "--view", "step-scaled")
        assert answer["target"] == row
        steps = [raw for raw in expected[row] if raw is not None]
        reference = {sid: raw[sid] / np.mean(np.abs(list(raw.values()))) for raw in steps for sid in raw}
        assert {s["sample_id"]: s["value"] for s in answer["samples"]} == pytest.approx(reference, rel=1e-9)
    if optimizer == "sgd":
        assert main(["top", str(run), "--value", "adam", "--quiet"]) == 2
        assert "no adam value of target 'validation' was recorded" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_adam_values_match_brute_force(deepspeed_world, stage):
    """Every ZeRO stage in one process: the Adam-aware scores against brute force, ``P`` from the
    full second moment as DeepSpeed's own ``safe_get_full_optimizer_state`` gathers it and the
    number of steps taken; the efficiency identity against DeepSpeed's full gradient."""
    import deepspeed
    from ds_common import adam_aware_reference, ds_config
    from test_deepspeed import MODELS

    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import TransformerLM, llama_shape, lm_token_losses

    shape = llama_shape(**MODELS["llama-tied"])
    torch.manual_seed(0)
    model = TransformerLM(shape)
    config = ds_config(stage=stage, gas=2, mbs=2, clip=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch_adamw(list(model.parameters()), LR), config=config)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    scorer = DeepSpeedScorer(engine, validation, lm_token_losses)
    assert scorer.score_rows == ["validation", "validation:adam"]
    for step in range(3):
        train = make_data(shape, 2, 2, seed=5 + step, first_id=100 * step)
        scorer.forward_backward(train)
        reference = {}
        if step > 0:
            reference, batch_dot = adam_aware_reference(engine, shape, validation, train, steps_taken=step)
        engine.step()
        result = scorer.end_step()
        records = result.records
        ours = raw_by_sample(records, "validation:adam")
        assert sorted(ours) == sorted(reference)  # none at the first step
        if step > 0:
            scale = max(abs(v) for v in reference.values())
            error = max(abs(ours[sid] - reference[sid]) for sid in reference) / scale
            print(f"ZeRO-{stage} step {step}: Adam-aware scores vs brute force {error:.1e}")
            assert error <= 1e-4, error
            assert result.batch_dots["validation:adam"] == pytest.approx(batch_dot, rel=1e-5)
            assert sum(ours.values()) == pytest.approx(batch_dot, rel=1e-5)
    scorer.detach()
    engine.destroy()
