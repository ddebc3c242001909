"""The validation pass every adapter runs (``docs/DESIGN.md`` §2.1): ``G_t`` at the step's weights.

Framework independent. The skeleton is the same for every framework: back-propagate each
target's validation loss at the training run's loss scale, complete and unscale ``G``, agree on
all ranks whether it is finite, and repeat at a smaller scale if not. An adapter supplies only
what differs, a :class:`TargetBackward`: how one target's validation loss goes backward on this
rank without touching the training state, and where its gradient goes.

**Loss scale rule** (fp16 loss scaling, one rule for every adapter). The pass starts at the
training run's current loss scale, so that the small gradients of a long validation set do not
flush to zero in fp16. If any rank's validation loss or ``G`` is not finite, every rank repeats the
pass at 1/:data:`RESCALE_ON_OVERFLOW` of the scale, never below 1, until it is finite: a validation
set whose gradient is much larger than the training batch's (few loss tokens) overflows at a scale
the training pass survives, and shrinking geometrically keeps as much of the scale as fits. A pass
that is not finite at scale 1 stops the step before any training microbatch runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist

from inrun_megatron.distributed import collective_device
from inrun_megatron.validation import GradientStore, ValidationTarget, all_finite

#: Factor by which the loss scale shrinks when the validation pass is not finite.
RESCALE_ON_OVERFLOW = 8.0


class TargetBackward(Protocol):
    """What an adapter supplies to :func:`run_validation_pass`."""

    def isolated(self, loss_scale: float) -> contextlib.AbstractContextManager[None]:
        """Around one attempt's backward passes: whatever keeps the training state (gradient
        buffers, RNG streams, data-parallel hooks, dropout) exactly as it was."""

    def backward_target(self, k: int, target: ValidationTarget, loss_scale: float) -> torch.Tensor:
        """Back-propagate ``loss_scale`` times target ``k``'s validation loss (this rank's share of
        it) and add the gradient, still multiplied by ``loss_scale``, to row ``k`` of the store.
        Returns this rank's masked loss sum (a float64 scalar; zero on ranks that hold no loss)."""

    def complete_gradients(self) -> None:
        """After every target: turn this rank's partial ``G`` into the full ``G`` of each locally
        held shard (the reductions the framework applies to training gradients)."""


def run_validation_pass(
    targets: Sequence[ValidationTarget],
    store: GradientStore,
    backward: TargetBackward,
    *,
    loss_scale: float,
    loss_groups: Sequence[dist.ProcessGroup | None],
    step: int,
) -> dict[str, float]:
    """Fill ``store`` with ``G`` of every target at the current weights; return each target's loss.

    ``loss_scale``: the training run's current loss scale (1.0 without fp16 loss scaling);
    ``loss_groups``: the groups over which the ranks' loss sums add up to the whole validation loss
    (the pipeline group, whose last stage holds the loss; the data-parallel group for a split
    validation set); ``step``: named in the error. Raises ``FloatingPointError`` on every rank if
    the pass is not finite even unscaled.
    """
    while True:
        losses = _attempt(targets, store, backward, loss_scale, loss_groups)
        finite = _finite_everywhere(losses, store)
        if finite or loss_scale == 1.0:
            break
        loss_scale = max(loss_scale / RESCALE_ON_OVERFLOW, 1.0)
    result = {t.name: float(v) / t.n_loss_tokens for t, v in zip(targets, losses)}
    if not finite:
        raise FloatingPointError(
            f"non-finite validation loss or gradient (losses {result}) at step {step}: no score was computed and"
            " the training state was left untouched; check the validation data and the model's numerics"
        )
    return result


def _attempt(
    targets: Sequence[ValidationTarget],
    store: GradientStore,
    backward: TargetBackward,
    loss_scale: float,
    loss_groups: Sequence[dist.ProcessGroup | None],
) -> torch.Tensor:
    """One validation pass at ``loss_scale``; returns each target's loss sum over every rank."""
    store.zero_()
    with backward.isolated(loss_scale):
        sums = [backward.backward_target(k, target, loss_scale) for k, target in enumerate(targets)]
    backward.complete_gradients()
    if loss_scale != 1.0:
        for g in store.values():
            g.div_(loss_scale)
    losses = torch.stack([s.to(torch.float64) for s in sums])
    for group in loss_groups:
        losses = losses.to(collective_device(group))  # ranks without the loss hold CPU zeros
        dist.all_reduce(losses, group=group)
    return losses


def _finite_everywhere(losses: torch.Tensor, store: GradientStore) -> bool:
    """Whether the losses and ``G`` are finite on every rank (one collective, so all ranks agree)."""
    finite = bool(torch.isfinite(losses).all()) and all_finite(store.values())
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return finite
    bad = torch.tensor(0.0 if finite else 1.0, device=collective_device())
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad)
