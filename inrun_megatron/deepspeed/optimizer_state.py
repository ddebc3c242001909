"""The Adam preconditioner ``P_t`` of every scored parameter, read where a DeepSpeed engine keeps its state.

``docs/DESIGN.md`` §1.5. The engine's torch-style Adam (the client optimizer, or DeepSpeed's
``FusedAdam``) keeps its state keyed by the tensors it steps:

* no ZeRO, fp32: the model parameters themselves;
* ZeRO-1/2 and the bf16 optimizer: one flat fp32 partition per parameter group, of which each
  parameter owns the fragment ``param._hp_mapping`` names (``hp_fragment_address`` in the flat
  partition, ``lp_fragment_address`` in the flattened parameter) on the rank that owns it. Every
  rank scores whole parameters, so the fragments are assembled once per step: each rank writes
  its fragments into a zeroed float32 buffer of every scored parameter and the buffer is summed
  over the data-parallel group (fragments are disjoint): one all-reduce of ``4 * parameters``
  bytes, as much as one fp32 gradient all-reduce;
* ZeRO-3: one flat fp32 partition per sub-group, in which each parameter's partition sits at
  ``grad_position``; it is aligned with the partition of ``G`` this rank stores, so ``P``
  multiplies it where it is, with no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from inrun_megatron.optimizer_values import is_adam, torch_adam_preconditioner


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch-style optimizer inside the engine's ZeRO / mixed-precision wrapper (or the optimizer itself)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def is_adam_engine(engine) -> bool:
    return engine.optimizer is not None and is_adam(inner_optimizer(engine))


def adam_preconditioners(engine, params: list[torch.nn.Parameter]) -> dict[torch.nn.Parameter, torch.Tensor | None]:
    """``P_t`` of each of ``params`` in the layout the scorer's store of ``G`` keeps it (whole, or
    the ZeRO-3 partition); None for all before the optimizer's first step."""
    inner = inner_optimizer(engine)
    flat_p: dict[int, torch.Tensor | None] = {}

    def of_group(index: int) -> torch.Tensor | None:
        """``P`` of the flat fp32 partition that is parameter group ``index``'s one tensor."""
        if index not in flat_p:
            (flat,) = inner.param_groups[index]["params"]
            flat_p[index] = torch_adam_preconditioner(inner, flat)
        return flat_p[index]

    if params and hasattr(params[0], "ds_id"):  # ZeRO-3
        zero3 = engine.optimizer
        found = {}
        for param in params:
            sub_group, offset, numel = zero3.grad_position[zero3.get_param_id(param)]
            if sub_group not in flat_p:  # its parameter group lists the sub-group only while stepping it
                group = inner.param_groups[zero3.sub_group_to_group_id[sub_group]]
                flat = zero3.fp32_partitioned_groups_flat[sub_group]
                flat_p[sub_group] = torch_adam_preconditioner(inner, flat, group)
            p = flat_p[sub_group]
            found[param] = None if p is None else p.narrow(0, offset, numel)
        return found
    if params and any(hasattr(param, "_hp_mapping") for param in params):  # ZeRO-1/2, bf16 optimizer
        return _assemble(params, of_group, engine.data_parallel_group)
    return {param: torch_adam_preconditioner(inner, param) for param in params}


def _assemble(params: list[torch.nn.Parameter], of_group, group: dist.ProcessGroup) -> dict:
    """Whole ``P`` of each parameter from every rank's fragments, in one all-reduce (the last element
    says whether any rank has a second moment yet)."""
    offsets, total = {}, 0
    for param in params:
        offsets[param] = total
        total += param.numel()
    dtype = torch.float64 if any(param.dtype == torch.float64 for param in params) else torch.float32
    flat = torch.zeros(total + 1, dtype=dtype, device=params[0].device)
    for param in params:
        mapping = param._hp_mapping
        if mapping is None:  # another rank owns all of it
            continue
        p = of_group(mapping.param_group_index)
        if p is None:
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        start = offsets[param] + lp.start
        flat[start : start + lp.numel] = p.narrow(0, hp.start, hp.numel)
        flat[total] = 1.0
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    if flat[total] == 0:
        return {param: None for param in params}
    return {param: flat[offsets[param] : offsets[param] + param.numel()].view(param.shape) for param in params}
