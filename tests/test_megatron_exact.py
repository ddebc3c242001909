"""Per-sample scores of a single-process megatron GPT against brute force (docs/DESIGN.md §1, §4).

Micro-batch size 3 runs the per-layer rules; micro-batch size 1 the microbatch-gradient path
(``path="auto"`` picks it), which must also give the rules' scores per sample id.
"""

from __future__ import annotations

import pytest
import torch

import oracle
from common import (
    CASES,
    EXACTNESS,
    brute_force_scores,
    case_shape,
    forward_step,
    load_canonical_weights,
    make_data,
    run_case,
    score_one_step,
    token_losses,
)

pytestmark = pytest.mark.megatron


def _raw(records) -> dict[int, float]:
    return dict(zip(records.columns["sample_id"].tolist(), records.columns["raw"].tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n_micro", [1, 3])
@pytest.mark.parametrize("mbs", [3, 1], ids=["mbs3-rules", "mbs1-microbatch"])
@pytest.mark.parametrize("case", list(CASES))
def test_scores_match_brute_force(megatron_world, case, mbs, dtype, n_micro):
    from inrun_megatron.megatron.model import build_gpt

    shape = case_shape(case, dtype)
    model = build_gpt(shape)
    load_canonical_weights(model, seed=3)
    train = make_data(shape, n_micro, mbs, seed=5)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)  # 4 validation sequences
    scorer, records = score_one_step(model, shape, train, validation)
    ours = _raw(records)
    if mbs == 1:  # the same step on the rules path gives the same score per sample id
        for p in model.parameters():
            p.grad = None
        rules = _raw(score_one_step(model, shape, train, validation, path="rules")[1])
        assert sorted(rules) == sorted(ours)
        rules_scale = max(abs(v) for v in rules.values())
        assert max(abs(ours[sid] - rules[sid]) for sid in rules) <= EXACTNESS[dtype] * rules_scale

    g_val = oracle.validation_gradient(model, validation, token_losses)
    store = {name: scorer.grads[p][0] for name, p in model.named_parameters()}
    for name, g in g_val.items():
        assert torch.allclose(store[name].to(g), g, rtol=0, atol=EXACTNESS[dtype] * float(g.abs().max())), name

    for p in model.parameters():
        p.grad = None
    reference = oracle.per_sample_raw(model, train, token_losses, g_val)
    assert sorted(ours) == sorted(reference)
    scale = max(abs(v) for v in reference.values())
    errors = {sid: abs(ours[sid] - reference[sid]) / scale for sid in reference}
    print(f"{case} {dtype} {n_micro}x{mbs}: max relative error vs brute force {max(errors.values()):.2e}")
    assert max(errors.values()) <= EXACTNESS[dtype], errors
    # Scores of different samples differ (the comparison is per sample, not only of sums).
    assert len({round(v / scale, 6) for v in reference.values()}) == len(reference)


@pytest.mark.parametrize("mbs", [2, 1], ids=["rules", "microbatch"])
@pytest.mark.parametrize("case", ["layernorm-gelu-bias-untied", "rmsnorm-swiglu-nobias-tied-recompute"])
def test_efficiency_and_sgd_identities(megatron_world, case, mbs):
    shape = case_shape(case, torch.float64)
    result = run_case(shape, n_micro=3, mbs=mbs, steps=3, lr=0.5, seed=11)
    assert result["paths"] == ["rules" if mbs > 1 else "microbatch"] * 3
    for total, batch_dot, _ in result["efficiency"]:
        assert total == pytest.approx(batch_dot, rel=1e-9, abs=1e-12)
    for total_value, weight_change in result["sgd"]:
        assert total_value == pytest.approx(weight_change, rel=1e-9, abs=1e-12)
    # phi accumulates lr * raw over the steps (each sample id is trained on once here).
    values = result["values"]
    for step_raw in result["raw"]:
        for sid, raw in step_raw.items():
            assert values[sid] == pytest.approx(0.5 * raw, rel=1e-12)


def _max_relative_error(ours: dict[int, float], reference: dict[int, float]) -> float:
    assert sorted(ours) == sorted(reference)
    scale = max(abs(v) for v in reference.values())
    return max(abs(ours[sid] - reference[sid]) for sid in reference) / scale


@pytest.mark.parametrize("mbs", [3, 1], ids=["mbs3-rules", "mbs1-microbatch"])
def test_per_token_loss_scores_match_brute_force(megatron_world, mbs):
    """megatron's ``calculate_per_token_loss=True`` (docs/DESIGN.md §1.1): a sample's loss term is its
    masked token-loss sum over the token count of the whole global batch, which megatron's
    finalize_model_grads divides the gradients by at the end of the step. Every step's scores
    match brute force per sample, on both paths, with SGD through megatron DDP and optimizer; the
    efficiency and SGD identities hold; the records' token counts sum to the divisor; and the
    default normalisation's brute force (a divisor per microbatch) is far off, so a wrong divisor fails."""
    from inrun_megatron.megatron.model import GPTShape

    shape = GPTShape(
        num_layers=2,
        params_dtype=torch.float64,
        extra_config={"calculate_per_token_loss": True},
        **CASES["layernorm-swiglu-bias-tied-rope"],
    )
    options = dict(n_micro=6 // mbs, mbs=mbs, seed=13)
    result = run_case(shape, steps=2, lr=0.5, ddp={}, record_weights=True, **options)
    assert result["paths"] == ["rules" if mbs > 1 else "microbatch"] * 2
    reference = brute_force_scores(shape, result, **options)
    default_shape = case_shape("layernorm-swiglu-bias-tied-rope")
    per_microbatch = brute_force_scores(default_shape, result, **options)  # the wrong divisor
    for step, (ours, ref, wrong) in enumerate(zip(result["raw"], reference, per_microbatch)):
        error = _max_relative_error(ours, ref)
        print(f"per-token loss, {mbs=}, step {step}: max relative error vs brute force {error:.2e}")
        assert error <= EXACTNESS[torch.float64]
        assert _max_relative_error(ours, wrong) > 1e3 * EXACTNESS[torch.float64]
        data = make_data(shape, options["n_micro"], mbs, options["seed"] + 100 + step, first_id=1000 * step)
        assert sum(result["n_tokens"][step].values()) == sum(float(b["loss_mask"].sum()) for b in data)
    for total, batch_dot, _ in result["efficiency"]:
        assert total == pytest.approx(batch_dot, rel=1e-9, abs=1e-12)
    for total_value, weight_change in result["sgd"]:
        assert total_value == pytest.approx(weight_change, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mbs", [2, 1], ids=["rules", "microbatch"])
@pytest.mark.parametrize("case", list(CASES))
def test_scoring_changes_no_loss_gradient_or_weight(megatron_world, case, mbs):
    from inrun_megatron.megatron.model import GPTShape

    shape = GPTShape(num_layers=2, dropout=0.2, **CASES[case])  # dropout: RNG must be untouched
    plain = run_case(shape, n_micro=2, mbs=mbs, steps=3, lr=0.3, seed=7, scored=False)
    scored = run_case(shape, n_micro=2, mbs=mbs, steps=3, lr=0.3, seed=7, scored=True)
    assert plain["losses"] == scored["losses"]
    for name, w in plain["weights"].items():
        assert torch.equal(w, scored["weights"][name]), name


@pytest.mark.parametrize("mbs", [2, 1], ids=["rules", "microbatch"])
def test_several_targets_are_scored_separately(megatron_world, mbs):
    """Each named validation set gets its own G and scores, equal to a run scored on it alone
    (on the microbatch-gradient path: all targets' G stacked, one matrix-vector product)."""

    from inrun_megatron.megatron.model import build_gpt

    shape = case_shape("layernorm-gelu-bias-untied", torch.float64)
    model = build_gpt(shape)
    load_canonical_weights(model, seed=4)
    train = make_data(shape, 4 // mbs, mbs, seed=8)
    targets = {"web": make_data(shape, 1, 2, seed=9), "code": make_data(shape, 2, 1, seed=10)}

    def scores(validation):
        c = score_one_step(model, shape, train, validation)[1].columns
        for p in model.parameters():
            p.grad = None
        return {(t, s): r for t, s, r in zip(c["target"], c["sample_id"].tolist(), c["raw"].tolist())}

    both = scores(targets)
    alone = {**scores({"web": targets["web"]}), **scores({"code": targets["code"]})}
    assert sorted(both) == sorted(alone) and len(both) == 8
    for key, value in alone.items():
        assert both[key] == pytest.approx(value, rel=1e-12, abs=1e-15)
    assert both[("web", 0)] != pytest.approx(both[("code", 0)], rel=1e-3)


class _LiveSavedBytes:
    """Peak bytes of tensors autograd holds for backward (a proxy for activation memory): each
    saved tensor counts from when it is saved until its graph node releases it."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor) -> object:
        return _Held(t, self)

    @staticmethod
    def unpack(held: object) -> torch.Tensor:
        return held.tensor


class _Held:
    def __init__(self, tensor: torch.Tensor, meter: _LiveSavedBytes):
        self.tensor, self.meter, self.bytes = tensor, meter, tensor.numel() * tensor.element_size()
        meter.live += self.bytes
        meter.peak = max(meter.peak, meter.live)

    def __del__(self):
        self.meter.live -= self.bytes


@pytest.mark.parametrize(
    "recompute",
    [dict(recompute=True), dict(extra_config={"recompute_granularity": "selective"})],
    ids=["full", "core-attention"],
)
def test_validation_pass_keeps_activation_recomputation(megatron_world, recompute):
    """megatron recomputes only in training mode; the validation pass (eval mode: no dropout) must
    still recompute, or it holds every activation that recomputation was switched on to avoid."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.megatron.model import GPTShape, build_gpt

    def validation_pass_peak(**options) -> int:
        shape = GPTShape(num_layers=4, seq_length=128, **options)
        model = build_gpt(shape)
        load_canonical_weights(model, seed=2)
        scorer = MegatronScorer(model, make_data(shape, 2, 2, seed=3, first_id=10**6))
        meter = _LiveSavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            scorer.validation_pass(get_forward_backward_func(), forward_step_func=forward_step, model=model)
        scorer.detach()
        return meter.peak

    plain, recomputed = validation_pass_peak(), validation_pass_peak(**recompute)
    print(f"validation pass, peak saved activations: {plain} bytes plain, {recomputed} with recomputation")
    assert recomputed < 0.6 * plain


def test_process_groups_passed_explicitly_reach_both_passes(megatron_world):
    """A caller's ProcessGroupCollection is what the scorer reduces over and what both the
    validation and the training pass get from forward_backward_func; the scores are those of the
    global groups (the same groups here), a collection that disagrees is refused before any work."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.process_groups_config import ProcessGroupCollection

    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.megatron.model import GPTShape, build_gpt

    shape = GPTShape(num_layers=2)
    model = build_gpt(shape)
    load_canonical_weights(model, seed=4)
    train, validation = make_data(shape, 2, 2, seed=5), make_data(shape, 1, 2, seed=6, first_id=10**6)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    seen = []

    def forward_backward(**kwargs):
        seen.append(kwargs.get("pg_collection"))
        return get_forward_backward_func()(**kwargs)

    kwargs = dict(forward_step_func=forward_step, model=model, num_microbatches=2, seq_length=shape.seq_length)
    scorer = MegatronScorer(model, validation, pg_collection=groups)
    assert all(getattr(scorer.process_groups, name) is getattr(groups, name) for name in ("tp", "pp", "dp", "embd"))
    scorer.forward_backward(
        forward_backward, data_iterator=iter(train), micro_batch_size=2, pg_collection=groups, **kwargs
    )
    ours = scorer.end_step(lr=1.0).records
    other = ProcessGroupCollection(
        **{name: getattr(groups, name) for name in ("pp", "mp", "cp", "dp", "dp_cp", "embd")}
    )
    other.tp = dist.new_group([0])
    with pytest.raises(ValueError, match=r"whose tp group\(s\) differ"):
        scorer.forward_backward(
            forward_backward, data_iterator=iter(train), micro_batch_size=2, pg_collection=other, **kwargs
        )
    scorer.detach()
    assert seen == [groups, groups], "the validation pass and the training pass both got the caller's groups"
    model.zero_grad()
    _, default = score_one_step(model, shape, train, validation)
    assert torch.equal(torch.as_tensor(ours.columns["raw"]), torch.as_tensor(default.columns["raw"]))
    with pytest.raises(ValueError, match="pg_collection has no tp"):
        MegatronScorer(model, validation, pg_collection=ProcessGroupCollection(pp=groups.pp))
