"""The validation pass (``docs/DESIGN.md`` §2.1): ``G_t`` at the step's weights, training state untouched.

Runs the user's forward step on the validation batches through the same
``forward_backward_func`` (so pipeline schedules apply), with

* the model in eval mode and every RNG state restored afterwards (no dropout, and the
  training pass draws exactly the random numbers it would draw without scoring);
* megatron DDP's gradient synchronisation held off (no DP all-reduce: a replicated validation
  set needs none, a split one is reduced once, by us, on ``G`` itself);
* a loss whose gradient is exactly the validation loss ``sum(mask * CE) / N_val_tokens``;
* the training run's loss scale (fp16), removed again from ``G``; if the validation gradient
  overflows at that scale, the pass is repeated at a smaller one, so that an fp16 step whose
  update is applied always gets finite scores;

then moves the gradients into the :class:`~inrun_megatron.validation.GradientStore` and clears
the gradient buffers, leaving them as they were before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import get_model_config

from inrun_megatron.distributed import collective_device
from inrun_megatron.validation import Batch, all_finite, evaluation_state, loss_mask_of

if TYPE_CHECKING:
    from inrun_megatron.megatron.scorer import MegatronScorer


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
    if output_tensor.shape != mask.shape:
        raise ValueError(
            "the forward step must return the model's per-token loss [batch, seq] (GPTModel called with"
            f" labels); got a tensor of shape {tuple(output_tensor.shape)} for a batch of {tuple(mask.shape)}"
        )
    losses = output_tensor.to(torch.promote_types(output_tensor.dtype, torch.float32))  # never downcast
    loss_sum = (losses * mask.to(losses)).sum()
    sums.append(loss_sum.detach())
    return loss_sum * scale, {"validation loss sum": loss_sum.detach()}


def _ddp_chunks(chunks: list[torch.nn.Module]) -> list[DistributedDataParallel]:
    return [c for c in chunks if isinstance(c, DistributedDataParallel)]


#: Factor by which the loss scale shrinks when the validation gradient overflows in fp16.
RESCALE_ON_OVERFLOW = 8.0


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
    saved_config = {
        name: getattr(config, name)
        for name in ("no_sync_func", "grad_sync_func", "finalize_model_grads_func", "grad_scale_func")
    }
    stashed_grads = {p: p.grad for p in params}
    for p in params:
        p.grad = None
    try:
        config.no_sync_func = contextlib.nullcontext
        config.grad_sync_func = None
        config.finalize_model_grads_func = None
        config.grad_scale_func = None if loss_scale == 1.0 else functools.partial(torch.mul, other=loss_scale)
        with evaluation_state(*chunks), contextlib.ExitStack() as no_sync:
            _recompute_as_in_training(chunks)
            for ddp in _ddp_chunks(chunks):
                no_sync.enter_context(ddp.no_sync())
            yield
    finally:
        for name, value in saved_config.items():
            setattr(config, name, value)
        tracker.set_states(tracker_states)
        for ddp in _ddp_chunks(chunks):
            ddp.zero_grad_buffer()
        for p, g in stashed_grads.items():
            p.grad = g


def _move_gradients_into_store(scorer: MegatronScorer, k: int, loss_scale: float) -> None:
    for p in scorer.grads.params():
        grad = getattr(p, "main_grad", None) if hasattr(p, "main_grad") else p.grad
        store = scorer.grads[p][k]
        if grad is None:
            store.zero_()
        else:
            store.copy_(grad)
            if loss_scale != 1.0:
                store.div_(loss_scale)
        p.grad = None
    for ddp in _ddp_chunks(scorer.chunks):
        ddp.zero_grad_buffer()


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


def _complete_gradients(scorer: MegatronScorer) -> None:
    """Turn per-rank partial ``G`` into the full gradient of each locally held shard.

    The same reductions megatron's ``finalize_model_grads`` applies to training gradients:
    sequence-parallel parameters (norms, row-parallel biases) summed over TP; word embedding
    and output layer copies of a tied weight summed over the embedding group; and, for a
    split validation set, everything summed over DP.
    """
    params = scorer.grads.params()
    k = len(scorer.targets)  # the rows of G; rows after them (docs/DESIGN.md §1.5) are filled from these
    sequence_parallel = [scorer.grads[p][:k] for p in params if getattr(p, "sequence_parallel", False)]
    _all_reduce_coalesced(sequence_parallel, parallel_state.get_tensor_model_parallel_group())
    shared = [scorer.grads[p][:k] for p in params if getattr(p, "shared_embedding", False)]
    if shared:
        _all_reduce_coalesced(shared, parallel_state.get_embedding_group())
    if scorer.config.validation_split == "split":
        _all_reduce_coalesced(
            [scorer.grads[p][:k] for p in params], parallel_state.get_data_parallel_group(with_context_parallel=True)
        )


def _backward_target(
    forward_backward_func: Callable, forward_step_func: Callable, model, batches: list[Batch], n_loss_tokens: int
) -> torch.Tensor:
    """Forward and backward one target's (local) batches; return the local masked loss sum."""
    sums: list[torch.Tensor] = []
    calls: dict[int, int] = {}
    scale = len(batches) / n_loss_tokens

    @functools.wraps(forward_step_func)
    def validation_step(data_iterator, model_chunk, *args, **kwargs):
        i = calls.get(id(model_chunk), 0)  # the k-th forward of a chunk is microbatch k
        calls[id(model_chunk)] = i + 1
        batch = batches[i]
        output, _ = forward_step_func(_OneBatch(batch), model_chunk, *args, **kwargs)
        return output, functools.partial(_validation_loss, mask=loss_mask_of(batch), scale=scale, sums=sums)

    n_chunks = len(model) if isinstance(model, list) else 0
    forward_backward_func(
        forward_step_func=validation_step,
        data_iterator=[None] * n_chunks if n_chunks else None,
        model=model,
        num_microbatches=len(batches),
        seq_length=int(batches[0]["tokens"].shape[1]),
        micro_batch_size=int(batches[0]["tokens"].shape[0]),
        forward_only=False,
    )
    return torch.stack(sums).sum().double() if sums else torch.zeros((), dtype=torch.float64)


