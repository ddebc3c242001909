"""Bad input gets a clear error, and leaves the model, the run and the records as they were."""

from __future__ import annotations

import pytest
import torch

from common import forward_step, load_canonical_weights, make_data, scored_forward_backward

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

    from inrun_megatron.megatron import layers

    hooks = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
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


def test_unsupported_module_is_named_at_attach(gpt):
    from inrun_megatron.megatron import MegatronScorer

    shape, model = gpt

    class Adapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(shape.hidden_size))

    model.decoder.layers[1].adapter = Adapter()
    with pytest.raises(NotImplementedError, match=r"decoder\.layers\.1\.adapter.*Adapter.*scale"):
        MegatronScorer(model, make_data(shape, 1, 2, seed=3))
    assert _no_hooks_left(model)
    model.decoder.layers[1].adapter.scale.requires_grad_(False)  # frozen parameters need no rule
    MegatronScorer(model, make_data(shape, 1, 2, seed=3)).detach()
    assert _no_hooks_left(model)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"num_moe_experts": 4}, "mixture-of-experts"),
        ({"mtp_num_layers": 1}, "multi-token prediction"),
        ({"calculate_per_token_loss": True}, "calculate_per_token_loss"),
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

    shape, model = gpt
    in_memory = ScoringConfig(keep_records=True, accumulate_values=True)  # so that "nothing" is observable
    scorer = MegatronScorer(model, make_data(shape, 1, 2, seed=3, first_id=10**6), in_memory)
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
    assert scorer.records == [] and scorer.step == 0 and scorer.values() == {}
    weights_after, _ = _state(model)
    assert all(torch.equal(weights_before[n], weights_after[n]) for n in weights_before)
    for p in model.parameters():
        p.grad = None
    scored_forward_backward(scorer, model, shape, make_data(shape, 2, 2, seed=6))
    assert len(scorer.end_step(lr=0.1)) == 4
    scorer.detach()


def test_non_finite_validation_loss_stops_before_training(gpt):
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.megatron import MegatronScorer

    shape, model = gpt
    scorer = MegatronScorer(model, make_data(shape, 1, 2, seed=3, first_id=10**6), ScoringConfig(keep_records=True))
    with torch.no_grad():
        model.output_layer.weight[3, 0] = float("nan")
    weights_before, grads_before = _state(model)
    calls = []

    def counting_step(data_iterator, model):
        calls.append(1)
        return forward_step(data_iterator, model)

    from megatron.core.pipeline_parallel import get_forward_backward_func

    with pytest.raises(FloatingPointError, match="non-finite validation loss"):
        scorer.forward_backward(
            get_forward_backward_func(),
            forward_step_func=counting_step,
            data_iterator=iter(make_data(shape, 2, 2, seed=5)),
            model=model,
            num_microbatches=2,
            seq_length=shape.seq_length,
            micro_batch_size=2,
        )
    weights_after, grads_after = _state(model)
    assert all(
        torch.allclose(weights_before[n], weights_after[n], rtol=0, atol=0, equal_nan=True) for n in weights_before
    )
    assert grads_after == grads_before  # all None: the validation gradient left no trace
    assert len(calls) == 1  # only the validation microbatch ran; no training microbatch did
    assert scorer.records == [] and scorer.step == 0
    scorer.detach()


def test_end_step_needs_a_scored_step(gpt):
    from inrun_megatron.megatron import MegatronScorer

    shape, model = gpt
    scorer = MegatronScorer(model, make_data(shape, 1, 2, seed=3))
    with pytest.raises(RuntimeError, match="needs a scored forward/backward"):
        scorer.end_step(lr=0.1)
    scorer.detach()
