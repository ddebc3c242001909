"""Bad input gets a clear error, and leaves the model, the run and the records as they were."""

from __future__ import annotations

import pytest
import torch

import oracle
from common import (
    forward_step,
    load_canonical_weights,
    make_data,
    score_one_step,
    scored_forward_backward,
    token_losses,
)

pytestmark = pytest.mark.megatron


@pytest.fixture
def gpt(megatron_world):
    from inrun_megatron.megatron.model import GPTShape, build_gpt

    shape = GPTShape(num_layers=2)
    model = build_gpt(shape)
    load_canonical_weights(model, seed=1)
    return shape, model


def _no_hooks_left(model: torch.nn.Module) -> bool:
    from megatron.core.tensor_parallel.layers import LinearWithGradAccumulationAndAsyncCommunication as Fn

    from inrun_megatron import megatron_core_layers as layers

    hooks = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    hooks = hooks or any(p._backward_hooks for p in model.parameters())  # the microbatch path's tensor hooks
    tagged = any(hasattr(p, "_inrun_linear_site") for p in model.parameters())
    return not hooks and not tagged and Fn.backward is not layers._scored_linear_backward


@pytest.mark.parametrize(
    ("validation", "message"),
    [
        ([], "is empty"),
        ({}, "no validation target"),
        ("out-of-vocab", "outside the model's vocabulary"),
        ("masked-out", "no token with a nonzero loss mask"),
        ("ragged", "differs from batch 0"),
    ],
)
def test_bad_validation_set_is_refused_at_attach(gpt, validation, message):
    from inrun_megatron.megatron import MegatronScorer

    shape, model = gpt
    if isinstance(validation, str):
        batches = make_data(shape, 2, 2, seed=3)
        if validation == "out-of-vocab":
            batches[1]["labels"][0, 4] = shape.vocab_size
        elif validation == "masked-out":
            for b in batches:
                b["loss_mask"].zero_()
        else:
            batches[1] = make_data(shape, 1, 3, seed=4)[0]
        validation = batches
    with pytest.raises(ValueError, match=message):
        MegatronScorer(model, validation)
    assert _no_hooks_left(model)


