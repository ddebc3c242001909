"""In-Run Data Shapley for a model trained by plain PyTorch autograd, in one process or under DDP.

The third adapter, next to Megatron's and DeepSpeed's, for training loops that call
``loss.backward()`` themselves (the Hugging Face ``Trainer`` without DeepSpeed,
:mod:`inrun_megatron.hf_trainer`): the model is whole on every rank, the validation gradient ``G``
is dense and replicated, and data parallelism (if any) is ``torch.nn.parallel.DistributedDataParallel``,
which *averages* the ranks' gradients. One step::

    scorer.begin_step(n_microbatches, micro_batch_size)   # validation pass at w_t; scoring on
    for batch in micro_batches:                           # the caller's own backward (DDP no_sync
        loss_fn(model, batch).backward()                  # on all but the last, as usual)
    scorer.finish_step(sample_ids, n_tokens)              # after the last backward, before clipping
    optimizer.step()
    result = scorer.end_step(clip_coef=...)               # lr from the optimizer before its step

What a raw score is (``docs/DESIGN.md`` §1.1): each rank back-propagates its own loss ``L_r``; DDP
hands the optimizer ``g = (1/DP) Σ_r ∇L_r``, so sample ``z`` (on rank ``r``) has
``l_z = (z's term of L_r) / DP``. Both scoring paths see this rank's backward of ``L_r`` (the layers'
output gradients, the parameters' gradients before DDP's hooks), so the local scores are divided by
the data-parallel size. Whatever the caller divided ``L_r`` by (gradient accumulation,
``num_items_in_batch``) is already in that backward. No fp16 loss scaling: gradients are the loss's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from inrun_megatron.config import ScoringConfig
from inrun_megatron.gradient_dot import DotAccumulator
from inrun_megatron.hf_rules import registered_builders
from inrun_megatron.optimizer_values import ADAM, is_adam, torch_adam_preconditioner
from inrun_megatron.scorer import Scorer, Stopwatch
from inrun_megatron.step_result import ResultSink, StepResult
from inrun_megatron.validation import (
    Batch,
    GradientStore,
    ValidationTarget,
    check_targets,
    evaluation_state,
    loss_mask_of,
    masked_loss_sum,
)
from inrun_megatron.validation_pass import run_validation_pass

TokenLosses = Callable[[torch.nn.Module, Batch], torch.Tensor]


class _ModuleBackward:
    """One target's validation backward through the bare module (a
    :class:`~inrun_megatron.validation_pass.TargetBackward`): ``torch.autograd.grad`` returns the
    gradient instead of accumulating it into ``.grad``, so neither the training gradient nor DDP's
    reducer (armed only by the wrapper's forward, fired only by gradient accumulation) sees it."""

    def __init__(self, module: torch.nn.Module, store: GradientStore, token_losses: TokenLosses):
        self.module, self.store, self.token_losses = module, store, token_losses

    def isolated(self, loss_scale: float):
        return evaluation_state(self.module)

    def backward_target(self, k: int, target: ValidationTarget, loss_scale: float) -> torch.Tensor:
        params = self.store.params()
        sums = []
        for batch in target.batches:
            losses = self.token_losses(self.module, batch)
            loss_sum = masked_loss_sum(losses, loss_mask_of(batch), source="token_losses(model, batch)")
            sums.append(loss_sum.detach().double())
            grads = torch.autograd.grad(loss_sum * (loss_scale / target.n_loss_tokens), params, allow_unused=True)
            for param, grad in zip(params, grads):
                if grad is not None:
                    self.store[param][k].add_(grad)
        return torch.stack(sums).sum()

    def complete_gradients(self) -> None:
        """Every rank ran the whole validation set: its ``G`` is complete."""


class TorchScorer(Scorer):
    """Exact per-sample scores for a model trained by plain autograd (see the module docstring).

    Args:
        module: the bare model (not its DDP wrapper); with micro-batch size 1 any model, otherwise
            one built from layers with a registered score rule (:func:`inrun_megatron.register_rule`).
        validation: the validation set (batches in the training batch format) or ``{name: batches}``,
            the same on every rank.
        token_losses: ``token_losses(module, batch) -> [b, s]`` per-token losses of the validation loss.
        micro_batch_size: sequences per micro-batch (picks the scoring path before any work).
        optimizer: the torch optimizer that steps ``module``'s parameters; its learning rate is read
            at :meth:`begin_step`, and if it is Adam/AdamW the Adam-aware value is scored too
            (``docs/DESIGN.md`` §1.5) unless ``config.optimizer_values`` is False.
        dp_group: the data-parallel group DDP averages over (None: the default group, if any).
        vocab_size: the model's vocabulary size (checks the validation token ids).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        validation: Sequence[Batch] | Mapping[str, Sequence[Batch]],
        token_losses: TokenLosses,
        config: ScoringConfig | None = None,
        *,
        micro_batch_size: int,
        optimizer: torch.optim.Optimizer,
        vocab_size: int,
        dp_group: dist.ProcessGroup | None = None,
        sink: ResultSink | None = None,
    ):
        super().__init__(validation, config, sink)
        if self.config.validation_split != "replicate":
            raise NotImplementedError(
                "the plain PyTorch scorer runs the whole validation set on every rank:"
                " use ScoringConfig(validation_split='replicate')"
            )
        check_targets(self.targets, vocab_size)
        self.module, self.token_losses, self.optimizer, self._dp_group = module, token_losses, optimizer, dp_group
        device = next(module.parameters()).device
        for target in self.targets:
            target.batches = [{k: v.to(device) for k, v in b.items()} for b in target.batches]
        if self.config.optimizer_values and is_adam(optimizer):
            self.score_adam_values()
        try:
            self.build_sites([("", module)], registered_builders(), registry=True)
            self.path = self.path_for(micro_batch_size)  # refuses what neither path can score
        except Exception:
            self.detach()
            raise
        self._lr: float | None = None
        self._stopwatch: Stopwatch | None = None
        self._validation_losses: dict[str, float] = {}

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self._dp_group

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(self.dp_group) if dist.is_initialized() else 1

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group) if dist.is_initialized() else 0

    def begin_step(self, n_microbatches: int, micro_batch_size: int) -> None:
        """Before the step's first training backward: ``G`` at the current weights (and ``P ⊙ G``),
        the learning rate the step will use, then scoring on for ``n_microbatches`` backwards."""
        self._stopwatch = Stopwatch(self.pass_clock)
        self.path_for(micro_batch_size)  # refuses before the validation pass
        self._validation_losses = run_validation_pass(
            self.targets,
            self.grads,
            _ModuleBackward(self.module, self.grads, self.token_losses),
            loss_scale=1.0,
            loss_groups=[],
            step=self.step,
        )
        if ADAM in self.value_kinds:
            self.precondition({p: torch_adam_preconditioner(self.optimizer, p) for p in self.grads.params()})
        self._stopwatch.lap()
        lrs = {group["lr"] for group in self.optimizer.param_groups}
        self._lr = lrs.pop() if len(lrs) == 1 else None
        self.begin_scoring(n_microbatches, micro_batch_size)

    def finish_step(self, sample_ids: torch.Tensor, n_tokens: torch.Tensor) -> None:
        """After the step's last backward (DDP has averaged the gradients), before clipping and the
        optimizer step: reduce the scores. ``sample_ids``/``n_tokens`` ``[M, B]``: each sequence's
        global sample id and loss tokens, in the order of the backwards."""
        raw = self.end_scoring(completed=True)
        if tuple(sample_ids.shape) != tuple(raw.shape[1:]):
            raise ValueError(
                f"finish_step got sample ids of shape {tuple(sample_ids.shape)} for {raw.shape[1]} scored"
                f" micro-batches of {raw.shape[2]} sequences"
            )
        raw /= self.dp_size  # DDP averages the ranks' gradients (module docstring)
        self._stopwatch.lap()
        device = raw.device
        self.finish_pass(
            raw,
            sample_ids.to(device, torch.int64),
            n_tokens.to(device, torch.int64),
            self._validation_losses,
            self.gradient_dots(),
            self._stopwatch,
        )

    def gradient_dots(self) -> torch.Tensor:
        """``<g, G>`` per score row: ``g`` the parameters' ``.grad`` as the optimizer will step with
        it (DDP leaves the same averaged gradient on every rank, so no reduction), before clipping."""
        total = DotAccumulator(self.grads.n_targets, self.grads.params()[0].device)
        for param in self.grads.params():
            if param.grad is not None:
                total.add(param.grad, self.grads[param])
        return total.reduce().dot

    def end_step(self, *, lr: float | None = None, clip_coef: float = 1.0, skipped: bool = False) -> StepResult:
        """Close the step after the optimizer step; ``lr`` defaults to the one read at :meth:`begin_step`."""
        if lr is None:
            if self._lr is None:
                raise ValueError("the optimizer's parameter groups have different learning rates: pass lr= explicitly")
            lr = self._lr
        return super().end_step(lr=lr, clip_coef=clip_coef, skipped=skipped)
