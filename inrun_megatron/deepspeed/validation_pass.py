"""The validation pass under DeepSpeed (``docs/DESIGN.md`` §2.1, §2.5): ``G_t`` without touching ZeRO.

For each target, every (local) validation batch goes forward through the *bare* module
(``engine.module``, not ``engine``: the engine's forward would arm its backward prologue and
gradient-accumulation scaling) in eval mode, with every RNG state restored afterwards. The
backward is ``torch.autograd.grad(loss, params)``: autograd hands each parameter's gradient to
the caller instead of running its ``AccumulateGrad`` node, so ``.grad`` is never written and no
ZeRO gradient hook (``register_post_accumulate_grad_hook``) fires; ZeRO's partitions, buckets and
micro-step counters see nothing. A hook on each parameter moves its gradient into the store the
moment it is computed and hands autograd a zero-stride placeholder, so autograd never holds a
complete set of full gradients (that matters under ZeRO-3).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from inrun_megatron.validation import evaluation_state, loss_mask_of

if TYPE_CHECKING:
    from inrun_megatron.deepspeed.scorer import DeepSpeedScorer


def _placeholder(grad: torch.Tensor) -> torch.Tensor:
    """A zero gradient of ``grad``'s shape that occupies one element."""
    return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)


def run_validation_pass(scorer: DeepSpeedScorer) -> dict[str, float]:
    """Fill ``scorer.grads`` with ``G`` of every target at the current weights; return the losses.

    fp16 models back-propagate the validation loss multiplied by DeepSpeed's current loss scale
    (so small gradients do not flush to zero in fp16) and divide it out in float32; should that
    overflow, the pass is repeated unscaled.
    """
    scale = scorer.fp16_loss_scale()
    losses = _validation_pass(scorer, scale)
    if not scorer.grads.all_finite(scorer.dp_group) and scale != 1.0:
        losses = _validation_pass(scorer, 1.0)
    bad = {name: v for name, v in losses.items() if not math.isfinite(v)}
    if bad or not scorer.grads.all_finite(scorer.dp_group):
        raise FloatingPointError(
            f"non-finite validation {'loss ' + str(bad) if bad else 'gradient'} at step {scorer.step}: no score"
            " was computed and the training state was left untouched; check the validation data and the"
            " model's numerics"
        )
    return losses


def _validation_pass(scorer: DeepSpeedScorer, scale: float) -> dict[str, float]:
    engine, store = scorer.engine, scorer.grads
    module = engine.module
    params = store.params()
    current = {"target": 0}

    def take(param: torch.nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        unscaled = grad.to(torch.promote_types(grad.dtype, torch.float32))
        store.accumulate(param, current["target"], unscaled / scale if scale != 1.0 else unscaled)
        return _placeholder(grad)

    store.zero_()
    loss_sums = []
    handles = [p.register_hook(lambda grad, p=p: take(p, grad)) for p in params]
    try:
        with evaluation_state(module):
            for k, target in enumerate(scorer.targets):
                current["target"] = k
                total = torch.zeros((), dtype=torch.float64, device=engine.device)
                for batch, weight in scorer.local_validation_batches(target):
                    losses = scorer.token_losses(module, batch)
                    mask = loss_mask_of(batch)
                    if losses.shape != mask.shape:
                        raise ValueError(
                            "token_losses(model, batch) must return the per-token losses [batch, seq]; got shape"
                            f" {tuple(losses.shape)} for a batch of {tuple(mask.shape)}"
                        )
                    losses = losses.to(torch.promote_types(losses.dtype, torch.float32))
                    loss_sum = (losses * mask.to(losses)).sum()
                    total += weight * loss_sum.detach().double()
                    torch.autograd.grad(loss_sum * (weight * scale / target.n_loss_tokens), params, allow_unused=True)
                loss_sums.append(total)
    finally:
        for handle in handles:
            handle.remove()
        scorer.release_gathered_parameters()
    store.finish(len(scorer.targets))
    losses = torch.stack(loss_sums)
    if scorer.config.validation_split == "split":
        dist.all_reduce(losses, group=scorer.dp_group)
    return {t.name: float(v) / t.n_loss_tokens for t, v in zip(scorer.targets, losses)}