class _ScaledNorm(torch.nn.Module):
    """A module no score rule covers: a norm followed by a trainable per-channel gain."""

    def __init__(self, norm: torch.nn.Module, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.norm = norm
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.gain


def _with_uncovered_module(shape, model):
    model.decoder.final_layernorm = _ScaledNorm(model.decoder.final_layernorm, shape.hidden_size, shape.params_dtype)
    return model


def test_unsupported_module_is_named_at_attach(gpt):
    """Where the per-layer rules are needed (micro-batch size > 1, or path='rules'), a module no rule
    covers is refused when attaching, naming it and saying that micro-batch size 1 would score it."""
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.megatron import MegatronScorer

    shape, model = gpt
    model = _with_uncovered_module(shape, model)
    validation = make_data(shape, 1, 2, seed=3)
    named = r"decoder\.final_layernorm.*_ScaledNorm.*gain.*micro_batch_size 1 the microbatch-gradient path"
    with pytest.raises(NotImplementedError, match=named):
        MegatronScorer(model, validation, micro_batch_size=2)
    assert _no_hooks_left(model)
    with pytest.raises(NotImplementedError, match=named):
        MegatronScorer(model, validation, ScoringConfig(path="rules"))
    assert _no_hooks_left(model)
    with pytest.raises(ValueError, match="one sequence's only with micro_batch_size 1, not 2"):
        MegatronScorer(model, validation, ScoringConfig(path="microbatch"), micro_batch_size=2)
    assert _no_hooks_left(model)
    # Without a micro-batch size the path is chosen per step: a step that needs the rules is refused
    # before any of its work (no forward step runs).
    scorer = MegatronScorer(model, validation)
    with pytest.raises(NotImplementedError, match=named):
        _counted_forward_steps(scorer, model, shape, calls := [])
    assert calls == [] and all(p.grad is None for p in model.parameters())
    scorer.detach()
    assert _no_hooks_left(model)
    model.decoder.final_layernorm.gain.requires_grad_(False)  # frozen parameters need no rule
    MegatronScorer(model, validation, micro_batch_size=2).detach()
    assert _no_hooks_left(model)


def test_uncovered_module_is_scored_at_micro_batch_size_1(megatron_world):
    """The microbatch-gradient path scores any trainable module: against brute force in float64."""
    from inrun_megatron.megatron.model import GPTShape, build_gpt

    shape = GPTShape(num_layers=2, params_dtype=torch.float64)
    model = _with_uncovered_module(shape, build_gpt(shape))
    load_canonical_weights(model, seed=1)
    train = make_data(shape, 3, 1, seed=5)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    records = score_one_step(model, shape, train, validation)[1]
    ours = dict(zip(records.columns["sample_id"].tolist(), records.columns["raw"].tolist()))
    for p in model.parameters():
        p.grad = None
    g_val = oracle.validation_gradient(model, validation, token_losses)
    reference = oracle.per_sample_raw(model, train, token_losses, g_val)
    gain = "decoder.final_layernorm.gain"
    gain_part = oracle.per_sample_raw(
        model, train, token_losses, g_val, combine=lambda g, g_v: float((g[gain] * g_v[gain]).sum())
    )
    scale = max(abs(v) for v in reference.values())
    assert sorted(ours) == sorted(reference)
    assert max(abs(ours[sid] - reference[sid]) for sid in reference) <= 1e-9 * scale
    assert min(abs(v) for v in gain_part.values()) > 1e-3 * scale  # the uncovered module's part matters


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"num_moe_experts": 4}, "mixture-of-experts"),
        ({"mtp_num_layers": 1}, "multi-token prediction"),
        ({"fp8": "hybrid"}, "fp8"),
    ],
)
def test_unsupported_training_setup_is_refused_at_attach(gpt, setting, message):
    """Setups whose scores would be wrong are named when attaching (read from the model's config)."""
    from inrun_megatron.megatron import MegatronScorer

    shape, model = gpt
    saved = {name: getattr(model.config, name) for name in setting}
    for name, value in setting.items():
        setattr(model.config, name, value)
    try:
        with pytest.raises(NotImplementedError, match=f"does not support {message}"):
            MegatronScorer(model, make_data(shape, 1, 2, seed=3))
    finally:
        for name, value in saved.items():
            setattr(model.config, name, value)
    assert _no_hooks_left(model)


@pytest.mark.parametrize("setting", ["defer_embedding_wgrad_compute", "delay_wgrad_compute"])
def test_deferred_weight_gradients_are_refused_on_the_microbatch_path(gpt, setting):
    """Weight gradients computed after later microbatches' backward cannot be read per microbatch;
    the per-layer rules do not need them."""
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.megatron import MegatronScorer

    shape, model = gpt
    validation = make_data(shape, 1, 2, seed=3)
    setattr(model.config, setting, True)
    try:
        with pytest.raises(NotImplementedError, match=f"{setting}=True moves after"):
            MegatronScorer(model, validation, micro_batch_size=1)
        assert _no_hooks_left(model)
        MegatronScorer(model, validation, ScoringConfig(path="rules"), micro_batch_size=1).detach()
    finally:
        setattr(model.config, setting, False)
    assert _no_hooks_left(model)


def test_per_token_loss_without_gradient_finalisation_is_refused_before_any_work(gpt):
    """Under calculate_per_token_loss only megatron's finalize_model_grads divides the gradients by
    the global batch's token count (docs/DESIGN.md §2.4); without it they are unnormalised sums."""
    from inrun_megatron.megatron import MegatronScorer

    shape, model = gpt
    model.config.calculate_per_token_loss = True
    scorer = MegatronScorer(model, make_data(shape, 1, 2, seed=3, first_id=10**6))
    try:
        weights_before, grads_before = _state(model)
        with pytest.raises(ValueError, match="no finalize_model_grads_func"):
            _counted_forward_steps(scorer, model, shape, calls := [])
        assert calls == []  # not even the validation pass ran
        weights_after, grads_after = _state(model)
        assert all(torch.equal(weights_before[n], weights_after[n]) for n in weights_before)
        assert grads_after == grads_before
    finally:
        model.config.calculate_per_token_loss = False
        scorer.detach()
    assert _no_hooks_left(model)


