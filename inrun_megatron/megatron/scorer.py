"""In-Run Data Shapley for Megatron-Core models: attach, score each step, read records, detach.

Usage (a complete loop is in the README)::

    scorer = MegatronScorer(model_chunks, validation=val_batches)
    for step in range(n_steps):
        losses = scorer.forward_backward(get_forward_backward_func(), forward_step_func=...,
                                         data_iterator=..., model=model_chunks, ...)
        result = scorer.end_optimizer_step(optimizer, optimizer.step())  # lr, clip coefficient, skipped
        # result.records: this step's rows, also written to the scorer's sink (e.g. a ScoreWriter)
    scorer.detach()

Training batches must carry a ``sample_ids`` tensor ``[micro_batch_size]`` of global sample ids
(the dataset index of each sequence) next to ``tokens``/``labels``/``loss_mask``; it is read
wherever the forward step pulls a batch from its data iterator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config

from inrun_megatron.config import ScoringConfig
from inrun_megatron.megatron.curvature_pass import (
    MegatronRngState,
    check_second_order_supported,
    gradients_kept,
    parameter_gathers_kept,
    replay_iterators,
    replaying,
    training_gradients,
)
from inrun_megatron.megatron.gradient_dot import model_dot, optimizer_gradient_dot
from inrun_megatron.megatron.optimizer_state import adam_preconditioners, is_adam_optimizer
from inrun_megatron.megatron.process_groups import SCORER_GROUPS, process_groups
from inrun_megatron.megatron.validation_pass import SET_BY_VALIDATION_PASS, MegatronTargetBackward
from inrun_megatron.megatron_core_layers import MegatronCoreLayers
from inrun_megatron.microbatch_gradients import gradient_scores
from inrun_megatron.optimizer_values import ADAM, CURVATURE
from inrun_megatron.scorer import Scorer, Stopwatch, clip_coefficient
from inrun_megatron.scores import GLOBAL_BATCH_TOKENS, MICROBATCH_TOKENS, TokenLayout, document_spans
from inrun_megatron.second_order import central_difference_hvp, finite_difference_step
from inrun_megatron.step_result import ResultSink, StepResult
from inrun_megatron.validation import Batch, GradientStore, check_targets, loss_mask_of
from inrun_megatron.validation_pass import run_validation_pass


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not isinstance(chunk, LanguageModule):
        chunk = chunk.module
    return chunk


class _CapturingIterator(Iterator):
    """Records ``sample_ids``, loss-token counts and input tokens of the batches a forward step
    pulls, and the batches themselves where ``kept`` is given (the curvature pass replays them)."""

    def __init__(self, inner: Iterator, captured: list, kept: list | None):
        self.inner = inner
        self.captured = captured
        self.kept = kept

    def __next__(self) -> Batch:
        batch = next(self.inner)
        if self.kept is not None:
            self.kept.append(batch)
        if isinstance(batch, Mapping):
            n_tokens = loss_mask_of(batch).sum(-1) if "labels" in batch else None
            self.captured.append((batch.get("sample_ids"), n_tokens, batch.get("tokens")))
        else:
            self.captured.append((None, None, None))
        return batch


class MegatronScorer(Scorer):
    """Exact per-sample In-Run Data Shapley scores for megatron-core model chunks (and, with
    ``ScoringConfig.document_eod``, per document span: the batches' ``tokens`` then name the spans).

    Args:
        model: the model chunks as passed to megatron's ``forward_backward_func`` (a module, or a
            list of modules for virtual pipeline stages), optionally wrapped in megatron's
            ``DistributedDataParallel`` / ``Float16Module``.
        validation: the validation set (a list of batches in the training batch format), or a
            dict ``{target name: batches}`` of several sets, each scored separately. Every rank
            passes the same batches.
        config: scoring options; ``config.path`` chooses how per-sample gradients are scored
            (micro-batch size 1: each microbatch's own gradient, any module; larger: per-layer
            rules).
        micro_batch_size: the training micro-batch size, if known: the scoring path is then
            resolved when attaching, so a model that path cannot score is refused here, naming
            the module, instead of at the first step.
        optimizer: the optimizer that steps the model (megatron's, or a torch optimizer). When it
            is Adam/AdamW, every step also records the Adam-aware value (``docs/DESIGN.md`` §1.5)
            from its state before the step (``config.optimizer_values``); without it, or with
            another optimizer, the SGD value only.
        sink: where :meth:`end_step` writes each step's result (see :class:`~inrun_megatron.scorer.Scorer`).
        pg_collection: megatron-core's ``ProcessGroupCollection`` of the groups the model runs
            with (``inrun_megatron.megatron.process_groups.SCORER_GROUPS`` are read); megatron's
            global groups (``parallel_state``) if None. Pass the same collection to
            :meth:`forward_backward` (it goes on to ``forward_backward_func`` for the validation
            and the training pass alike).
    """

    supports_document_values = True

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module],
        validation: Sequence[Batch] | Mapping[str, Sequence[Batch]],
        config: ScoringConfig | None = None,
        micro_batch_size: int | None = None,
        optimizer=None,
        sink: ResultSink | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(validation, config, sink)
        self.process_groups = process_groups(pg_collection)
        self.optimizer = optimizer
        if optimizer is not None and self.config.optimizer_values and is_adam_optimizer(optimizer):
            self.score_adam_values()
        # <main_grad, G> per target as last read, of weights whose gradient megatron's fused
        # accumulation writes into main_grad (see _local_scores); main_grad is zero when a step starts.
        self._main_grad_scores: dict[torch.nn.Parameter, torch.Tensor] = {}
        # ε of the last curvature pass's central difference (docs/DESIGN.md §1.7), None before one ran
        self.finite_difference_step: float | None = None
        self.chunks = list(model) if isinstance(model, Sequence) else [model]
        self.models = [_unwrap(c) for c in self.chunks]
        if self.config.second_order:
            check_second_order_supported(self.chunks)
            self.score_second_order()
        self.megatron_layers = MegatronCoreLayers(
            self.models, tp_group=self.process_groups.tp, allow_untested_megatron=self.config.allow_untested_megatron
        )
        self._refuse_unsupported()
        # megatron's per-token loss (docs/DESIGN.md §1.1): the divisor of every sample's loss term is
        # the global batch's token count, known only when finalize_model_grads has reduced it
        self.per_token_loss = bool(get_model_config(self.chunks[0]).calculate_per_token_loss)
        self._token_scaling: float | None = None  # the factor finalize_model_grads multiplied this step's gradients by
        check_targets(self.targets, vocab_size=self.models[0].vocab_size)
        self._check_validation_batches()
        builders = self.megatron_layers.attach(self)
        roots = [(f"chunk{i}" if len(self.models) > 1 else "", m) for i, m in enumerate(self.models)]
        try:
            self.build_sites(roots, builders, local_scores=self._local_scores)
            if micro_batch_size is not None:
                self.path_for(micro_batch_size)
        except Exception:
            self.detach()
            raise

    # ----------------------------------------------------------------------------------
    # attach-time checks and site construction

    def _refuse_unsupported(self) -> None:
        """Refuse, before any work, the setups whose scores would be wrong, naming the setup."""
        config = get_model_config(self.chunks[0])
        refused = {
            "context parallelism": dist.get_world_size(self.process_groups.cp) > 1,
            "mixture-of-experts models (num_moe_experts)": bool(getattr(config, "num_moe_experts", None)),
            "multi-token prediction (mtp_num_layers)": bool(getattr(config, "mtp_num_layers", None)),
            "fp8/fp4 training": bool(getattr(config, "fp8", None) or getattr(config, "fp4", None)),
            "Megatron-FSDP (use_megatron_fsdp)": any(
                getattr(getattr(c, "ddp_config", None), "use_megatron_fsdp", False) for c in self.chunks
            ),
        }
        for what, present in refused.items():
            if present:
                raise NotImplementedError(
                    f"inrun_megatron does not support {what} yet; the supported layouts are listed in the README"
                )
        has_ddp = any(isinstance(c, DistributedDataParallel) for c in self.chunks)
        if dist.get_world_size(self.process_groups.dp) > 1 and not has_ddp:
            raise NotImplementedError(
                "data parallelism needs the model chunks wrapped in megatron.core.distributed.DistributedDataParallel"
            )
        for m in self.models:
            if not isinstance(m, LanguageModule):
                raise TypeError(f"expected megatron GPT-style model chunks, got {type(m).__name__}")

    def _check_validation_batches(self) -> None:
        """Each rank's share of every target must be a microbatch count the schedule accepts."""
        split = self.config.validation_split == "split"
        dp = dist.get_world_size(self.process_groups.dp) if split else 1
        config = get_model_config(self.chunks[0])
        group = config.microbatch_group_size_per_vp_stage if len(self.chunks) > 1 else None
        pp = dist.get_world_size(self.process_groups.pp)
        for t in self.targets:
            counts = {len(t.batches[r::dp]) for r in range(dp)}
            if min(counts) == 0:
                raise ValueError(
                    f"validation target {t.name!r} has {len(t.batches)} batches, fewer than the {dp} data-parallel"
                    " ranks it is split over; use validation_split='replicate' or more batches"
                )
            if group is not None and any(n < group or 0 < n % group < pp for n in counts):
                raise ValueError(
                    f"validation target {t.name!r}: the interleaved pipeline schedule runs microbatches in groups"
                    f" of {group} (microbatch_group_size_per_vp_stage) on {pp} pipeline stages, so each rank needs"
                    f" at least {group} validation batches, and a remainder of 0 or at least {pp} when the count"
                    f" is not a multiple of {group}; the ranks get {sorted(counts)}. Give the target more"
                    " (or fewer) batches, or use validation_split='replicate'"
                )

    def counts(self, param: torch.nn.Parameter) -> bool:
        return self.megatron_layers.counts(param)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.process_groups.dp)

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.process_groups.dp

    def tied_output_weight(self, name: str, module: torch.nn.Module) -> torch.nn.Parameter:
        return self.megatron_layers.tied_output_weight(name, module)

    def _local_scores(self, param: torch.nn.Parameter, grad: torch.Tensor, g_val: torch.Tensor) -> torch.Tensor:
        """``<this microbatch's local gradient of param, G>`` per target, from its tensor hook.

        The hook runs before megatron DDP's hook on the parameter's gradient accumulator (which
        adds ``grad`` to ``main_grad`` and, with overlapped reduction, marks the bucket ready),
        so ``main_grad`` holds no data-parallel reduction yet. With gradient accumulation fusion
        megatron's linear backward has already added the weight gradient to ``main_grad`` itself
        (``grad_added_to_main_grad``) and handed autograd a placeholder: the microbatch's part is
        then the change of ``<main_grad, G>`` since it was last read, plus ``grad`` where DDP will
        still add it (``zero_out_wgrad``: a tied weight's other use, e.g. the embedding lookup),
        exactly the condition under which megatron's DDP hook adds it.
        """
        if not getattr(param, "grad_added_to_main_grad", False):
            return gradient_scores(param, grad, g_val)
        now = gradient_scores(param, param.main_grad, g_val)
        if getattr(param, "zero_out_wgrad", False):
            now = now + gradient_scores(param, grad, g_val)
        before = self._main_grad_scores.get(param)
        self._main_grad_scores[param] = now
        return now if before is None else now - before

    # ----------------------------------------------------------------------------------
    # per-step work

    def path_for(self, micro_batch_size: int) -> str:
        path = super().path_for(micro_batch_size)
        config = get_model_config(self.chunks[0])
        deferred = [name for name in ("defer_embedding_wgrad_compute", "delay_wgrad_compute") if getattr(config, name)]
        if path == "microbatch" and deferred:
            raise NotImplementedError(
                f"the microbatch-gradient path reads each microbatch's weight gradients in its backward, which"
                f" {deferred[0]}=True moves after later microbatches' backward; switch it off or score with"
                " ScoringConfig(path='rules')"
            )
        return path

    def begin_scoring(
        self, n_microbatches: int, micro_batch_size: int, token_layout: TokenLayout | None = None
    ) -> None:
        self._main_grad_scores.clear()
        super().begin_scoring(n_microbatches, micro_batch_size, token_layout)

    def loss_scale(self) -> float:
        """The factor the schedule multiplied losses by (fp16 loss scaling), 1.0 if none."""
        config = get_model_config(self.chunks[0])
        if config.grad_scale_func is None:
            return 1.0
        # A 0-dim tensor mixes with the optimizer's scale tensor on any device.
        return float(config.grad_scale_func(torch.ones((), device=self.grads.params()[0].device)))

    @property
    def loss_normalisation(self) -> str:
        """How the training loss divides each sequence's masked token-loss sum (the manifest's
        ``loss_normalisation``, ``docs/DESIGN.md`` §1.1)."""
        return GLOBAL_BATCH_TOKENS if self.per_token_loss else MICROBATCH_TOKENS

    def _gradient_scale(self) -> float:
        """Factor between the summed per-microbatch output gradients and the optimizer's gradient.

        Loss scaling multiplies them. With megatron's default loss megatron DDP averages them over
        the data-parallel ranks; with ``calculate_per_token_loss`` it sums them and
        ``finalize_model_grads`` divides them by the global batch's token count
        (``docs/DESIGN.md`` §2.4), which the training pass captured.
        """
        scale = 1.0 / self.loss_scale()
        if self.per_token_loss:
            return scale * self._token_scaling
        if any(isinstance(c, DistributedDataParallel) for c in self.chunks):
            scale /= dist.get_world_size(self.process_groups.dp_cp)
        return scale

    @contextlib.contextmanager
    def _capturing_global_tokens(self):
        """Read the token count megatron's ``finalize_model_grads`` divides the gradients by.

        Under ``calculate_per_token_loss`` the schedule hands ``finalize_model_grads_func`` the
        tokens its loss functions counted on this rank; megatron's ``finalize_model_grads``
        broadcasts that tensor from the last pipeline stage and all-reduces it over the
        data-parallel group in place, then multiplies every gradient by ``1 / count`` (a zero count
        clamped to 1 in megatron-core 0.19, left unscaled in 0.16: the same factor), computed as a
        tensor op on the integer count, i.e. rounded to float32. Read after the call, the count is
        the step's on every rank, and the same op gives exactly megatron's factor.
        """
        config = get_model_config(self.chunks[0])
        finalize = config.finalize_model_grads_func
        captured: list[torch.Tensor | None] = []

        def capturing(model, num_tokens=None, *args, **kwargs):
            result = finalize(model, num_tokens, *args, **kwargs)
            captured.append(num_tokens)
            return result

        self._token_scaling = None
        config.finalize_model_grads_func = capturing
        try:
            yield
        finally:
            config.finalize_model_grads_func = finalize
        if len(captured) != 1 or captured[0] is None:
            without = " without a token count" if captured and captured[0] is None else ""
            raise RuntimeError(
                f"calculate_per_token_loss=True: the training pass called finalize_model_grads_func"
                f" {len(captured)} time(s){without}; the scores need the one token count of the step that it"
                " divides the gradients by"
            )
        self._token_scaling = float(1.0 / torch.clamp(captured[0], min=1))

    def _refuse_unnormalised_per_token_loss(self) -> None:
        """Under per-token loss only ``finalize_model_grads`` divides the gradients by the token count."""
        if self.per_token_loss and get_model_config(self.chunks[0]).finalize_model_grads_func is None:
            raise ValueError(
                "calculate_per_token_loss=True: the model config has no finalize_model_grads_func, so nothing divides"
                " the gradients by the global batch's token count; set it to"
                " megatron.core.distributed.finalize_model_grads (with the chunks wrapped in megatron DDP), as"
                " megatron's training loop does"
            )

    def gradient_dots(self) -> torch.Tensor:
        """``<g, G>`` per target, ``g`` as megatron's optimizer will step with it (reduced over data
        parallelism by ``finalize_model_grads``, before clipping), the fp16 loss scale removed."""
        return optimizer_gradient_dot(self.chunks, self.grads, groups=self.process_groups).dot / self.loss_scale()

    def end_optimizer_step(self, optimizer, step_result: tuple) -> StepResult:
        """Close the step from megatron's optimizer and what its ``step()`` returned.

        Reads the learning rate the update used (call this before the LR scheduler steps), the
        clipping coefficient from the returned gradient norm and ``clip_grad``, and records a
        skipped update (fp16 overflow) as skipped.
        """
        update_successful, grad_norm, _ = step_result
        lrs = {float(group["lr"]) for group in optimizer.param_groups}
        if len(lrs) != 1:
            raise ValueError(
                f"the optimizer's parameter groups use different learning rates {sorted(lrs)}; a value"
                " lr * clip_coef * raw needs one learning rate per step. Pass the one you want to end_step(lr=...)"
            )
        clip_coef = clip_coefficient(grad_norm, optimizer.config.clip_grad)
        return self.end_step(lr=lrs.pop(), clip_coef=clip_coef, skipped=not update_successful)

    def local_validation_batches(self, target) -> list[Batch]:
        if self.config.validation_split == "replicate":
            return target.batches
        return target.batches[self.dp_rank :: dist.get_world_size(self.process_groups.dp)]

    def forward_backward(self, forward_backward_func: Callable, **kwargs) -> list:
        """Run one optimizer step's forward and backward passes with scoring.

        Takes exactly the keyword arguments of megatron's ``forward_backward_func`` and returns
        its result. First computes the validation gradient at the current weights (through the
        same function), then runs the training microbatches with every layer adding its
        per-sample partial scores. Expects the gradient buffers zeroed, as megatron's
        ``train_step`` leaves them; leaves them exactly as the unscored call would.
        """
        if kwargs.get("forward_only", False):
            raise ValueError("forward_only=True has no gradients to score; call forward_backward_func directly")
        for key in ("forward_step_func", "data_iterator", "model", "num_microbatches", "micro_batch_size"):
            if key not in kwargs:
                raise TypeError(f"forward_backward() needs the keyword argument {key!r}")
        self._check_schedule_groups(kwargs.get("pg_collection"))
        if self._pending is not None:
            raise RuntimeError("call end_step() after each forward_backward() before starting the next step")
        self.path_for(kwargs["micro_batch_size"])  # a step no path can score is refused before any work
        self._refuse_unnormalised_per_token_loss()
        stopwatch = Stopwatch(self.pass_clock)
        second_order = CURVATURE in self.value_kinds
        validation_losses = self.validation_pass(forward_backward_func, **kwargs)
        if self.optimizer is not None and ADAM in self.value_kinds:
            self.precondition(adam_preconditioners(self.optimizer, self.grads.params()))
        stopwatch.lap()
        n_micro, mbs = kwargs["num_microbatches"], kwargs["micro_batch_size"]
        captured: list[list] = []
        pulled: list[list[Batch]] | None = [] if second_order else None
        training_kwargs = dict(kwargs, data_iterator=self._capture(kwargs["data_iterator"], captured, pulled))
        rng_at_start = MegatronRngState.capture() if second_order else None  # the curvature pass replays from here
        token_layout = None if self.config.document_eod is None else self._token_layout(kwargs["seq_length"])
        self.begin_scoring(n_micro, mbs, token_layout)
        completed = False
        try:
            with self._capturing_global_tokens() if self.per_token_loss else contextlib.nullcontext():
                result = forward_backward_func(**training_kwargs)
            completed = True
        finally:
            raw = self.end_scoring(completed)
        stopwatch.lap()
        sample_ids, n_tokens, spans = self._reduce(raw, captured, n_micro, mbs, token_layout)
        raw *= self._gradient_scale()
        batch_dots = self.gradient_dots()
        if second_order:
            with stopwatch.curvature_pass():
                curvature, curvature_dots = self.curvature_pass(forward_backward_func, kwargs, pulled, rng_at_start)
            raw, batch_dots = torch.cat([raw, curvature]), torch.cat([batch_dots, curvature_dots])
        self.finish_pass(raw, sample_ids, n_tokens, validation_losses, batch_dots, stopwatch, spans)
        return result

    def curvature_pass(
        self, forward_backward_func: Callable, kwargs: dict, pulled: list[list[Batch]], rng_at_start: MegatronRngState
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's ``<grad l_z, H_val g_t>`` per target ``[K, M, B]`` and ``<g_t, H_val g_t>``
        per target ``[K]`` (``docs/DESIGN.md`` §1.7; :mod:`inrun_megatron.megatron.curvature_pass`).

        Runs after the training pass (``g_t`` reduced) and before the optimizer step, leaving the
        gradients, weights and RNG streams bitwise as the training pass left them. A step whose
        ``g_t`` is not finite (an fp16 overflow: the optimizer skips it) gets NaN curvature without
        any pass."""
        n_targets, n_micro, mbs = len(self.targets), kwargs["num_microbatches"], kwargs["micro_batch_size"]
        params = self.grads.params()
        loss_scale = self.loss_scale()
        device = params[0].device
        rng_after_training = MegatronRngState.capture()
        g = {  # a copy: the passes below start from zeroed gradient buffers
            p: (torch.zeros_like(p) if t is None else t.detach() / loss_scale)
            for p, t in training_gradients(self.chunks, params).items()
        }
        with gradients_kept(self.chunks, params), parameter_gathers_kept(self.chunks), rng_after_training.restored():
            weights = {p: p.detach() for p in params}
            norms = model_dot(self.chunks, weights, weights, groups=self.process_groups).dot
            g_norm = model_dot(self.chunks, g, g, groups=self.process_groups).dot
            if not bool(torch.isfinite(g_norm).all()):
                nan = torch.full((n_targets, n_micro, mbs), float("nan"), dtype=torch.float64, device=device)
                return nan, torch.full((n_targets,), float("nan"), dtype=torch.float64, device=device)
            hvp = GradientStore(params, n_targets)
            step = finite_difference_step(float(norms[0]) ** 0.5, float(g_norm[0]) ** 0.5, hvp.values()[0].dtype)
            self.finite_difference_step = step
            shifted = GradientStore(params, n_targets)  # G at w ± εg; the store keeps the step's own G

            def validation_gradients() -> list[torch.Tensor]:
                self.validation_pass(forward_backward_func, into=shifted, **kwargs)
                return shifted.values()

            central_difference_hvp(params, [g[p] for p in params], step, validation_gradients, hvp.values())
            store, self.grads = self.grads, hvp
            try:
                with replaying(self.chunks, params):
                    rng_at_start.restore()
                    self.begin_scoring(n_micro, mbs)
                    completed = False
                    try:
                        forward_backward_func(
                            **dict(kwargs, data_iterator=replay_iterators(kwargs["data_iterator"], pulled))
                        )
                        completed = True
                    finally:
                        curvature = self.end_scoring(completed)
            finally:
                self.grads = store
        mp = self.process_groups.mp
        if dist.get_world_size(mp) > 1:
            dist.all_reduce(curvature, group=mp)
        curvature *= self._gradient_scale()
        dots = optimizer_gradient_dot(self.chunks, hvp, groups=self.process_groups).dot / loss_scale
        return curvature, dots

    def _token_layout(self, seq_length: int) -> TokenLayout:
        """The positions each site's per-token partials cover: under sequence parallelism a norm sees
        its tensor-parallel rank's shard of the sequence (docs/DESIGN.md §2.9)."""
        if get_model_config(self.chunks[0]).sequence_parallel:
            tp = self.process_groups.tp
            return TokenLayout(seq_length, dist.get_rank(tp), dist.get_world_size(tp))
        return TokenLayout(seq_length)

    def _check_schedule_groups(self, pg_collection: ProcessGroupCollection | None) -> None:
        """The schedule must run with the groups the scores are reduced over."""
        if pg_collection is None:
            return
        differ = [
            name
            for name in SCORER_GROUPS
            if getattr(pg_collection, name, None) is not getattr(self.process_groups, name, None)
        ]
        if differ:
            raise ValueError(
                f"forward_backward() got a pg_collection whose {', '.join(differ)} group(s) differ from the"
                " scorer's; pass the same pg_collection to MegatronScorer(..., pg_collection=...)"
            )

    def validation_pass(
        self, forward_backward_func: Callable, *, into: GradientStore | None = None, **kwargs
    ) -> dict[str, float]:
        """``G`` of every target at the current weights (``docs/DESIGN.md`` §2.1) into ``into``
        (default the scorer's store of ``G``); the losses.

        Takes :meth:`forward_backward`'s arguments (at least ``forward_step_func`` and ``model``) and
        passes every one that does not describe the training data on to ``forward_backward_func``
        (``pg_collection``, ``p2p_communicator``, ...), so the validation pass runs through the
        caller's schedule with the caller's process groups."""
        store = self.grads if into is None else into
        split = self.config.validation_split == "split"
        groups = self.process_groups
        split_group = groups.dp_cp if split else None
        shared = any(getattr(p, "shared_embedding", False) for p in store.params())
        backward = MegatronTargetBackward(
            chunks=self.chunks,
            store=store,
            forward_backward_func=forward_backward_func,
            forward_step_func=kwargs["forward_step_func"],
            schedule_kwargs={k: v for k, v in kwargs.items() if k not in SET_BY_VALIDATION_PASS},
            batches=[self.local_validation_batches(t) for t in self.targets],
            tp_group=groups.tp,
            embedding_group=groups.embedding if shared else None,
            split_group=split_group,
        )
        return run_validation_pass(
            self.targets,
            store,
            backward,
            loss_scale=self.loss_scale(),
            loss_groups=[groups.pp] if split_group is None else [groups.pp, split_group],
            step=self.step,
        )

    @staticmethod
    def _capture(data_iterator, captured: list[list], pulled: list[list[Batch]] | None):
        def wrap(it):
            if it is None:
                return None
            captured.append([])
            if pulled is not None:
                pulled.append([])
            return _CapturingIterator(it, captured[-1], None if pulled is None else pulled[-1])

        if isinstance(data_iterator, list):
            return [wrap(it) for it in data_iterator]
        return wrap(data_iterator)

    def _reduce(
        self, raw: torch.Tensor, captured: list[list], n_micro: int, mbs: int, token_layout: TokenLayout | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sum partial scores over the model-parallel group and agree on sample ids (and, with
        document values on, each position's document span ``[M, B, S]``) there: only the ranks that
        read the batch know them.

        Never reduced over data parallelism: each DP replica owns different samples.
        """
        ids = torch.full((2, n_micro, mbs), -1, dtype=torch.int64, device=raw.device)
        spans = None
        if token_layout is not None:
            spans = torch.full((n_micro, mbs, token_layout.seq_length), -1, dtype=torch.int64, device=raw.device)
        for pulls in captured:
            for mb, (sample_ids, n_tokens, tokens) in enumerate(pulls[:n_micro]):
                if sample_ids is not None:
                    ids[0, mb, : len(sample_ids)] = torch.as_tensor(sample_ids).reshape(-1).to(ids)
                if n_tokens is not None:
                    ids[1, mb, : len(n_tokens)] = n_tokens.reshape(-1).to(ids)
                if spans is not None and tokens is not None:
                    spans[mb, : len(tokens)] = document_spans(tokens, self.config.document_eod).to(spans)
        group = self.process_groups.mp
        if dist.get_world_size(group) > 1:
            dist.all_reduce(raw, group=group)
            dist.all_reduce(ids, op=dist.ReduceOp.MAX, group=group)
            if spans is not None:
                dist.all_reduce(spans, op=dist.ReduceOp.MAX, group=group)
        if spans is not None and (spans < 0).any():
            mb, pos = (spans < 0).nonzero()[0, :2].tolist()
            raise ValueError(
                f"step {self.step}: no input tokens for microbatch {mb}, position {pos}; document values"
                " (ScoringConfig.document_eod) split each batch's 'tokens' [micro_batch_size, seq_length] into"
                " documents. No score of this step was recorded."
            )
        return ids[0], ids[1], spans
