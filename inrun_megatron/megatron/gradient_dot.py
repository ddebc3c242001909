"""``<a, b>`` over a megatron-core model's parameters, each counted once (the identities of docs/DESIGN.md §1.3).

Counted once: tensor-parallel duplicates (``param_is_not_tensor_parallel_duplicate``) on one TP
rank, the last pipeline stage's copy of a tied embedding (``param_is_not_shared``) not at all;
summed over the model-parallel group. :func:`optimizer_gradient_dot` reads the gradient megatron's
optimizer is about to step with: after ``forward_backward_func`` returned, megatron's
``finalize_model_grads`` has reduced it over data parallelism (and summed tied copies); under the
distributed optimizer each data-parallel rank then holds only its shard of every gradient bucket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from inrun_megatron.gradient_dot import DotAccumulator, GradientDot
from inrun_megatron.megatron.process_groups import ScorerGroups, process_groups

#: ``{parameter: tensor}``: one tensor of the parameter's shape, or ``[K, *shape]`` (one per target,
#: as in the scorer's gradient store).
ParameterTensors = Mapping[torch.nn.Parameter, torch.Tensor]


def counted_parameters(chunks: Sequence[torch.nn.Module], groups: ScorerGroups) -> list[torch.nn.Parameter]:
    """The parameters of this rank that count towards a model-wide dot product."""
    return [
        p
        for chunk in chunks
        for p in chunk.parameters()
        if param_is_not_tensor_parallel_duplicate(p, tp_group=groups.tp) and param_is_not_shared(p)
    ]


def _accumulator(
    chunks: Sequence[torch.nn.Module], b: ParameterTensors, with_abs: bool, groups: ScorerGroups
) -> DotAccumulator:
    for p in counted_parameters(chunks, groups):
        if p in b:
            return DotAccumulator(b[p].numel() // p.numel(), b[p].device, with_abs=with_abs)
    raise ValueError("no parameter of the model chunks has a tensor to dot with")


def model_dot(
    chunks: Sequence[torch.nn.Module],
    a: ParameterTensors,
    b: ParameterTensors,
    *,
    with_abs: bool = False,
    groups: ProcessGroupCollection | ScorerGroups | None = None,
) -> GradientDot:
    """``<a, b_k>`` over every counted parameter held whole on this rank's model-parallel shard
    (``a[p]`` of the parameter's shape), summed over the model-parallel group. ``groups``: the
    process groups (megatron's global ones if None)."""
    groups = process_groups(groups)
    total = _accumulator(chunks, b, with_abs, groups)
    for p in counted_parameters(chunks, groups):
        if a.get(p) is not None and p in b:
            total.add(a[p], b[p])
    return total.reduce(groups.mp)


def optimizer_gradient_dot(
    chunks: Sequence[torch.nn.Module],
    b: ParameterTensors,
    *,
    with_abs: bool = False,
    groups: ProcessGroupCollection | ScorerGroups | None = None,
) -> GradientDot:
    """``<g, b_k>`` with ``g`` the gradient the optimizer steps with (``main_grad`` under megatron
    DDP, ``.grad`` otherwise), over the whole model; still multiplied by any fp16 loss scale.

    Under the distributed optimizer only this data-parallel rank's shard of each gradient bucket
    holds the reduced gradient: each rank dots its shard and the shards are summed over the
    data-parallel group.
    """
    groups = process_groups(groups)
    ddp = [c for c in chunks if isinstance(c, DistributedDataParallel)]
    if not ddp or not ddp[0].ddp_config.use_distributed_optimizer:
        grads = {p: getattr(p, "main_grad", p.grad) for c in chunks for p in c.parameters()}
        return model_dot(chunks, grads, b, with_abs=with_abs, groups=groups)
    dp, dp_rank = dist.get_world_size(groups.dp), dist.get_rank(groups.dp)
    counted = set(counted_parameters(chunks, groups))
    total = _accumulator(chunks, b, with_abs, groups)
    for chunk in ddp:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            for bucket in buffer.buckets:
                shard = bucket.grad_data.numel() // dp
                lo = bucket.grad_data.storage_offset() + dp_rank * shard
                for p in bucket.params_list:
                    if p not in counted or p not in b:
                        continue
                    start = p.main_grad.storage_offset()
                    first, last = max(lo, start) - start, min(lo + shard, start + p.numel()) - start
                    if first < last:
                        rows = b[p].reshape(-1, p.numel())
                        total.add(p.main_grad.reshape(-1)[first:last], rows[:, first:last])
    return total.reduce(groups.dp, groups.mp)