def test_untested_megatron_version_is_refused():
    from inrun_megatron.megatron import check_megatron_version

    with pytest.raises(RuntimeError, match=r"tested with megatron-core 0\.16\.x, 0\.19\.x; megatron-core 0\.15\.2"):
        check_megatron_version(version="0.15.2")
    check_megatron_version(version="0.19.7")
    check_megatron_version(allow_untested=True, version="0.20.0")


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}, {
        n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("problem", ["missing", "duplicated"])
def test_bad_sample_ids_record_nothing_and_the_next_step_works(gpt, problem):
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.step_result import MemorySink

    shape, model = gpt
    in_memory = ScoringConfig(accumulate_values=True)  # so that "nothing" is observable
    sink = MemorySink()
    scorer = MegatronScorer(model, make_data(shape, 1, 2, seed=3, first_id=10**6), in_memory, sink=sink)
    data = make_data(shape, 2, 2, seed=5)
    if problem == "missing":
        del data[1]["sample_ids"]
        message = "no sample id for microbatch 1"
    else:
        data[1]["sample_ids"] = data[0]["sample_ids"].clone()
        message = r"sample ids \[0, 1\] occur more than once"
    weights_before, _ = _state(model)
    with pytest.raises(ValueError, match=message):
        scored_forward_backward(scorer, model, shape, data)
    assert sink.results == [] and scorer.step == 0 and scorer.values() == {}
    weights_after, _ = _state(model)
    assert all(torch.equal(weights_before[n], weights_after[n]) for n in weights_before)
    for p in model.parameters():
        p.grad = None
    scored_forward_backward(scorer, model, shape, make_data(shape, 2, 2, seed=6))
    result = scorer.end_step(lr=0.1)
    assert len(result.records) == 4 and sink.results == [result]
    scorer.detach()


def test_non_finite_validation_loss_stops_before_training(gpt):
    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.step_result import MemorySink

    shape, model = gpt
    sink = MemorySink()
    scorer = MegatronScorer(model, make_data(shape, 1, 2, seed=3, first_id=10**6), sink=sink)
    with torch.no_grad():
        model.output_layer.weight[3, 0] = float("nan")
    weights_before, grads_before = _state(model)
    with pytest.raises(FloatingPointError, match="non-finite validation loss"):
        _counted_forward_steps(scorer, model, shape, calls := [])
    weights_after, grads_after = _state(model)
    assert all(
        torch.allclose(weights_before[n], weights_after[n], rtol=0, atol=0, equal_nan=True) for n in weights_before
    )
    assert grads_after == grads_before  # all None: the validation gradient left no trace
    assert len(calls) == 1  # only the validation microbatch ran; no training microbatch did
    assert sink.results == [] and scorer.step == 0
    scorer.detach()


def test_end_step_needs_a_scored_step(gpt):
    from inrun_megatron.megatron import MegatronScorer

    shape, model = gpt
    scorer = MegatronScorer(model, make_data(shape, 1, 2, seed=3))
    with pytest.raises(RuntimeError, match="needs a scored forward/backward"):
        scorer.end_step(lr=0.1)
    scorer.detach()


def _counted_forward_steps(scorer, model, shape, calls: list) -> None:
    """A scored step of two microbatches of 2 sequences, appending to ``calls`` for every forward step run."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def counting_step(data_iterator, model):
        calls.append(1)
        return forward_step(data_iterator, model)

    scorer.forward_backward(
        get_forward_backward_func(),
        forward_step_func=counting_step,
        data_iterator=iter(make_data(shape, 2, 2, seed=5)),
        model=model,
        num_microbatches=2,
        seq_length=shape.seq_length,
        micro_batch_size=2,
    )
