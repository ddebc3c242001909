"""The Megatron side of the curvature pass (``docs/DESIGN.md`` §1.7): per-sample ``<grad l_z, H_val g_t>``.

It runs after the step's training pass, when ``g_t`` exists (reduced over data parallelism by
megatron's ``finalize_model_grads``) and before the optimizer step:

1. ``u = H_val g_t`` per target by a central difference of the validation gradient
   (:func:`inrun_megatron.second_order.central_difference_hvp`): two validation passes at
   ``w ± ε·g_t``, through the same skeleton and schedule as the step's own validation pass, the
   weights restored bitwise after;
2. the step's training microbatches (the same batch objects, replayed) forward and backward once
   more at ``w_t``, with the RNG streams the training pass started from (so dropout draws the same
   masks), scored against ``u`` instead of ``G``.

Training equivalence (``docs/DESIGN.md`` §1.3, identity 5): the gradient buffers holding ``g_t`` are
copied before and written back bitwise after (plain ``.grad`` tensors are set aside and put back
as they are), megatron DDP's synchronisation and gradient finalisation are held off during the
replay, and the RNG streams are left where the training pass left them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.utils import get_model_config

from inrun_megatron.megatron.validation_pass import ddp_chunks, gradient_sync_held_off
from inrun_megatron.rng import RngState
from inrun_megatron.validation import Batch


@dataclass
class MegatronRngState(RngState):
    """Every random stream a megatron training pass draws from: torch's generators
    (:class:`inrun_megatron.rng.RngState`) and megatron's model-parallel RNG tracker."""

    tracker: dict

    @classmethod
    def capture(cls) -> MegatronRngState:
        torch_state = RngState.capture()
        return cls(torch_state.cpu, torch_state.cuda, tensor_parallel.get_cuda_rng_tracker().get_states())

    def restore(self) -> None:
        super().restore()
        tensor_parallel.get_cuda_rng_tracker().set_states(self.tracker)


class _Replay(Iterator):
    """Yields the batches a training data iterator yielded, in order."""

    def __init__(self, batches: Sequence[Batch]):
        self.batches = iter(list(batches))

    def __next__(self) -> Batch:
        return next(self.batches)


def replay_iterators(data_iterator: Any, pulled: list[list[Batch]]) -> Any:
    """Data iterators shaped like the training pass's ``data_iterator`` (one, or a list with None
    for stages that read no data) that replay the batches each one yielded (``pulled``, in the order
    of the non-None iterators)."""
    replays = iter(pulled)
    if isinstance(data_iterator, list):
        return [None if it is None else _Replay(next(replays)) for it in data_iterator]
    return None if data_iterator is None else _Replay(next(replays))


def training_gradients(
    chunks: Sequence[torch.nn.Module], params: Sequence[torch.nn.Parameter]
) -> dict[torch.nn.Parameter, torch.Tensor | None]:
    """The whole ``g_t`` the optimizer steps with, on every rank: ``main_grad`` under megatron DDP
    (a view of its gradient buffer), ``.grad`` otherwise (None where a parameter got none).

    Under megatron's distributed optimizer ``finalize_model_grads`` reduce-scatters each gradient
    bucket, so this rank holds the reduced gradient only in its shard of the bucket (the rest is
    its local, unreduced gradient): each bucket's shards are all-gathered over the group megatron
    reduce-scattered it over, into new tensors, and the buffers are not touched
    (``docs/DESIGN.md`` §2.10)."""
    grads = {p: p.main_grad if hasattr(p, "main_grad") else p.grad for p in params}
    for ddp in ddp_chunks(chunks):
        if not ddp.ddp_config.use_distributed_optimizer:
            continue
        for bucket_group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
            group = bucket_group.intra_distributed_optimizer_instance_group
            size = bucket_group.intra_distributed_optimizer_instance_size
            rank = bucket_group.intra_distributed_optimizer_instance_rank
            for bucket in bucket_group.buckets:
                shard = bucket.grad_data.numel() // size  # megatron pads every bucket to a multiple of size
                gathered = torch.empty_like(bucket.grad_data)
                local = bucket.grad_data[rank * shard : (rank + 1) * shard]
                torch.distributed.all_gather_into_tensor(gathered, local, group=group)
                for p in bucket.params_list:
                    if p in grads:
                        start = p.main_grad.storage_offset() - bucket.grad_data.storage_offset()
                        grads[p] = gathered[start : start + p.numel()].view_as(p)
    return grads


