"""The DeepSpeed side of the validation pass (``docs/DESIGN.md`` §2.1, §2.5): one target's backward
without touching ZeRO.

The skeleton (loss scale, finite check on all ranks, retry) is
:func:`inrun_megatron.validation_pass.run_validation_pass`; :class:`DeepSpeedTargetBackward`
supplies what is DeepSpeed's. Every (local) validation batch goes forward through the *bare*
module (``engine.module``, not ``engine``: the engine's forward would arm its backward prologue
and gradient-accumulation scaling) in eval mode, with every RNG state restored afterwards. The
backward is ``torch.autograd.grad(loss, params)``: autograd hands each parameter's gradient to the
caller instead of running its ``AccumulateGrad`` node, so ``.grad`` is never written and no ZeRO
gradient hook (``register_post_accumulate_grad_hook``) fires; ZeRO's partitions, buckets and
micro-step counters see nothing. A hook on each parameter moves its gradient into the store the
moment it is computed and hands autograd a zero-stride placeholder, so autograd never holds a
complete set of full gradients (that matters under ZeRO-3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from inrun_megatron.deepspeed.gradients import ValidationGradients
from inrun_megatron.validation import Batch, ValidationTarget, evaluation_state, loss_mask_of, masked_loss_sum

TokenLosses = Callable[[torch.nn.Module, Batch], torch.Tensor]


def _placeholder(grad: torch.Tensor) -> torch.Tensor:
    """A zero gradient of ``grad``'s shape that occupies one element."""
    return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)


@contextlib.contextmanager
def gradients_discarded(params: Sequence[torch.nn.Parameter], release_parameters: Callable[[], None]) -> Iterator[None]:
    """A backward through ``torch.autograd.grad`` that scores but keeps no gradient: each parameter's
    gradient is replaced by a placeholder once the hooks registered before (the scorer's) have seen
    it, so autograd never holds a complete set of full gradients; ``release_parameters`` runs
    afterwards (the curvature pass's replay, ``docs/DESIGN.md`` §2.10)."""
    handles = [p.register_hook(_placeholder) for p in params]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        release_parameters()


class DeepSpeedTargetBackward:
    """One target's validation backward through the bare module (a
    :class:`~inrun_megatron.validation_pass.TargetBackward`).

    Args:
        module: the engine's bare module (``engine.module``).
        store: where ``G`` goes (dense under ZeRO-0/1/2, partitioned under ZeRO-3).
        token_losses: ``token_losses(module, batch) -> [b, s]`` per-token losses.
        batches: this rank's validation batches of each target with their weights in its loss
            (weight 0: a repeated batch that only keeps ZeRO-3's collectives in step).
        release_parameters: called after each attempt (ZeRO-3: re-partition parameters a
            gradient-free input left gathered).
    """

    def __init__(
        self,
        *,
        module: torch.nn.Module,
        store: ValidationGradients,
        token_losses: TokenLosses,
        batches: Sequence[list[tuple[Batch, float]]],
        release_parameters: Callable[[], None],
    ):
        self.module = module
        self.store = store
        self.token_losses = token_losses
        self.batches = batches
        self.release_parameters = release_parameters
        self._target = 0

    def _take(self, param: torch.nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        self.store.accumulate(param, self._target, grad.to(torch.promote_types(grad.dtype, torch.float32)))
        return _placeholder(grad)

    @contextlib.contextmanager
    def isolated(self, loss_scale: float) -> Iterator[None]:
        """Eval mode and saved RNG; the gradient of every parameter caught by a hook."""
        handles = [p.register_hook(lambda grad, p=p: self._take(p, grad)) for p in self.store.params()]
        try:
            with evaluation_state(self.module):
                yield
        finally:
            for handle in handles:
                handle.remove()
            self.release_parameters()

    def backward_target(self, k: int, target: ValidationTarget, loss_scale: float) -> torch.Tensor:
        self._target = k
        params = self.store.params()
        sums = []
        for batch, weight in self.batches[k]:
            source = "token_losses(model, batch)"
            loss_sum = masked_loss_sum(self.token_losses(self.module, batch), loss_mask_of(batch), source=source)
            sums.append(weight * loss_sum.detach().double())
            torch.autograd.grad(loss_sum * (weight * loss_scale / target.n_loss_tokens), params, allow_unused=True)
        return torch.stack(sums).sum()

    def complete_gradients(self) -> None:
        # only the targets' rows of G; rows after them (docs/DESIGN.md §1.5) are filled from these
        self.store.finish(len(self.batches))
