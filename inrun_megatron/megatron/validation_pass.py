"""The Megatron side of the validation pass (``docs/DESIGN.md`` §2.1): one target's backward.

The skeleton (loss scale, finite check on all ranks, retry) is
:func:`inrun_megatron.validation_pass.run_validation_pass`; :class:`MegatronTargetBackward`
supplies what is Megatron's. It runs the user's forward step on the validation batches through the
same ``forward_backward_func`` with the caller's schedule arguments (so pipeline schedules and the
caller's process groups apply), with

* the model in eval mode and every RNG state restored afterwards (no dropout, and the
  training pass draws exactly the random numbers it would draw without scoring);
* megatron DDP's gradient synchronisation held off (no DP all-reduce: a replicated validation
  set needs none, a split one is reduced once, by us, on ``G`` itself);
* a loss whose gradient is exactly the validation loss ``sum(mask * CE) / N_val_tokens``, scaled
  by the pass's loss scale through megatron's own ``grad_scale_func``;

then moves the gradients into the store and clears the gradient buffers, leaving them as they
were before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.distributed import DistributedDataParallel
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import get_model_config

from inrun_megatron.validation import (
    Batch,
    GradientStore,
    ValidationTarget,
    evaluation_state,
    loss_mask_of,
    masked_loss_sum,
)

#: ``forward_backward_func`` arguments the validation pass sets itself; every other argument of the
#: caller's (``pg_collection``, ``p2p_communicator``, ``adjust_tensor_shapes_fn``, ...) is passed on.
SET_BY_VALIDATION_PASS = frozenset(
    {
        "forward_step_func",
        "data_iterator",
        "num_microbatches",
        "seq_length",
        "micro_batch_size",
        "decoder_seq_length",
        "forward_only",
        "collect_non_loss_data",
        "first_val_step",
    }
)


class _OneBatch(Iterator):
    """The data iterator handed to the user's forward step: yields one given batch."""

    def __init__(self, batch: Batch):
        self.batch = batch

    def __next__(self) -> Batch:
        return self.batch


def _validation_loss(output_tensor: torch.Tensor, *, mask: torch.Tensor, scale: float, sums: list):
    """Loss of one validation microbatch, pre-multiplied to undo the schedule's averaging.

    Returned as a 2-tuple, megatron divides it by the number of microbatches (times the
    context-parallel size, which is 1 here), so the gradient that reaches the parameters is
    exactly that of ``sum(mask * CE) / N_val_tokens``.
    """
    source = "the forward step (the model's per-token loss: GPTModel called with labels)"
    loss_sum = masked_loss_sum(output_tensor, mask, source=source)
    sums.append(loss_sum.detach())
    return loss_sum * scale, {"validation loss sum": loss_sum.detach()}


def ddp_chunks(chunks: Sequence[torch.nn.Module]) -> list[DistributedDataParallel]:
    return [c for c in chunks if isinstance(c, DistributedDataParallel)]


@contextlib.contextmanager
def gradient_sync_held_off(chunks: Sequence[torch.nn.Module]):
    """Run megatron's schedule without data-parallel gradient synchronisation or gradient
    finalisation, as the passes that run beside training need (the validation pass, the curvature
    pass's replay): the schedule's hooks are switched off in the model config and restored however
    the block exits."""
    config = get_model_config(chunks[0])
    names = ("no_sync_func", "grad_sync_func", "finalize_model_grads_func")
    saved_config = {name: getattr(config, name) for name in names}
    try:
        config.no_sync_func = contextlib.nullcontext
        config.grad_sync_func = None
        config.finalize_model_grads_func = None
        with contextlib.ExitStack() as no_sync:
            for ddp in ddp_chunks(chunks):
                no_sync.enter_context(ddp.no_sync())
            yield
    finally:
        for name, value in saved_config.items():
            setattr(config, name, value)


def _recompute_as_in_training(chunks: list[torch.nn.Module]) -> None:
    """megatron recomputes activations (full, or the core attention's) only in training mode, so in
    eval mode the validation pass would hold every activation of a microbatch: more memory than the
    training pass that recomputation was switched on to fit. The modules that decide it hold no
    dropout of their own (dropout lives in the layers and the attention's core, which stay in eval
    mode), so they go back to training mode; :func:`evaluation_state` restores every mode after."""
    for chunk in chunks:
        for module in chunk.modules():
            full = isinstance(module, TransformerBlock) and module.config.recompute_granularity == "full"
            if full or (isinstance(module, Attention) and module.checkpoint_core_attention):
                module.training = True


@contextlib.contextmanager
def _isolated(chunks: list[torch.nn.Module], params: list[torch.nn.Parameter], loss_scale: float):
    """Eval mode, saved RNG, no gradient sync or finalisation, losses scaled by ``loss_scale``,
    and plain ``.grad`` stashed."""
    config = get_model_config(chunks[0])
    tracker = tensor_parallel.get_cuda_rng_tracker()  # megatron's model-parallel RNG streams
    tracker_states = tracker.get_states()
    saved_grad_scale_func = config.grad_scale_func
    stashed_grads = {p: p.grad for p in params}
    for p in params:
        p.grad = None
    try:
        config.grad_scale_func = None if loss_scale == 1.0 else functools.partial(torch.mul, other=loss_scale)
        with evaluation_state(*chunks), gradient_sync_held_off(chunks):
            _recompute_as_in_training(chunks)
            yield
    finally:
        config.grad_scale_func = saved_grad_scale_func
        tracker.set_states(tracker_states)
        for ddp in ddp_chunks(chunks):
            ddp.zero_grad_buffer()
        for p, g in stashed_grads.items():
            p.grad = g


