"""Dot products over a model's parameters: the right-hand sides of the identities of docs/DESIGN.md §1.3.

The efficiency identity says ``sum_z raw_t(z) = <g_t, G_t>``, ``g_t`` the gradient the optimizer
steps with. The adapters compute ``<g_t, G_t>`` once per step from the gradient as their
framework holds it after the training pass (sharded over data-parallel ranks, tensor-parallel
shards, tied copies); this module is the framework-independent part: an exact float64
accumulation of ``<a, b_k>`` for every target ``k`` and its reduction over process groups.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

#: Elements converted to float64 at a time: the temporaries stay small on billion-parameter
#: layers while every product is summed in float64 (a float32 sum of 10^8 products would be off
#: by more than the identities' tolerance).
CHUNK = 1 << 24


class GradientDot(NamedTuple):
    """``<a, b_k>`` per target ``[K]`` (float64, on the CPU), and ``sum_i |a_i b_ki|`` where asked
    for (how far rounding ``a`` can move the dot product: half-precision tolerances)."""

    dot: torch.Tensor
    abs_sum: torch.Tensor | None


class DotAccumulator:
    """Sums ``<a, b_k>`` over parameter pieces on one rank, then over process groups."""

    def __init__(self, n_targets: int, device: torch.device, *, with_abs: bool = False):
        self.total = torch.zeros(2, n_targets, dtype=torch.float64, device=device)
        self.with_abs = with_abs

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add one piece: ``a`` of ``n`` elements, ``b`` of ``K * n`` (``[K, n]`` or ``[K, *a.shape]``)."""
        a = a.reshape(-1)
        n = a.numel()
        b = b.reshape(-1, n)
        for start in range(0, n, CHUNK):
            x = a[start : start + CHUNK].to(self.total.device, torch.float64)
            for k in range(b.shape[0]):
                y = b[k, start : start + CHUNK].to(self.total.device, torch.float64)
                self.total[0, k] += torch.dot(x, y)
                if self.with_abs:
                    self.total[1, k] += torch.dot(x.abs(), y.abs())

    def reduce(self, *groups: dist.ProcessGroup | None) -> GradientDot:
        """Sum over every group given (``None`` entries and one-rank groups are skipped)."""
        used = self.total[: 2 if self.with_abs else 1]  # contiguous rows: no traffic for an unused sum
        for group in groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(used, group=group)
        total = self.total.cpu()
        return GradientDot(total[0], total[1] if self.with_abs else None)
