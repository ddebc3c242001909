"""``<g, G>`` for the gradient a DeepSpeed engine is about to step with (the efficiency identity).

After the boundary micro-step's backward, DeepSpeed has reduced the gradient over data
parallelism and keeps it where its optimizer will read it; ``engine.step()`` then unscales,
clips and applies it. Where it keeps it depends on the stage and precision, in the order
``deepspeed.utils.safe_get_full_grad`` looks:

* bf16 without ZeRO (``BF16_Optimizer``): a float32 accumulation buffer per parameter
  (``param._hp_grad``), of which this rank owns the fragment ``param._hp_mapping`` names;
* ``param.grad``: the whole averaged gradient, the same on every data-parallel rank;
* ZeRO-3: this rank's partition of the parameter, laid out like ``param.ds_tensor``;
* ZeRO-1/2: this rank's fragment of the parameter in its flat gradient partition.

Each rank dots only what it owns (a replicated whole gradient on data-parallel rank 0 only),
with no gathering, and the pieces are summed over the data-parallel and then the model-parallel
group: the gradient never moves, only ``2 K`` numbers. :func:`model_norm` counts a model-wide norm
the same way (the curvature pass's ``ε``, ``docs/DESIGN.md`` §2.10).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from inrun_megatron.deepspeed.gradients import ValidationGradients
from inrun_megatron.gradient_dot import DotAccumulator, GradientDot


def _owned_fragment(param: torch.nn.Parameter) -> tuple[torch.Tensor, int] | None:
    """This rank's fragment of a ZeRO-1/2 or BF16_Optimizer gradient: (flat values, start in the
    flattened parameter), or None when another rank owns all of it."""
    mapping = param._hp_mapping
    if mapping is None:
        return None
    fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
    address = mapping.lp_fragment_address
    if fragment.numel() == param.numel():  # BF16_Optimizer accumulates the whole parameter on every rank
        fragment = fragment.narrow(0, address.start, address.numel)
    return fragment, address.start


def optimizer_gradient_dot(
    engine,
    grads: ValidationGradients,
    counted: Callable[[torch.nn.Parameter], bool],
    *,
    with_abs: bool = False,
) -> GradientDot:
    """``<g, G_k>`` per target over every parameter ``counted`` accepts (a tensor-parallel
    duplicate counts on one rank), ``g`` the engine's reduced gradient, still multiplied by any
    fp16 loss scale. Call between the boundary micro-step's backward and ``engine.step()``."""
    dp_group = engine.data_parallel_group
    replica_leader = dist.get_rank(group=dp_group) == 0
    total = DotAccumulator(grads.n_targets, engine.device, with_abs=with_abs)
    for p in filter(counted, grads.params()):
        if getattr(p, "_hp_grad", None) is not None:
            owned = _owned_fragment(p)
        elif p.grad is not None:
            if replica_leader:
                total.add(p.grad, grads[p])
            continue
        elif hasattr(p, "ds_id"):
            from deepspeed.utils import safe_get_local_grad

            local, g_val = safe_get_local_grad(p).reshape(-1), grads.local_partition(p)
            valid = max(0, min(local.numel(), p.ds_numel - local.numel() * dist.get_rank(p.ds_process_group)))
            total.add(local[:valid], g_val[:, :valid])
            continue
        elif hasattr(p, "_hp_mapping"):
            owned = _owned_fragment(p)
        else:
            continue  # no gradient this step (unused parameter)
        if owned is not None:
            fragment, start = owned
            total.add(fragment, grads[p].reshape(-1, p.numel())[:, start : start + fragment.numel()])
    return total.reduce(dp_group, model_parallel_group(engine))


def model_parallel_group(engine) -> dist.ProcessGroup | None:
    """The group tensor-parallel shards are summed over (``engine.mpu``'s model-parallel group;
    None without an mpu)."""
    return engine.mpu.get_model_parallel_group() if engine.mpu is not None else None


def model_norm(
    engine, tensors: Mapping[torch.nn.Parameter, torch.Tensor], counted: Callable[[torch.nn.Parameter], bool]
) -> float:
    """``‖t‖`` over the whole model of tensors held whole on this rank (``tensors[p]`` of ``p``'s
    shape: the weights, or ``g_t`` read whole under ZeRO-0/1/2), each weight once as
    :func:`optimizer_gradient_dot` counts ``<g, G>``: the parameters ``counted`` accepts (a
    tensor-parallel duplicate on one rank), summed over the model-parallel group, so every rank
    gets the same norm (``docs/DESIGN.md`` §2.4, §2.10). Replicated over data parallelism: no
    data-parallel reduction."""
    total = DotAccumulator(1, engine.device)
    for p, t in tensors.items():
        if counted(p):
            total.add(t, t)
    return math.sqrt(float(total.reduce(model_parallel_group(engine)).dot[0]))
