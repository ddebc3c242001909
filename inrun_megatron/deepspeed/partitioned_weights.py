"""ZeRO-3's partitioned weights moved along the step's gradient, for the curvature pass
(``docs/DESIGN.md`` §1.7, §2.10).

Under ZeRO-3 a parameter's weights live in ``param.ds_tensor``: this rank's equal, contiguous
partition of the flattened parameter (the last rank's zero-padded). The forward's hooks all-gather
the partitions into ``param.data`` and free it again afterwards, so moving every rank's partition
by ``±ε`` times its partition of ``g_t`` moves the weights the next forward gathers to exactly
``w ± εg_t``, element by element the same arithmetic as moving the whole tensor. Two things need
care:

* Parameters DeepSpeed keeps gathered between forwards (persistent ones, smaller than
  ``stage3_param_persistence_threshold``) are not gathered again: their gathered copy is
  refreshed from the partitions (partitioned and all-gathered, as DeepSpeed itself does after an
  optimizer step) after every move and after the restore.
* In fp32 DeepSpeed's optimizer steps from the very flat tensor ``ds_tensor`` views (the fp32
  partition is not a copy when the weights are fp32): the move is restored bitwise before the
  caller's ``engine.step()``, so the optimizer sees the weights the training pass left.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist


def owned_numel(param: torch.nn.Parameter) -> int:
    """How many leading elements of this rank's partition are the parameter's (the rest is padding)."""
    size = param.partition_numel()
    return max(0, min(size, param.ds_numel - size * dist.get_rank(param.ds_process_group)))


class PartitionedDisplacement:
    """This rank's pieces of ``w_t`` and ``g_t`` under ZeRO-3, for
    :func:`inrun_megatron.second_order.central_difference_hvp`.

    ``weights``: views of the parameters' partitions (``ds_tensor``, the owned elements), moved in
    place; ``direction``: the same elements of the step's reduced fp32 gradient partition
    (``deepspeed.utils.safe_get_local_grad``, read where the optimizer reads it, not copied; a
    parameter without one contributes zeros). Read after the boundary micro-step's backward.
    """

    def __init__(self, params: list[torch.nn.Parameter], dp_group: dist.ProcessGroup):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        from deepspeed.utils import safe_get_local_grad

        self.dp_group = dp_group
        self.params = params
        self.weights: list[torch.Tensor] = []
        self.direction: list[torch.Tensor] = []
        for p in params:
            n = owned_numel(p)
            weights = p.ds_tensor.data.narrow(0, 0, n)
            local = safe_get_local_grad(p)
            self.weights.append(weights)
            self.direction.append(torch.zeros_like(weights) if local is None else local.detach().reshape(-1)[:n])
        # the same parameters on every rank (persistence is decided by size), so the collectives match
        self.gathered = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]

    def norms(
        self, counted: Callable[[torch.nn.Parameter], bool], model_parallel_group: dist.ProcessGroup | None
    ) -> tuple[float, float]:
        """``(‖w_t‖, ‖g_t‖)`` over the whole model: each element counted once, on the rank that owns
        it, of the parameters ``counted`` accepts (a megatron-core tensor-parallel duplicate on one
        rank), summed over data parallelism and the model-parallel group (``docs/DESIGN.md`` §2.10)."""
        squares = torch.zeros(2, dtype=torch.float64, device=self.weights[0].device)
        for p, w, g in zip(self.params, self.weights, self.direction):
            if counted(p):
                squares[0] += w.double().square().sum()
                squares[1] += g.double().square().sum()
        for group in (self.dp_group, model_parallel_group):
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(squares, group=group)
        weight_square, g_square = squares.tolist()
        return math.sqrt(weight_square), math.sqrt(g_square)

    def refresh_gathered(self) -> None:
        """Make the gathered copies of the persistent parameters equal their partitions again."""
        if self.gathered:
            self.gathered[0].partition(self.gathered)
            self.gathered[0].all_gather(self.gathered)