@contextlib.contextmanager
def gradients_kept(chunks: Sequence[torch.nn.Module], params: Sequence[torch.nn.Parameter]):
    """Copy megatron DDP's gradient buffers (every ``main_grad`` is a view of one) and set aside every
    plain ``.grad``; on exit zero the buffers, write the copy back bitwise and put every ``.grad``
    back. Inside, the passes start from zeroed gradients, as the step's own validation pass does
    (it adds its gradient to the buffers before moving it into the store), and may use and clear
    them as they like."""
    buffers = [b for ddp in ddp_chunks(chunks) for b in ddp.buffers + ddp.expert_parallel_buffers]
    copies = [b.grad_data.clone() for b in buffers]
    plain = {p: p.grad for p in params}
    try:
        for ddp in ddp_chunks(chunks):
            ddp.zero_grad_buffer()
        for p in params:
            p.grad = None
        yield
    finally:
        for ddp in ddp_chunks(chunks):
            ddp.zero_grad_buffer()
        for b, copy in zip(buffers, copies):
            b.grad_data.copy_(copy)
        for p, g in plain.items():
            p.grad = g


@contextlib.contextmanager
def parameter_gathers_kept(chunks: Sequence[torch.nn.Module]):
    """Under the distributed optimizer with overlapped parameter gather, leave megatron's record of
    which buckets' parameter all-gather is dispatched as the training pass left it.

    ``finalize_model_grads`` marks every bucket undispatched, so that the next step's first forward
    gathers the parameters the optimizer step is about to update; the curvature pass's own forwards
    would dispatch (and finish) those gathers, and the next step would then run on stale shards of
    the other ranks' parameters. The gathers the pass runs reassemble the weights every rank holds
    already, bit for bit (the weights are moved identically on every rank, docs/DESIGN.md §2.10)."""
    bucket_groups = [bg for ddp in ddp_chunks(chunks) for bg in ddp.bucket_groups + ddp.expert_parallel_bucket_groups]
    dispatched = [bg.param_gather_dispatched for bg in bucket_groups]
    try:
        yield
    finally:
        for bg, was in zip(bucket_groups, dispatched):
            if bg.param_gather_handle is not None:  # a gather the pass's last forward left in flight
                bg.param_gather_handle.wait()
                bg.param_gather_handle = None
            bg.param_gather_dispatched = was


@contextlib.contextmanager
def replaying(chunks: Sequence[torch.nn.Module], params: Sequence[torch.nn.Parameter]):
    """Around the replay of the training microbatches: zeroed gradients to accumulate into (the
    scoring of fused weight-gradient accumulation reads ``main_grad`` from zero), no data-parallel
    synchronisation or gradient finalisation. The caller sets the RNG streams to where the training
    pass started and restores them after (:class:`MegatronRngState`)."""
    for ddp in ddp_chunks(chunks):
        ddp.zero_grad_buffer()
    for p in params:
        p.grad = None
    with gradient_sync_held_off(chunks):
        yield


def check_second_order_supported(chunks: Sequence[torch.nn.Module]) -> None:
    """Refuse, at attach, the setups the curvature pass cannot serve, naming them."""
    config = get_model_config(chunks[0])
    refused = {
        "fp16/bf16 weights (a perturbation of √eps_fp32·‖w‖ along g is below half precision's resolution)": bool(
            config.fp16
            or config.bf16
            or any(p.dtype in (torch.float16, torch.bfloat16) for c in chunks for p in c.parameters())
        ),
    }
    for what, present in refused.items():
        if present:
            raise NotImplementedError(
                f"second-order values (ScoringConfig(second_order=True), docs/DESIGN.md §1.7) do not support {what}"
                " yet; switch second_order off or train with fp32 weights"
            )
