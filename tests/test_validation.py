"""The framework-independent validation pass and its helpers."""

from __future__ import annotations

import contextlib

import pytest
import torch

from inrun_megatron.validation import GradientStore, ValidationTarget, all_finite, loss_mask_of, masked_loss_sum
from inrun_megatron.validation_pass import run_validation_pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_finds_any_inf_or_nan_and_accepts_sums_that_overflow(dtype):
    big = torch.finfo(dtype).max
    tensors = [torch.randn(3, 5).to(dtype), torch.randn(7).to(dtype)]
    assert all_finite(tensors) and all_finite([])
    for bad in (float("inf"), float("-inf"), float("nan")):
        broken = [t.clone() for t in tensors]
        broken[1][4] = bad
        assert not all_finite(broken)
    # every element finite, but their sum overflows: still finite
    assert all_finite([torch.full((4,), big, dtype=dtype), torch.full((2,), -big, dtype=dtype)])
    # an inf and a -inf, whose sum is NaN, in different tensors
    assert not all_finite([torch.tensor([float("inf")], dtype=dtype), torch.tensor([float("-inf")], dtype=dtype)])


class _Fp16LinearBackward:
    """A real :class:`~inrun_megatron.validation_pass.TargetBackward`: one fp16 linear layer whose
    per-token losses are its outputs, recording the loss scale of every attempt."""

    def __init__(self, inputs: torch.Tensor, store: GradientStore, layer: torch.nn.Linear):
        self.inputs, self.store, self.layer = inputs, store, layer
        self.scales: list[float] = []

    def isolated(self, loss_scale: float):
        self.scales.append(loss_scale)
        return contextlib.nullcontext()

    def backward_target(self, k: int, target: ValidationTarget, loss_scale: float) -> torch.Tensor:
        token_losses = self.layer(self.inputs).reshape(1, -1)
        loss_sum = masked_loss_sum(token_losses, loss_mask_of(target.batches[0]), source="the test layer")
        (grad,) = torch.autograd.grad(loss_sum * (loss_scale / target.n_loss_tokens), [self.layer.weight])
        self.store[self.layer.weight][k].add_(grad)
        return loss_sum.detach().double()

    def complete_gradients(self) -> None:
        pass


def _validation_pass_of_fp16_layer(inputs: torch.Tensor, loss_scale: float) -> tuple[dict, GradientStore, list]:
    layer = torch.nn.Linear(inputs.shape[-1], 1, bias=False).half()
    torch.nn.init.ones_(layer.weight)
    ids = torch.zeros(1, inputs.shape[0], dtype=torch.long)
    target = ValidationTarget("validation", [{"tokens": ids, "labels": ids, "loss_mask": torch.ones(1, ids.shape[1])}])
    store = GradientStore([layer.weight], 1)
    backward = _Fp16LinearBackward(inputs.half(), store, layer)
    try:
        losses = run_validation_pass([target], store, backward, loss_scale=loss_scale, loss_groups=[], step=7)
    except FloatingPointError as error:
        return {"error": str(error)}, store, backward.scales
    return losses, store, backward.scales


def test_validation_pass_shrinks_an_overflowing_loss_scale_by_8_until_g_is_finite():
    """G of one token of 100s is 100 per weight: at a loss scale of 2^12 its fp16 gradient (409600)
    overflows, at 2^9 (51200) it fits; the pass keeps the first scale that fits and removes it."""
    losses, store, scales = _validation_pass_of_fp16_layer(torch.full((1, 4), 100.0), loss_scale=2.0**12)
    assert scales == [2.0**12, 2.0**9]
    assert torch.equal(store.values()[0], torch.full((1, 1, 4), 100.0))
    assert losses == {"validation": 400.0}


def test_validation_pass_that_is_not_finite_unscaled_stops_the_step():
    inputs = torch.full((1, 4), 1.0)
    inputs[0, 2] = float("nan")
    result, _, scales = _validation_pass_of_fp16_layer(inputs, loss_scale=2.0**12)
    assert scales == [2.0**12, 2.0**9, 2.0**6, 2.0**3, 1.0], "shrunk by 8 down to 1, never below"
    assert "non-finite validation loss or gradient" in result["error"] and "step 7" in result["error"]


def test_masked_loss_sum_refuses_losses_that_are_not_per_token_and_never_sums_in_half_precision():
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    losses = torch.tensor([[1.0, 1000.0, 2.0]], dtype=torch.float16)
    total = masked_loss_sum(losses, mask, source="the test")
    assert total.dtype == torch.float32 and float(total) == 3.0
    with pytest.raises(ValueError, match=r"the test must return the per-token losses \[batch, seq\]"):
        masked_loss_sum(losses.sum(-1), mask, source="the test")