def _finite_everywhere(scorer: MegatronScorer, losses: torch.Tensor) -> bool:
    """Whether the losses and ``G`` are finite on every rank (one collective: all ranks agree)."""
    finite = bool(torch.isfinite(losses).all()) and all_finite(scorer.grads.values())
    bad = torch.tensor(0.0 if finite else 1.0, device=losses.device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad)


def run_validation_pass(
    scorer: MegatronScorer, forward_backward_func: Callable, forward_step_func: Callable, model
) -> dict[str, float]:
    """Fill ``scorer.grads`` with ``G`` of every target at the current weights; return the losses."""
    loss_scale = scorer.loss_scale()
    while True:
        losses = _validation_gradients(scorer, forward_backward_func, forward_step_func, model, loss_scale)
        finite = _finite_everywhere(scorer, losses)
        if finite or loss_scale == 1.0:
            break
        loss_scale = max(loss_scale / RESCALE_ON_OVERFLOW, 1.0)
    result = {t.name: float(v) / t.n_loss_tokens for t, v in zip(scorer.targets, losses)}
    if not finite:
        raise FloatingPointError(
            f"non-finite validation loss or gradient (losses {result}) at step {scorer.step}: no score was"
            " computed and the training gradients were left untouched; check the validation data and the"
            " model's numerics"
        )
    return result


def _validation_gradients(
    scorer: MegatronScorer, forward_backward_func: Callable, forward_step_func: Callable, model, loss_scale: float
) -> torch.Tensor:
    """One validation pass with losses scaled by ``loss_scale``; returns each target's loss sum."""
    loss_sums = []
    with _isolated(scorer.chunks, scorer.grads.params(), loss_scale):
        for k, target in enumerate(scorer.targets):
            batches = scorer.local_validation_batches(target)
            loss_sums.append(
                _backward_target(forward_backward_func, forward_step_func, model, batches, target.n_loss_tokens)
            )
            _move_gradients_into_store(scorer, k, loss_scale)
    _complete_gradients(scorer)
    pipeline = parallel_state.get_pipeline_model_parallel_group()
    losses = torch.stack(loss_sums).to(collective_device(pipeline))  # stages without the loss hold CPU zeros
    dist.all_reduce(losses, group=pipeline)
    if scorer.config.validation_split == "split":
        dist.all_reduce(losses, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return losses
