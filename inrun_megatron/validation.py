"""Validation targets and the store of their gradients ``G_t`` (framework independent).

A *target* is a fixed validation set chosen before training (``docs/DESIGN.md`` §1.1): a named list of
microbatches in the same dict format the user's training batches use (``tokens``,
``labels``, optional ``loss_mask``, ``position_ids``, ``attention_mask``). Its loss is the mean
per-token cross-entropy over every loss-masked token of the whole set, so ``G_t`` does not
depend on how the set is cut into microbatches or spread over data-parallel ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

Batch = Mapping[str, torch.Tensor]


@dataclass
class ValidationTarget:
    name: str
    batches: list[Batch]

    @property
    def n_loss_tokens(self) -> int:
        """Number of tokens the validation loss averages over (loss mask respected)."""
        return int(sum(int(loss_mask_of(b).sum()) for b in self.batches))

    @property
    def seq_length(self) -> int:
        return int(self.batches[0]["tokens"].shape[-1])

    @property
    def micro_batch_size(self) -> int:
        return int(self.batches[0]["tokens"].shape[0])


def loss_mask_of(batch: Batch) -> torch.Tensor:
    """The batch's loss mask, or all ones over its labels when it has none."""
    mask = batch.get("loss_mask")
    return torch.ones_like(batch["labels"], dtype=torch.float32) if mask is None else mask


def make_batch(
    tokens: torch.Tensor, sample_ids: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """A training batch from ``tokens [b, s+1]``: inputs, next-token labels, mask, positions.

    The batch format every adapter, entry point and test uses (framework independent).
    """
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    b, s = inputs.shape
    return {
        "tokens": inputs,
        "labels": labels,
        "loss_mask": torch.ones(b, s) if loss_mask is None else loss_mask.float(),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
        "sample_ids": sample_ids,
    }


@contextlib.contextmanager
def evaluation_state(*modules: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside; training modes and every RNG state restored afterwards,
    so the training pass draws exactly the random numbers it would draw without scoring."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    rng_cpu = torch.get_rng_state()
    rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        torch.set_rng_state(rng_cpu)
        if rng_cuda is not None:
            torch.cuda.set_rng_state_all(rng_cuda)


def as_targets(validation: Sequence[Batch] | Mapping[str, Sequence[Batch]]) -> list[ValidationTarget]:
    """Accept one validation set (a list of batches, named ``"validation"``) or a dict of them."""
    if isinstance(validation, Mapping):
        return [ValidationTarget(str(name), list(batches)) for name, batches in validation.items()]
    return [ValidationTarget("validation", list(validation))]


def check_targets(targets: list[ValidationTarget], vocab_size: int) -> None:
    """Reject validation data that would give a meaningless or non-finite ``G``, before any work."""
    if not targets:
        raise ValueError("no validation target given: pass a list of validation batches or a dict of them")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"validation target names must be unique, got {names}")
    for target in targets:
        where = f"validation target {target.name!r}"
        if not target.batches:
            raise ValueError(f"{where} is empty: give it at least one batch of sequences")
        shape = None
        for i, batch in enumerate(target.batches):
            for key in ("tokens", "labels"):
                if key not in batch:
                    raise ValueError(f"{where}, batch {i}: missing key {key!r} (batches need 'tokens' and 'labels')")
            tokens, labels = batch["tokens"], batch["labels"]
            if tokens.dim() != 2 or labels.shape != tokens.shape:
                raise ValueError(
                    f"{where}, batch {i}: 'tokens' and 'labels' must both be [batch, seq], got "
                    f"{tuple(tokens.shape)} and {tuple(labels.shape)}"
                )
            if shape is not None and tokens.shape != shape:
                raise ValueError(
                    f"{where}, batch {i}: shape {tuple(tokens.shape)} differs from batch 0's {tuple(shape)};"
                    " pad every validation batch to the same [batch, seq] shape (loss_mask 0 on padding)"
                )
            shape = tokens.shape
            for key in ("tokens", "labels"):
                t = batch[key]
                if t.is_floating_point():
                    raise ValueError(f"{where}, batch {i}: {key!r} must hold integer token ids, got {t.dtype}")
                lo, hi = int(t.min()), int(t.max())
                if lo < 0 or hi >= vocab_size:
                    raise ValueError(
                        f"{where}, batch {i}: {key!r} holds token id {lo if lo < 0 else hi} outside the"
                        f" model's vocabulary [0, {vocab_size})"
                    )
            mask = batch.get("loss_mask")
            if mask is not None and mask.shape != tokens.shape:
                raise ValueError(f"{where}, batch {i}: 'loss_mask' shape {tuple(mask.shape)} != tokens shape")
        if target.n_loss_tokens == 0:
            raise ValueError(f"{where} has no token with a nonzero loss mask: its loss is undefined")


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` (on one device) is finite.

    A sum is finite only if all its summands are (an inf or NaN never cancels to a finite value),
    so one sum per tensor and a single host read decide the usual case in one pass over the data,
    where ``isfinite().all()`` per tensor reads it twice, allocates a mask and waits for the device
    once per tensor. Only a non-finite sum, which finite values can also give by overflowing, is
    checked element by element.
    """
    tensors = list(tensors)
    if not tensors or bool(torch.isfinite(torch.stack([t.sum() for t in tensors])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class GradientStore:
    """``G`` for every scored parameter, stacked over targets: ``store[param] -> [K, *param.shape]``.

    With Adam-aware values (``docs/DESIGN.md`` §1.5) it holds ``2K`` rows: ``G`` of each target,
    then ``P_t ⊙ G`` of each; ``n_targets`` counts rows.

    Holds exactly the locally held shard of each parameter (tensor/pipeline parallel), in
    float32 (float64 for float64 parameters), so bf16 runs do not round the validation gradient.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], n_targets: int):
        self._grads = {}
        for p in params:
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            self._grads[p] = torch.zeros((n_targets, *p.shape), dtype=dtype, device=p.device)

    def __getitem__(self, param: torch.nn.Parameter) -> torch.Tensor:
        return self._grads[param]

    @property
    def n_targets(self) -> int:
        return next(iter(self._grads.values())).shape[0]

    def __contains__(self, param: torch.nn.Parameter) -> bool:
        return param in self._grads

    def params(self) -> list[torch.nn.Parameter]:
        return list(self._grads)

    def local_rows(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The rows of ``param`` as this rank stores them (whole, or a ZeRO-3 partition), to write into."""
        return self._grads[param]

    def values(self) -> list[torch.Tensor]:
        """Every stored ``[K, *param.shape]`` gradient."""
        return list(self._grads.values())

    def target(self, k: int) -> dict[torch.nn.Parameter, torch.Tensor]:
        """Views of target k's gradient, per parameter."""
        return {p: g[k] for p, g in self._grads.items()}
