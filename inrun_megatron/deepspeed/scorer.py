"""In-Run Data Shapley for models trained with DeepSpeed: attach to an engine, score each step.

Usage (a complete loop is in the README)::

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    scorer = DeepSpeedScorer(engine, validation=val_batches, token_losses=lm_token_losses)
    for step in range(n_steps):
        micro_batches = [next(batches) for _ in range(engine.gradient_accumulation_steps())]
        losses = scorer.forward_backward(micro_batches)  # validation pass, then the scored micro-steps
        engine.step()                                    # the optimizer step: clips, may skip (fp16)
        result = scorer.end_step()                       # lr, clip coefficient, skipped: from the engine
        # result.records: this step's rows, also written to the scorer's sink (e.g. a ScoreWriter)
    scorer.detach()

Every batch carries ``sample_ids`` ``[micro_batch_size]`` (the dataset index of each sequence)
next to ``tokens``/``labels``/``loss_mask``. ``token_losses(model, batch)`` returns the per-token
losses ``[b, s]``; it defines the validation loss (their masked mean over the validation set)
and, unless ``forward_backward`` gets its own ``loss_fn``, the training loss (their masked mean
over each micro-batch, as Hugging Face models compute it).

Two scoring paths give the same scores (``docs/DESIGN.md`` §2.2, §2.3); the engine's micro-batch size picks
one at attach (``ScoringConfig.path`` forces either):

* micro-batch size 1: the *microbatch-gradient path*. The micro-batch's one sequence owns the
  micro-step's whole gradient, so its score is that gradient dotted with ``G``, parameter by
  parameter, from a tensor hook on each parameter (:mod:`inrun_megatron.microbatch_gradients`).
  Any module with trainable parameters is scored: unmodified Hugging Face models
  (:func:`inrun_megatron.deepspeed.model.hf_causal_lm_token_losses`), anything with a gradient.
  The hook sees this micro-step's local gradient before DeepSpeed touches it: DeepSpeed 0.19's
  ZeRO-1/2/3 and bf16 optimizers reduce, partition or copy gradients in
  ``register_post_accumulate_grad_hook`` hooks, which autograd runs after a parameter's tensor
  hooks, and ZeRO-0 all-reduces after the backward. Under ZeRO-3 the hook receives the full
  gathered gradient and gathers that one parameter's ``G`` (the same all-gather on every rank, in
  the backward's order).
* larger micro-batches: per-layer rules inside each layer's backward, for models built from layers
  with a registered rule (:func:`inrun_megatron.register_rule`: ``nn.Linear``, ``nn.Embedding``,
  ``nn.LayerNorm``, ``nn.RMSNorm``, the Hugging Face layers of :mod:`inrun_megatron.hf_rules`, the
  user's own) or from megatron-core tensor-parallel layers; another trainable module is refused at
  attach.

What a raw score is (``docs/DESIGN.md`` §1): ``<grad l_z, G>`` where ``l_z`` is sample z's term of the loss
the optimizer received. DeepSpeed divides each micro-step's loss by the gradient accumulation
steps, multiplies it by the fp16 loss scale and averages gradients over the data-parallel
ranks; both paths see the first two (in the layers' output gradients, in the parameters'
gradients), so each micro-step's scores are divided by the factor DeepSpeed's backward actually
applied to its loss (measured, not assumed) times GAS and by the data-parallel size.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.utils import clip_grad_norm_

from inrun_megatron.config import ScoringConfig
from inrun_megatron.deepspeed.gradient_dot import model_norm, model_parallel_group, optimizer_gradient_dot
from inrun_megatron.deepspeed.gradients import DenseGradientStore, PartitionedGradientStore, ValidationGradients
from inrun_megatron.deepspeed.optimizer_state import adam_preconditioners, is_adam_engine
from inrun_megatron.deepspeed.partitioned_weights import PartitionedDisplacement
from inrun_megatron.deepspeed.validation_pass import DeepSpeedTargetBackward, TokenLosses, gradients_discarded
from inrun_megatron.hf_rules import registered_builders
from inrun_megatron.optimizer_values import ADAM, CURVATURE
from inrun_megatron.rng import RngState
from inrun_megatron.scorer import Scorer, Stopwatch, clip_coefficient
from inrun_megatron.second_order import central_difference_hvp, finite_difference_step
from inrun_megatron.step_result import ResultSink, StepResult
from inrun_megatron.validation import Batch, check_targets, loss_mask_of, masked_loss_sum
from inrun_megatron.validation_pass import run_validation_pass

if TYPE_CHECKING:
    from inrun_megatron.megatron_core_layers import MegatronCoreLayers

LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]

SUPPORTED = (
    "Supported: a DeepSpeedEngine from deepspeed.initialize(model=...) with ZeRO stage 0, 1, 2 or 3 (no offload),"
    " gradient accumulation, gradient clipping, fp32, bf16, fp16 (with ZeRO stage >= 1), and tensor parallelism"
    " from megatron-core layers (mpu=inrun_megatron.deepspeed.MegatronMPU())."
)


def _offloaded(offload_config) -> bool:
    device = getattr(offload_config, "device", None)
    return device is not None and str(getattr(device, "value", device)) != "none"


def refuse_unsupported(engine) -> None:
    """Raise before any work if ``engine`` uses a DeepSpeed feature the scorer cannot follow exactly."""
    if not hasattr(engine, "zero_optimization_stage"):
        raise TypeError(f"expected the engine returned by deepspeed.initialize(), got {type(engine).__name__}")
    checks = {
        "DeepSpeed's PipelineEngine (pipeline parallelism; the Megatron adapter scores pipeline-parallel runs)": (
            isinstance(engine, PipelineEngine)
        ),
        "ZeRO optimizer offload (zero_optimization.offload_optimizer)": _offloaded(engine.zero_offload_optimizer()),
        "ZeRO parameter offload (zero_optimization.offload_param)": _offloaded(engine.zero_offload_param()),
        "mixture-of-experts layers": engine.has_moe_layers,
        "ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1)": engine.zero_hpz_partition_size() > 1,
        "ZeRO++ quantized weights or gradients": engine.zero_quantized_weights() or engine.zero_quantized_gradients(),
        "torch_autocast": engine.torch_autocast_enabled(),
        "managed_gradient_accumulation=false": not engine.managed_gradient_accumulation(),
        "AutoTP (tensor_parallel.autotp_size > 1)": (engine.autotp_size() or 1) > 1,
        "Ulysses sequence parallelism": getattr(engine, "sequence_parallel_size", 1) > 1,
        "DeepCompile": engine.is_deepcompile_enabled(),
        "ZenFlow": bool(getattr(engine, "zenflow", False)),
        # engine.backward scales the loss only for ZeRO optimizers, yet DeepSpeed's stage-0 fp16
        # optimizer divides the gradient by its loss scale: the update is not the gradient's.
        "fp16 without ZeRO (use ZeRO stage >= 1 with fp16, or bf16)": (
            engine.fp16_enabled() and engine.zero_optimization_stage() == 0
        ),
    }
    refused = [name for name, on in checks.items() if on]
    if refused:
        raise NotImplementedError(
            f"inrun_megatron cannot score this DeepSpeed engine; unsupported: {'; '.join(refused)}. {SUPPORTED}"
        )


def _vocab_size(module: torch.nn.Module) -> int:
    for holder in (module, getattr(module, "config", None)):
        size = getattr(holder, "vocab_size", None)
        if isinstance(size, int):
            return size
    raise ValueError(
        f"cannot tell the vocabulary size of {type(module).__name__} (no vocab_size or config.vocab_size):"
        " pass vocab_size= to DeepSpeedScorer"
    )


def masked_token_mean(token_losses: TokenLosses) -> LossFn:
    """The default training loss: the mean of ``token_losses`` over a micro-batch's loss-masked
    tokens (what Hugging Face causal LMs return)."""

    def loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        mask = loss_mask_of(batch)
        loss_sum = masked_loss_sum(token_losses(model, batch), mask, source="token_losses(model, batch)")
        return loss_sum / mask.sum().clamp(min=1.0)

    return loss


def _is_megatron_model(module: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("megatron.core.") for m in module.modules())


def _on_device(batch: Batch, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class DeepSpeedScorer(Scorer):
    """Exact per-sample In-Run Data Shapley scores for a model trained by a DeepSpeed engine.

    Args:
        engine: the ``DeepSpeedEngine`` returned by ``deepspeed.initialize``. With
            ``train_micro_batch_size_per_gpu`` 1 its module may be any model; with larger
            micro-batches it is built from layers with a registered score rule
            (:func:`inrun_megatron.register_rule`; weights may be tied) or megatron-core
            tensor-parallel layers.
        validation: the validation set (a list of batches in the training batch format), or a dict
            ``{target name: batches}`` of several sets, each scored separately. Every rank passes
            the same batches.
        token_losses: ``token_losses(model, batch) -> [b, s]`` per-token losses (e.g.
            :func:`inrun_megatron.deepspeed.model.lm_token_losses`,
            :func:`~inrun_megatron.deepspeed.model.hf_causal_lm_token_losses`); called with the
            engine in training and with ``engine.module`` in the validation pass.
        config: scoring options (``path``: which scoring path; see the module docstring). When the
            engine's optimizer is Adam/AdamW, every step also records the Adam-aware value
            (``docs/DESIGN.md`` §1.5) unless ``config.optimizer_values`` is False.
        vocab_size: the model's vocabulary size, when neither ``module.vocab_size`` nor
            ``module.config.vocab_size`` gives it (used to check the validation token ids).
        sink: where :meth:`end_step` writes each step's result (see :class:`~inrun_megatron.scorer.Scorer`).
    """

    def __init__(
        self,
        engine,
        validation: Sequence[Batch] | Mapping[str, Sequence[Batch]],
        token_losses: TokenLosses,
        config: ScoringConfig | None = None,
        *,
        vocab_size: int | None = None,
        sink: ResultSink | None = None,
    ):
        super().__init__(validation, config, sink)
        refuse_unsupported(engine)
        if self.config.second_order:
            check_second_order_supported(engine)
            self.score_second_order()
        self.engine = engine
        self.token_losses = token_losses
        self.models = [engine.module]
        self.zero_stage = int(engine.zero_optimization_stage())
        check_targets(self.targets, vocab_size or _vocab_size(engine.module))
        self._check_validation_split()
        for target in self.targets:  # moved to the model's device once, not every step
            target.batches = [_on_device(b, engine.device) for b in target.batches]
        self._lr: float | None = None
        self._global_steps_at_forward: int | None = None
        self._fp32_clip_norm: float | None = None
        # ε of the last curvature pass's central difference (docs/DESIGN.md §1.7), None before one ran
        self.finite_difference_step: float | None = None
        # megatron-core layers (tensor parallelism inside DeepSpeed): their counting, tied output
        # weight and site builders come from the megatron-core layer support.
        self.megatron_layers: MegatronCoreLayers | None = None
        if self.config.optimizer_values and is_adam_engine(engine):
            self.score_adam_values()
        try:
            if _is_megatron_model(engine.module):
                from inrun_megatron.deepspeed.megatron_tp import megatron_core_layers

                self.megatron_layers = megatron_core_layers(engine, self.config)
                self.build_sites([("", engine.module)], self.megatron_layers.attach(self))
            else:
                self.build_sites([("", engine.module)], registered_builders(), registry=True)
            self.micro_batch_size = int(engine.train_micro_batch_size_per_gpu())
            self.path = self.path_for(self.micro_batch_size)  # refuses what neither path can score
            self._record_fp32_clip_norm()
        except Exception:
            self.detach()
            raise

    # ----------------------------------------------------------------------------------
    # layout

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.engine.data_parallel_group

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(group=self.dp_group)

    @property
    def dp_size(self) -> int:
        return dist.get_world_size(group=self.dp_group)

    def make_gradient_store(self, params: list[torch.nn.Parameter]) -> ValidationGradients:
        split = self.config.validation_split == "split"
        if self.zero_stage == 3:
            return PartitionedGradientStore(params, self.n_store_rows, sum_over_ranks=split)
        return DenseGradientStore(params, self.n_store_rows, dp_group=self.dp_group, sum_over_ranks=split)

    def counts(self, param: torch.nn.Parameter) -> bool:
        return self.megatron_layers is None or self.megatron_layers.counts(param)

    def tied_output_weight(self, name: str, module: torch.nn.Module) -> torch.nn.Parameter:
        if self.megatron_layers is None:
            return super().tied_output_weight(name, module)
        return self.megatron_layers.tied_output_weight(name, module)

    def _check_validation_split(self) -> None:
        if self.config.validation_split != "split":
            return
        for t in self.targets:
            if len(t.batches) < self.dp_size:
                raise ValueError(
                    f"validation target {t.name!r} has {len(t.batches)} batches, fewer than the {self.dp_size}"
                    " data-parallel ranks it is split over; use validation_split='replicate' or more batches"
                )

    def local_validation_batches(self, target) -> list[tuple[Batch, float]]:
        """This rank's validation batches with their weights in the validation loss.

        Under ZeRO-3 with a split set every rank runs the same number of backward passes (each
        partitions ``G`` collectively); ranks with one batch fewer repeat a batch with weight 0.
        """
        batches = target.batches
        if self.config.validation_split == "split":
            batches = target.batches[self.dp_rank :: self.dp_size]
        weighted = [(b, 1.0) for b in batches]
        if self.zero_stage == 3 and self.config.validation_split == "split":
            rounds = -(-len(target.batches) // self.dp_size)
            weighted += [(batches[0], 0.0)] * (rounds - len(batches))
        return weighted

    def fp16_loss_scale(self) -> float:
        """DeepSpeed's current fp16 loss scale (1.0 unless fp16)."""
        if not self.engine.fp16_enabled():
            return 1.0
        return float(self.engine.optimizer.loss_scale)

    def gradient_dots(self) -> torch.Tensor:
        """``<g, G>`` per target, ``g`` as the engine's optimizer will step with it (reduced over
        data parallelism, before clipping), the fp16 loss scale removed."""
        return optimizer_gradient_dot(self.engine, self.grads, self.counts).dot / self.fp16_loss_scale()

    def validation_pass(self, into: ValidationGradients | None = None) -> dict[str, float]:
        """``G`` of every target at the current weights (``docs/DESIGN.md`` §2.1) into the store of
        ``G`` (or ``into``: the curvature pass's scratch store); the losses."""
        split = self.config.validation_split == "split"
        store = self.grads if into is None else into
        backward = DeepSpeedTargetBackward(
            module=self.engine.module,
            store=store,
            token_losses=self.token_losses,
            batches=[self.local_validation_batches(t) for t in self.targets],
            release_parameters=self.release_gathered_parameters,
        )
        return run_validation_pass(
            self.targets,
            store,
            backward,
            loss_scale=self.fp16_loss_scale(),
            loss_groups=[self.dp_group] if split else [],
            step=self.step,
        )

    def release_gathered_parameters(self) -> None:
        """ZeRO-3: re-partition parameters whose release hook a gradient-free input skipped, as
        DeepSpeed does after each of its own backward passes."""
        offload = getattr(self.engine.optimizer, "parameter_offload", None)
        if offload is not None:
            offload.release_backward_leftovers()

    # ----------------------------------------------------------------------------------
    # per-step work

    def forward_backward(
        self, micro_batches: Sequence[Batch], loss_fn: LossFn | None = None, *, scale_wrt_gas: bool = True
    ) -> list[float]:
        """Run one optimizer step's micro-steps with scoring; leave the optimizer step to the caller.

        Computes the validation gradient at the current weights, then for each of the
        ``gradient_accumulation_steps()`` micro-batches runs ``loss = loss_fn(engine, batch)``,
        ``engine.backward(loss)`` and, for all but the last, ``engine.step()`` (DeepSpeed's
        non-boundary micro-step). Afterwards the gradients are complete and reduced exactly as in
        the unscored loop; call ``engine.step()`` and then :meth:`end_step`. Returns the
        micro-batch losses.

        ``scale_wrt_gas`` is passed to ``engine.backward``: False for losses already normalised over
        the whole accumulated batch (the Hugging Face ``Trainer``'s), which DeepSpeed must not divide
        by the accumulation steps again.
        """
        engine = self.engine
        micro_batches = list(micro_batches)
        sample_ids = self._check_step_input(micro_batches)
        micro_batches = [_on_device(b, engine.device) for b in micro_batches]
        self._fp32_clip_norm = None
        stopwatch = Stopwatch(self.pass_clock)
        validation_losses = self.validation_pass()
        if ADAM in self.value_kinds:
            self.precondition(adam_preconditioners(engine, self.grads.params()))
        stopwatch.lap()
        lrs = set(engine.get_lr())
        self._lr = lrs.pop() if len(lrs) == 1 else None
        self._global_steps_at_forward = engine.global_steps
        loss_fn = loss_fn or masked_token_mean(self.token_losses)
        n_micro, mbs = sample_ids.shape
        applied = torch.zeros(n_micro, dtype=torch.float64)
        losses = []
        second_order = CURVATURE in self.value_kinds
        rng_at_start = RngState.capture() if second_order else None  # the curvature pass replays from here
        self.begin_scoring(n_micro, mbs)
        completed = False
        try:
            for m, batch in enumerate(micro_batches):
                loss = loss_fn(engine, batch)
                loss.register_hook(functools.partial(_record_factor, applied, m))
                engine.backward(loss, scale_wrt_gas=scale_wrt_gas)
                losses.append(float(loss.detach()))
                if m < n_micro - 1:
                    engine.step()
            completed = True
        finally:
            raw = self.end_scoring(completed)
        stopwatch.lap()
        if (applied == 0).any():
            raise RuntimeError("the training loss did not reach the model's backward; check loss_fn")
        mp_group = model_parallel_group(engine)
        if mp_group is not None and dist.get_world_size(group=mp_group) > 1:
            dist.all_reduce(raw, group=mp_group)
        # Per micro-step: undo the factor the backward applied (loss scale / GAS, or the loss scale
        # alone without scale_wrt_gas), then divide by the GAS DeepSpeed applied and the DP size:
        # l_z = (z's term of the micro-batch loss) / (GAS * DP), or / DP without scale_wrt_gas.
        gas = engine.gradient_accumulation_steps() if scale_wrt_gas else 1
        normaliser = (applied.to(raw.device) * gas * self.dp_size).view(1, n_micro, 1)
        raw /= normaliser
        batch_dots = self.gradient_dots()
        if second_order:
            with stopwatch.curvature_pass():
                curvature, curvature_dots = self.curvature_pass(micro_batches, loss_fn, applied, rng_at_start)
            raw, batch_dots = torch.cat([raw, curvature / normaliser]), torch.cat([batch_dots, curvature_dots])
        n_tokens = torch.stack([loss_mask_of(b).sum(-1) for b in micro_batches]).round().to(torch.int64)
        self.finish_pass(raw, sample_ids, n_tokens.to(raw.device), validation_losses, batch_dots, stopwatch)
        return losses

    def curvature_pass(
        self, micro_batches: list[Batch], loss_fn: LossFn, applied: torch.Tensor, rng_at_start: RngState
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's ``<grad l_z, H_val g_t>`` per target ``[K, M, B]``, still multiplied by the
        factor each micro-step's backward applied (the caller normalises it as the raw scores), and
        ``<g_t, H_val g_t>`` per target ``[K]`` (``docs/DESIGN.md`` §1.7, §2.10).

        Runs after the boundary micro-step's backward (``g_t`` reduced where DeepSpeed keeps it) and
        before ``engine.step()``. ``g_t`` is read whole with ``safe_get_full_grad`` (ZeRO-1/2: the
        owned fragments summed over the data-parallel ranks); under ZeRO-3 each rank reads and moves
        only its partitions (:class:`~inrun_megatron.deepspeed.partitioned_weights.PartitionedDisplacement`).
        The validation passes at ``w ± εg_t`` and the replay backward through ``torch.autograd.grad``,
        so no ``.grad``, ZeRO hook, bucket or gradient partition is touched; the weights are restored
        bitwise and the RNG streams left where the training pass left them. The replay runs each
        micro-batch through ``loss_fn`` on the bare module (as the validation pass does: the
        engine's forward would arm its backward prologue) in training mode, from the RNG state the
        training pass started from, and scales its loss by the factor the training backward
        applied to it; as in the validation pass, autograd's gradients are dropped the moment each
        is scored, and ZeRO-3 parameters left gathered are re-partitioned afterwards. With megatron-core
        tensor-parallel layers each rank holds its shard of a split weight's ``g_t`` (a replicated
        weight's whole): ``ε`` comes from norms that count each weight once over the model-parallel
        group, the validation passes run megatron's own tensor-parallel reductions, and the
        replay's partials are summed over the model-parallel group as the raw scores are."""
        from deepspeed.utils import safe_get_full_grad

        engine = self.engine
        n_targets, (n_micro, mbs) = len(self.targets), (len(micro_batches), self.micro_batch_size)
        params = self.grads.params()
        rng_after_training = RngState.capture()
        partitions = PartitionedDisplacement(params, self.dp_group) if self.zero_stage == 3 else None
        if partitions is not None:  # each rank moves its partitions of the weights (docs/DESIGN.md §2.10)
            moved, direction = partitions.weights, partitions.direction
        else:
            g = {}
            for p in params:  # collective under ZeRO-1/2: every rank reads every parameter, in order
                full = safe_get_full_grad(p)
                g[p] = torch.zeros_like(p) if full is None else full.detach().to(p.dtype)
            moved, direction = params, [g[p] for p in params]
        with rng_after_training.restored(), self._recomputation_held_off():
            if partitions is not None:
                weight_norm, g_norm = partitions.norms(self.counts, model_parallel_group(engine))
            else:  # each weight once over the model: ε is the same on every rank (tensor parallelism: §2.10)
                weight_norm = model_norm(engine, {p: p.detach() for p in params}, self.counts)
                g_norm = model_norm(engine, g, self.counts)
            if not math.isfinite(g_norm):
                nan = torch.full((n_targets, n_micro, mbs), float("nan"), dtype=torch.float64, device=engine.device)
                return nan, torch.full((n_targets,), float("nan"), dtype=torch.float64, device=engine.device)
            hvp = self.make_curvature_store(params)
            step = finite_difference_step(weight_norm, g_norm, hvp.values()[0].dtype)
            self.finite_difference_step = step
            shifted = self.make_curvature_store(params)  # G at w ± εg; the store keeps the step's own G

            def validation_gradients() -> list[torch.Tensor]:
                if partitions is not None:
                    partitions.refresh_gathered()
                self.validation_pass(into=shifted)
                return shifted.values()

            try:
                central_difference_hvp(moved, direction, step, validation_gradients, hvp.values())
            finally:
                if partitions is not None:
                    partitions.refresh_gathered()
            store, self.grads = self.grads, hvp
            try:
                rng_at_start.restore()
                self.begin_scoring(n_micro, mbs)
                completed = False
                try:
                    with gradients_discarded(params, self.release_gathered_parameters):
                        for m, batch in enumerate(micro_batches):
                            loss = loss_fn(engine.module, batch)
                            torch.autograd.grad(loss * float(applied[m]), params, allow_unused=True)
                    completed = True
                finally:
                    curvature = self.end_scoring(completed)
            finally:
                self.grads = store
        mp_group = model_parallel_group(engine)
        if mp_group is not None and dist.get_world_size(group=mp_group) > 1:
            dist.all_reduce(curvature, group=mp_group)
        dots = optimizer_gradient_dot(engine, hvp, self.counts).dot / self.fp16_loss_scale()
        return curvature, dots

    def _recomputation_held_off(self) -> contextlib.AbstractContextManager:
        """megatron-core layers' reentrant activation recomputation off for the curvature pass
        (its replay backwards with ``torch.autograd.grad``, which megatron's checkpoint refuses)."""
        if self.megatron_layers is None:
            return contextlib.nullcontext()
        from inrun_megatron.deepspeed.megatron_tp import reentrant_recomputation_off

        return reentrant_recomputation_off(self.engine.module)

    def make_curvature_store(self, params: list[torch.nn.Parameter]) -> ValidationGradients:
        """A store of one row per target, laid out as the store of ``G`` (partitioned under ZeRO-3):
        ``H_val g_t``, or ``G`` at ``w ± εg_t``."""
        split = self.config.validation_split == "split"
        if self.zero_stage == 3:
            return PartitionedGradientStore(params, len(self.targets), sum_over_ranks=split)
        return DenseGradientStore(params, len(self.targets), dp_group=self.dp_group, sum_over_ranks=split)

    def _check_step_input(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Check the step's input on every rank before any work; return the sample ids ``[M, B]``.

        A rank that would fail alone would leave the others waiting in a collective, so the
        verdict is agreed over all ranks first.
        """
        engine = self.engine
        gas = engine.gradient_accumulation_steps()
        error = None
        if self._pending is not None:
            error = "call end_step() after each forward_backward() before starting the next step"
        elif len(micro_batches) != gas:
            error = (
                f"forward_backward() takes the {gas} micro-batches of one optimizer step"
                f" (gradient_accumulation_steps), got {len(micro_batches)}"
            )
        elif engine.micro_steps % gas:
            error = (
                f"the engine is {engine.micro_steps % gas} micro-steps into an accumulation cycle; call"
                " forward_backward() only right after an optimizer step (engine.step() at a boundary)"
            )
        else:
            error = _batch_format_error(micro_batches, self.micro_batch_size, self.path)
        flags = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=engine.device)
        flags[dist.get_rank()] = error is not None
        dist.all_reduce(flags)
        if flags.any():
            failing = flags.nonzero().flatten().tolist()
            raise ValueError(
                f"step {self.step}: {error or f'rank(s) {failing} rejected their input (see their error)'}."
                " Nothing of this step was run."
            )
        ids = torch.stack([torch.as_tensor(b["sample_ids"]).reshape(-1) for b in micro_batches])
        ids = ids.to(device=engine.device, dtype=torch.int64)
        self._check_sample_ids(ids)
        return ids

    def end_step(
        self, *, lr: float | None = None, clip_coef: float | None = None, skipped: bool | None = None
    ) -> StepResult:
        """Close the step after ``engine.step()``; arguments left out are read from the engine.

        ``lr``: the learning rate the optimizer step used (read before the step, so a scheduler
        stepping afterwards does not shift it); ``clip_coef``: the factor gradient clipping
        multiplied the gradient by, from DeepSpeed's global gradient norm; ``skipped``: whether the
        engine skipped the update (fp16 overflow).
        """
        if self._pending is not None and self.engine.global_steps != self._global_steps_at_forward + 1:
            raise RuntimeError("call engine.step() exactly once after forward_backward() and before end_step()")
        if lr is None:
            if self._lr is None:
                raise ValueError("the optimizer's parameter groups have different learning rates: pass lr= explicitly")
            lr = self._lr
        if skipped is None:
            skipped = not self.engine.was_step_applied()
        if clip_coef is None:
            clip_coef = self.clip_coefficient()
        return super().end_step(lr=lr, clip_coef=clip_coef, skipped=skipped)

    def clip_coefficient(self) -> float:
        """The factor DeepSpeed's gradient clipping multiplied the last step's gradient by."""
        max_norm = self.engine.gradient_clipping()
        if not max_norm:
            return 1.0
        norm = self._fp32_clip_norm
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError(
                "DeepSpeed reported no global gradient norm for this step, so the clipping coefficient is"
                " unknown; pass clip_coef= to end_step()"
            )
        return clip_coefficient(float(norm), max_norm)

    def _record_fp32_clip_norm(self) -> None:
        """Plain fp32 engines without ZeRO clip in ``engine.clip_fp32_gradients``, which discards
        the norm it clipped with; this instance's method keeps it."""
        engine = self.engine

        def clip_and_record() -> None:
            norm = clip_grad_norm_(
                parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
            )
            self._fp32_clip_norm = float(norm)

        engine.clip_fp32_gradients = clip_and_record
        self.on_detach(lambda: engine.__dict__.pop("clip_fp32_gradients", None))


def check_second_order_supported(engine) -> None:
    """Refuse, at attach, the engines the curvature pass cannot serve (``docs/DESIGN.md`` §2.10), naming them."""
    refused = {
        "fp16/bf16 (a perturbation of √eps_fp32·‖w‖ along g is below half precision's resolution)": (
            engine.fp16_enabled() or engine.bfloat16_enabled()
        ),
    }
    for what, present in refused.items():
        if present:
            raise NotImplementedError(
                f"second-order values (ScoringConfig(second_order=True), docs/DESIGN.md §1.7) in the DeepSpeed adapter"
                f" do not support {what} yet; switch second_order off, or train with fp32 weights"
            )


def _record_factor(applied: torch.Tensor, microbatch: int, grad: torch.Tensor) -> None:
    applied[microbatch] = float(grad)


def _batch_format_error(micro_batches: list[Batch], micro_batch_size: int, path: str) -> str | None:
    for m, batch in enumerate(micro_batches):
        if not isinstance(batch, Mapping) or "tokens" not in batch or "labels" not in batch:
            return f"micro-batch {m} is not a dict with 'tokens' and 'labels' (and 'sample_ids', 'loss_mask')"
        size = int(batch["tokens"].shape[0])
        if size != micro_batch_size:
            return (
                f"micro-batch {m} has batch size {size}, but the engine's train_micro_batch_size_per_gpu is"
                f" {micro_batch_size} (the scoring path, {path!r}, was chosen from it at attach)"
            )
        ids = batch.get("sample_ids")
        if ids is None:
            return (
                f"micro-batch {m} has no 'sample_ids': every training batch needs a tensor [micro_batch_size] of"
                " global sample ids (the dataset index of each sequence)"
            )
        if torch.as_tensor(ids).numel() != size:
            return f"micro-batch {m}: 'sample_ids' has {torch.as_tensor(ids).numel()} entries for {size} sequences"
    return None