def _all_reduce_coalesced(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Sum tensors over ``group`` with one collective per dtype."""
    if group is None or dist.get_world_size(group) == 1 or not tensors:
        return
    for dtype in {t.dtype for t in tensors}:
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in same:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


class MegatronTargetBackward:
    """One target's validation backward through megatron's schedule (a
    :class:`~inrun_megatron.validation_pass.TargetBackward`).

    Args:
        chunks: the model chunks, as wrapped for training (DDP, Float16Module).
        store: where ``G`` goes.
        forward_backward_func, forward_step_func, schedule_kwargs: the caller's schedule, forward
            step and remaining ``forward_backward_func`` arguments (``model``, ``pg_collection``,
            ...; none of :data:`SET_BY_VALIDATION_PASS`).
        batches: this rank's validation batches of each target.
        tp_group: the tensor-parallel group (sequence-parallel gradients are partial over it).
        embedding_group: the group of the stages holding a tied embedding/output weight, or None
            where this rank holds none.
        split_group: the data-parallel group a split validation set is dealt over, None when it
            is replicated.
    """

    def __init__(
        self,
        *,
        chunks: Sequence[torch.nn.Module],
        store: GradientStore,
        forward_backward_func: Callable,
        forward_step_func: Callable,
        schedule_kwargs: Mapping[str, Any],
        batches: Sequence[list[Batch]],
        tp_group: dist.ProcessGroup | None,
        embedding_group: dist.ProcessGroup | None,
        split_group: dist.ProcessGroup | None,
    ):
        refused = SET_BY_VALIDATION_PASS & set(schedule_kwargs)
        if refused:
            raise ValueError(f"schedule_kwargs holds arguments the validation pass sets itself: {sorted(refused)}")
        self.chunks = list(chunks)
        self.store = store
        self.forward_backward_func = forward_backward_func
        self.forward_step_func = forward_step_func
        self.schedule_kwargs = dict(schedule_kwargs)
        self.batches = batches
        self.tp_group = tp_group
        self.embedding_group = embedding_group
        self.split_group = split_group

    def isolated(self, loss_scale: float) -> contextlib.AbstractContextManager[None]:
        return _isolated(self.chunks, self.store.params(), loss_scale)

    def backward_target(self, k: int, target: ValidationTarget, loss_scale: float) -> torch.Tensor:
        """Forward and backward target ``k``'s local batches (the loss scale is applied by megatron's
        ``grad_scale_func``, set by :meth:`isolated`); move the gradients into row ``k``."""
        batches = self.batches[k]
        sums: list[torch.Tensor] = []
        calls: dict[int, int] = {}
        scale = len(batches) / target.n_loss_tokens
        forward_step_func = self.forward_step_func

        @functools.wraps(forward_step_func)
        def validation_step(data_iterator, model_chunk, *args, **kwargs):
            i = calls.get(id(model_chunk), 0)  # the k-th forward of a chunk is microbatch k
            calls[id(model_chunk)] = i + 1
            batch = batches[i]
            output, _ = forward_step_func(_OneBatch(batch), model_chunk, *args, **kwargs)
            return output, functools.partial(_validation_loss, mask=loss_mask_of(batch), scale=scale, sums=sums)

        model = self.schedule_kwargs["model"]
        n_chunks = len(model) if isinstance(model, list) else 0
        self.forward_backward_func(
            **self.schedule_kwargs,
            forward_step_func=validation_step,
            data_iterator=[None] * n_chunks if n_chunks else None,
            num_microbatches=len(batches),
            seq_length=int(batches[0]["tokens"].shape[1]),
            micro_batch_size=int(batches[0]["tokens"].shape[0]),
            forward_only=False,
        )
        self._move_gradients_into_store(k)
        return torch.stack(sums).sum().double() if sums else torch.zeros((), dtype=torch.float64)

    def _move_gradients_into_store(self, k: int) -> None:
        for p in self.store.params():
            grad = getattr(p, "main_grad", None) if hasattr(p, "main_grad") else p.grad
            if grad is not None:
                self.store[p][k].copy_(grad)
            p.grad = None
        for ddp in ddp_chunks(self.chunks):
            ddp.zero_grad_buffer()

    def complete_gradients(self) -> None:
        """The reductions megatron's ``finalize_model_grads`` applies to training gradients:
        sequence-parallel parameters (norms, row-parallel biases) summed over TP; word embedding
        and output layer copies of a tied weight summed over the embedding group; and, for a
        split validation set, everything summed over DP."""
        params = self.store.params()
        k = len(self.batches)  # the rows of G; rows after them (docs/DESIGN.md §1.5) are filled from these
        sequence_parallel = [self.store[p][:k] for p in params if getattr(p, "sequence_parallel", False)]
        _all_reduce_coalesced(sequence_parallel, self.tp_group)
        shared = [self.store[p][:k] for p in params if getattr(p, "shared_embedding", False)]
        if shared:
            _all_reduce_coalesced(shared, self.embedding_group)
        if self.split_group is not None:
            _all_reduce_coalesced([self.store[p][:k] for p in params], self.split_group)
