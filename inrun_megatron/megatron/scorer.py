"""In-Run Data Shapley for Megatron-Core models: attach, score each step, read records, detach.

Usage (a complete loop is in the README)::

    scorer = MegatronScorer(model_chunks, validation=val_batches)
    for step in range(n_steps):
        losses = scorer.forward_backward(get_forward_backward_func(), forward_step_func=...,
                                         data_iterator=..., model=model_chunks, ...)
        records = scorer.end_optimizer_step(optimizer, optimizer.step())  # lr, clip coefficient, skipped
        writer.append(records, ...)   # a ScoreWriter makes the rows durable; inrun-scores merge sums them
    scorer.detach()

Training batches must carry a ``sample_ids`` tensor ``[micro_batch_size]`` of global sample ids
(the dataset index of each sequence) next to ``tokens``/``labels``/``loss_mask``; it is read
wherever the forward step pulls a batch from its data iterator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.package_info import __version__ as MEGATRON_VERSION
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.core.utils import get_model_config

from inrun_megatron.config import ScoringConfig
from inrun_megatron.megatron import layers
from inrun_megatron.megatron.gradient_dot import optimizer_gradient_dot
from inrun_megatron.megatron.optimizer_state import adam_preconditioners, is_adam_optimizer
from inrun_megatron.megatron.validation_pass import run_validation_pass
from inrun_megatron.microbatch_gradients import gradient_scores
from inrun_megatron.optimizer_values import ADAM
from inrun_megatron.scorer import Scorer, clip_coefficient
from inrun_megatron.scores import StepRecords
from inrun_megatron.validation import Batch, check_targets, loss_mask_of

#: megatron-core release lines the Megatron adapter is tested against.
TESTED_MEGATRON = ("0.16.", "0.19.")


def check_megatron_version(allow_untested: bool = False, version: str = MEGATRON_VERSION) -> None:
    if version.startswith(TESTED_MEGATRON) or allow_untested:
        return
    raise RuntimeError(
        f"inrun_megatron is tested with megatron-core {', '.join(v + 'x' for v in TESTED_MEGATRON)};"
        f" megatron-core {version} is installed. Install a tested version, or pass"
        " ScoringConfig(allow_untested_megatron=True) and check the scores against the brute-force"
        " tests first"
    )


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not isinstance(chunk, LanguageModule):
        chunk = chunk.module
    return chunk


class _CapturingIterator(Iterator):
    """Records ``sample_ids`` and loss-token counts of the batches a forward step pulls."""

    def __init__(self, inner: Iterator, captured: list):
        self.inner = inner
        self.captured = captured

    def __next__(self) -> Batch:
        batch = next(self.inner)
        if isinstance(batch, Mapping):
            self.captured.append((batch.get("sample_ids"), loss_mask_of(batch).sum(-1) if "labels" in batch else None))
        else:
            self.captured.append((None, None))
        return batch


@dataclass(frozen=True)
class PassTimings:
    """Seconds (on :attr:`MegatronScorer.pass_clock`) of the parts of one scored ``forward_backward``."""

    validation: float  # the validation pass: G of every target
    training: float  # megatron's forward_backward_func over the training microbatches, scoring included
    bookkeeping: float  # reducing the partial scores, checking the sample ids, <g, G> per target


class _Stopwatch:
    """Times between laps; reads ``clock`` (if any) after synchronising CUDA, so that unmeasured
    steps pay nothing and measured ones time finished work, not queued kernels."""

    def __init__(self, clock: Callable[[], float] | None):
        self.clock = clock
        self.laps: list[float] = []
        self.lap()

    def lap(self) -> None:
        if self.clock is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.laps.append(self.clock())

    def intervals(self) -> list[float]:
        return [end - start for start, end in zip(self.laps, self.laps[1:])]


class MegatronScorer(Scorer):
    """Exact per-sample In-Run Data Shapley scores for megatron-core model chunks.

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

    Set ``pass_clock`` to a clock (``time.perf_counter``, or ``time.process_time`` on a shared CPU) to
    have each :meth:`forward_backward` leave its :class:`PassTimings` in ``last_timings``
    (benchmarks; it synchronises CUDA between the passes, so it is off by default).
    """

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module],
        validation: Sequence[Batch] | Mapping[str, Sequence[Batch]],
        config: ScoringConfig | None = None,
        micro_batch_size: int | None = None,
        optimizer=None,
    ):
        super().__init__(validation, config)
        self.optimizer = optimizer
        if optimizer is not None and self.config.optimizer_values and is_adam_optimizer(optimizer):
            self.score_adam_values()
        # <main_grad, G> per target as last read, of weights whose gradient megatron's fused
        # accumulation writes into main_grad (see _local_scores); main_grad is zero when a step starts.
        self._main_grad_scores: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.pass_clock: Callable[[], float] | None = None
        self.last_timings: PassTimings | None = None
        check_megatron_version(self.config.allow_untested_megatron)
        self.chunks = list(model) if isinstance(model, Sequence) else [model]
        self.models = [_unwrap(c) for c in self.chunks]
        self._refuse_unsupported()
        check_targets(self.targets, vocab_size=self.models[0].vocab_size)
        self._check_validation_batches()
        layers.install_linear_patch()
        self.on_detach(layers.remove_linear_patch)
        roots = [(f"chunk{i}" if len(self.models) > 1 else "", m) for i, m in enumerate(self.models)]
        try:
            self.build_sites(roots, layers.SITE_BUILDERS, local_scores=self._local_scores)
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
            "context parallelism": parallel_state.get_context_parallel_world_size() > 1,
            "mixture-of-experts models (num_moe_experts)": bool(getattr(config, "num_moe_experts", None)),
            "multi-token prediction (mtp_num_layers)": bool(getattr(config, "mtp_num_layers", None)),
            "calculate_per_token_loss=True": bool(getattr(config, "calculate_per_token_loss", False)),
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
        if parallel_state.get_data_parallel_world_size() > 1 and not has_ddp:
            raise NotImplementedError(
                "data parallelism needs the model chunks wrapped in megatron.core.distributed.DistributedDataParallel"
            )
        for m in self.models:
            if not isinstance(m, LanguageModule):
                raise TypeError(f"expected megatron GPT-style model chunks, got {type(m).__name__}")

    def _check_validation_batches(self) -> None:
        """Each rank's share of every target must be a microbatch count the schedule accepts."""
        split = self.config.validation_split == "split"
        dp = parallel_state.get_data_parallel_world_size() if split else 1
        config = get_model_config(self.chunks[0])
        group = config.microbatch_group_size_per_vp_stage if len(self.chunks) > 1 else None
        pp = parallel_state.get_pipeline_model_parallel_world_size()
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
        return param_is_not_tensor_parallel_duplicate(param)

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()

    def tied_output_weight(self, name: str, module: torch.nn.Module) -> torch.nn.Parameter:
        """The embedding weight a weightless output layer multiplies by (tied embeddings)."""
        for model in self.models:
            if getattr(model, "output_layer", None) is module and model.share_embeddings_and_output_weights:
                return model.shared_embedding_or_output_weight()
        raise NotImplementedError(
            f"{name}: a linear layer without its own weight is only supported as GPT's tied output layer"
        )

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

    def begin_scoring(self, n_microbatches: int, micro_batch_size: int) -> None:
        self._main_grad_scores.clear()
        super().begin_scoring(n_microbatches, micro_batch_size)

    def loss_scale(self) -> float:
        """The factor the schedule multiplied losses by (fp16 loss scaling), 1.0 if none."""
        config = get_model_config(self.chunks[0])
        if config.grad_scale_func is None:
            return 1.0
        # A 0-dim tensor mixes with the optimizer's scale tensor on any device.
        return float(config.grad_scale_func(torch.ones((), device=self.grads.params()[0].device)))

    def _gradient_scale(self) -> float:
        """Factor between the summed per-microbatch output gradients and the optimizer's gradient.

        Megatron DDP averages gradients over the data-parallel ranks; loss scaling multiplies them.
        """
        scale = 1.0 / self.loss_scale()
        if any(isinstance(c, DistributedDataParallel) for c in self.chunks):
            scale /= parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        return scale

    def gradient_dots(self) -> torch.Tensor:
        """``<g, G>`` per target, ``g`` as megatron's optimizer will step with it (reduced over data
        parallelism by ``finalize_model_grads``, before clipping), the fp16 loss scale removed."""
        return optimizer_gradient_dot(self.chunks, self.grads).dot / self.loss_scale()

    def end_optimizer_step(self, optimizer, step_result: tuple) -> StepRecords:
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
        dp = parallel_state.get_data_parallel_world_size()
        return target.batches[parallel_state.get_data_parallel_rank() :: dp]

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
        if self._pending is not None:
            raise RuntimeError("call end_step() after each forward_backward() before starting the next step")
        self.path_for(kwargs["micro_batch_size"])  # a step no path can score is refused before any work
        stopwatch = _Stopwatch(self.pass_clock)
        validation_losses = run_validation_pass(
            self, forward_backward_func, kwargs["forward_step_func"], kwargs["model"]
        )
        if self.optimizer is not None and ADAM in self.value_kinds:
            self.precondition(adam_preconditioners(self.optimizer, self.grads.params()))
        stopwatch.lap()
        n_micro, mbs = kwargs["num_microbatches"], kwargs["micro_batch_size"]
        captured: list[list] = []
        kwargs = dict(kwargs, data_iterator=self._capture(kwargs["data_iterator"], captured))
        self.begin_scoring(n_micro, mbs)
        completed = False
        try:
            result = forward_backward_func(**kwargs)
            completed = True
        finally:
            raw = self.end_scoring(completed)
        stopwatch.lap()
        sample_ids, n_tokens = self._reduce(raw, captured, n_micro, mbs)
        raw *= self._gradient_scale()
        self.finish_pass(raw, sample_ids, n_tokens, validation_losses, self.gradient_dots())
        stopwatch.lap()
        if stopwatch.clock is not None:
            self.last_timings = PassTimings(*stopwatch.intervals())
        return result

    @staticmethod
    def _capture(data_iterator, captured: list[list]):
        def wrap(it):
            if it is None:
                return None
            captured.append([])
            return _CapturingIterator(it, captured[-1])

        if isinstance(data_iterator, list):
            return [wrap(it) for it in data_iterator]
        return wrap(data_iterator)

    def _reduce(self, raw: torch.Tensor, captured: list[list], n_micro: int, mbs: int):
        """Sum partial scores over the model-parallel group and agree on sample ids there.

        Never reduced over data parallelism: each DP replica owns different samples.
        """
        ids = torch.full((2, n_micro, mbs), -1, dtype=torch.int64, device=raw.device)
        for pulls in captured:
            for mb, (sample_ids, n_tokens) in enumerate(pulls[:n_micro]):
                if sample_ids is not None:
                    ids[0, mb, : len(sample_ids)] = torch.as_tensor(sample_ids).reshape(-1).to(ids)
                if n_tokens is not None:
                    ids[1, mb, : len(n_tokens)] = n_tokens.reshape(-1).to(ids)
        group = parallel_state.get_model_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(raw, group=group)
            dist.all_reduce(ids, op=dist.ReduceOp.MAX, group=group)
        return ids[0], ids[1]
