"""Where the validation gradient ``G`` lives under each ZeRO stage (``docs/DESIGN.md`` §2.5).

* ZeRO-0/1/2 keep every parameter whole on every rank, so every rank keeps the whole ``G``
  (:class:`DenseGradientStore`).
* ZeRO-3 partitions every parameter over its data-parallel group; ``G`` is partitioned the
  same way (:class:`PartitionedGradientStore`) and a layer's ``G`` is all-gathered only while
  that layer's backward scores it, then freed: the same gather ZeRO-3 does for the weights.

Both are filled by the validation pass one parameter at a time, with the gradient autograd
hands to a hook the moment it is computed (:meth:`accumulate`), so no complete set of full
gradients is ever held.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
import torch.distributed as dist

from inrun_megatron.validation import GradientStore

# torch >= 2.11 names the flat-tensor collectives *_single; older releases only have these.
_all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _store_dtype(param: torch.nn.Parameter) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class ValidationGradients(GradientStore):
    """A gradient store the DeepSpeed validation pass fills parameter by parameter.

    ``sum_over_ranks`` is True when each data-parallel rank ran its own share of the validation
    set (``validation_split="split"``): the ranks' contributions are summed.
    """

    sum_over_ranks: bool

    def accumulate(self, param: torch.nn.Parameter, k: int, grad: torch.Tensor) -> None:
        """Add this rank's gradient ``grad`` (full parameter shape) of target ``k``."""
        raise NotImplementedError

    def finish(self, n_rows: int) -> None:
        """Complete ``G`` after the last :meth:`accumulate` of a pass; only the first ``n_rows`` rows are
        filled by the pass (rows after them hold ``P ⊙ G``, docs/DESIGN.md §1.5)."""


class DenseGradientStore(ValidationGradients):
    """ZeRO-0/1/2: the whole ``G`` of every local parameter (tensor-parallel shard) on every rank."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        n_targets: int,
        *,
        dp_group: dist.ProcessGroup | None,
        sum_over_ranks: bool,
    ):
        super().__init__(params, n_targets)
        self.dp_group = dp_group
        self.sum_over_ranks = sum_over_ranks

    def accumulate(self, param: torch.nn.Parameter, k: int, grad: torch.Tensor) -> None:
        self._grads[param][k].add_(grad)

    def finish(self, n_rows: int) -> None:
        if self.sum_over_ranks and dist.get_world_size(self.dp_group) > 1:
            for g in self._grads.values():
                dist.all_reduce(g[:n_rows], group=self.dp_group)


class PartitionedGradientStore(ValidationGradients):
    """ZeRO-3: ``G`` of each parameter partitioned exactly like ``param.ds_tensor``.

    Rank ``r`` of the parameter's ``ds_process_group`` holds elements ``[r*n, (r+1)*n)`` of the
    flattened, zero-padded gradient (``n = param.partition_numel()``), for every target:
    ``[K, n]``, about ``1/DP`` of the full ``G``. ``store[param]`` gathers the full
    ``[K, *param.ds_shape]`` for one use; it is freed when the caller drops it.

    ``live_full_numel`` / ``peak_full_numel`` count the elements of full-size ``G`` tensors this
    store has created and that are still alive (gathered layers, reduce-scatter buffers): the
    measure of "no rank holds the whole ``G``" (a plain count, exact under CPython's reference
    counting, independent of the allocator).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], n_targets: int, *, sum_over_ranks: bool):
        self._grads = {}
        for p in params:
            if not hasattr(p, "ds_tensor"):
                raise TypeError(f"parameter of shape {tuple(p.shape)} is not a ZeRO-3 parameter (no ds_tensor)")
            self._grads[p] = torch.zeros(
                (n_targets, p.partition_numel()), dtype=_store_dtype(p), device=p.ds_tensor.device
            )
        self.sum_over_ranks = sum_over_ranks
        self.live_full_numel = 0
        self.peak_full_numel = 0

    @property
    def full_numel(self) -> int:
        """Elements of the whole, unpartitioned ``G`` (every parameter, every target)."""
        return sum(g.shape[0] * p.ds_numel for p, g in self._grads.items())

    @property
    def local_numel(self) -> int:
        """Elements of ``G`` this rank stores between uses (its partitions)."""
        return sum(g.numel() for g in self._grads.values())

    def _tracked(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel()
        self.live_full_numel += n
        self.peak_full_numel = max(self.peak_full_numel, self.live_full_numel)
        weakref.finalize(t, self._release, n)
        return t

    def _release(self, n: int) -> None:
        self.live_full_numel -= n

    def __getitem__(self, param: torch.nn.Parameter) -> torch.Tensor:
        part = self._grads[param]
        k, n = part.shape
        world = dist.get_world_size(param.ds_process_group)
        gathered = self._tracked(torch.empty((k, world * n), dtype=part.dtype, device=part.device))
        for target in range(k):
            _all_gather_flat(gathered[target], part[target], group=param.ds_process_group)
        # Each row's first ds_numel elements are the flattened parameter; view them in place.
        shape = tuple(param.ds_shape)
        strides = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        return gathered.as_strided((k, *shape), (world * n, *strides))

    def local_partition(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This rank's partition ``[K, n]`` of ``G``, aligned with ``param.ds_tensor`` (no gather)."""
        return self._grads[param]

    def accumulate(self, param: torch.nn.Parameter, k: int, grad: torch.Tensor) -> None:
        part = self._grads[param][k]
        n, numel = part.numel(), param.ds_numel
        group = param.ds_process_group
        flat = grad.reshape(-1)
        if self.sum_over_ranks:
            padded = self._tracked(torch.zeros(n * dist.get_world_size(group), dtype=part.dtype, device=part.device))
            padded[:numel].copy_(flat)
            mine = torch.empty_like(part)
            _reduce_scatter_flat(mine, padded, group=group)
            part.add_(mine)
        else:  # every rank computed the same full gradient: keep its own slice
            start = n * dist.get_rank(group)
            end = min(start + n, numel)
            if end > start:
                part[: end - start].add_(flat[start:end])

    def target(self, k: int) -> dict[torch.nn.Parameter, torch.Tensor]:
        raise NotImplementedError("ZeRO-3 keeps G partitioned: gather one parameter at a time with store[param]")
