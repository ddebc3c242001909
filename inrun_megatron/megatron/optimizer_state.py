"""The Adam preconditioner ``P_t`` of every scored parameter, read where megatron's optimizer keeps its state.

``docs/DESIGN.md`` §1.5. Megatron's optimizers wrap a torch-style Adam (apex / Transformer Engine
``FusedAdam``, torch ``AdamW`` on the CPU) whose state is keyed by the *main* parameters:

* ``FP32Optimizer`` (and a bare torch optimizer): the model parameters themselves;
* ``Float16OptimizerWithFloat16Params``: an fp32 copy of each bf16/fp16 model parameter
  (``float16_groups`` ↔ ``fp32_from_float16_groups``), the fp32 model parameters themselves;
* ``DistributedOptimizer``: an fp32 *shard* of each model parameter, the range of its flattened
  elements this data-parallel rank owns (``_get_model_param_range_map(p)["param"]``). Every rank
  scores whole parameters, so the shards are assembled once per step: each rank writes its ranges
  into a zeroed float32 (float64 for float64 models) buffer of all its model-parallel shard's
  parameters and the buffer is summed over the distributed optimizer's data-parallel group (the
  ranges are disjoint). Cost: one all-reduce of ``4 * parameters`` bytes per step, as much as one
  fp32 gradient all-reduce;
* ``ChainedOptimizer``: each of its optimizers for its own parameters.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from inrun_megatron.optimizer_values import is_adam, torch_adam_preconditioner


def _parts(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron optimizer (or the torch optimizer itself)."""
    return [getattr(part, "optimizer", part) for part in _parts(optimizer)]


def is_adam_optimizer(optimizer) -> bool:
    """Whether every optimizer inside ``optimizer`` applies Adam's update."""
    return all(is_adam(inner) for inner in inner_optimizers(optimizer))


def _main_params(part) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor, tuple[int, int] | None]]:
    """``(model parameter, the tensor the inner optimizer's state is keyed by, owned element range
    or None for the whole parameter)`` for every parameter the megatron optimizer ``part`` steps."""
    if hasattr(part, "shard_fp32_groups"):  # DistributedOptimizer
        for models, shards in (
            (part.model_float16_groups, part.shard_fp32_from_float16_groups),
            (part.model_fp32_groups, part.shard_fp32_groups),
        ):
            for model_group, shard_group in zip(models, shards):
                for param, shard in zip(model_group, shard_group):
                    owned = part._get_model_param_range_map(param)["param"]
                    yield param, shard, (owned.start, owned.end)
    elif hasattr(part, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
        for model_group, main_group in zip(part.float16_groups, part.fp32_from_float16_groups):
            for param, main in zip(model_group, main_group):
                yield param, main, None
        for group in part.fp32_from_fp32_groups:
            for param in group:
                yield param, param, None
    else:  # FP32Optimizer, or a torch optimizer
        for group in getattr(part, "optimizer", part).param_groups:
            for param in group["params"]:
                yield param, param, None


def adam_preconditioners(optimizer, params: list[torch.nn.Parameter]) -> dict[torch.nn.Parameter, torch.Tensor | None]:
    """``P_t`` of each of ``params`` (full local shape; None for all before the first step).

    Call before the optimizer's step, after the validation pass of the step.
    """
    found: dict[torch.nn.Parameter, torch.Tensor | None] = {}
    sharded: list[tuple[torch.nn.Parameter, torch.Tensor | None, tuple[int, int]]] = []
    groups = set()
    for part in _parts(optimizer):
        inner = getattr(part, "optimizer", part)
        for param, main, owned in _main_params(part):
            p = torch_adam_preconditioner(inner, main)
            if owned is None:
                found[param] = p
            else:
                sharded.append((param, p, owned))
                groups.add(part.data_parallel_group)
    if sharded:
        if len(groups) != 1:
            raise NotImplementedError("distributed optimizers over several data-parallel groups are not supported")
        found.update(_assemble(sharded, params, groups.pop()))
    return {p: found[p] for p in params if p in found}


def _assemble(
    sharded: list[tuple[torch.nn.Parameter, torch.Tensor | None, tuple[int, int]]],
    params: list[torch.nn.Parameter],
    group: dist.ProcessGroup,
) -> dict[torch.nn.Parameter, torch.Tensor | None]:
    """Whole ``P`` of each distributed-optimizer parameter from every rank's owned ranges (one all-reduce).

    A rank may own no element of a parameter (its shard is empty, with no state): whether a second
    moment exists at all is agreed over the group, in the same collective.
    """
    wanted = {param for param, _, _ in sharded if param in set(params)}
    order = [param for param in params if param in wanted]
    offsets, total = {}, 0
    for param in order:
        offsets[param] = total
        total += param.numel()
    device = order[0].device if order else torch.device("cpu")
    dtype = torch.float64 if any(param.dtype == torch.float64 for param in order) else torch.float32
    flat = torch.zeros(total + 1, dtype=dtype, device=device)  # last element: "a rank has state"
    for param, p, (start, end) in sharded:
        if param not in offsets or end <= start:
            continue
        if p is not None:
            flat[offsets[param] + start : offsets[param] + end] = p.reshape(-1).to(flat.dtype)
            flat[total] = 1.0
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    if flat[total] == 0:
        return {param: None for param in order}
    return {param: flat[offsets[param] : offsets[param] + param.numel()].view(param.shape) for param in order}
