"""What every framework adapter's scorer shares: sites, the step cycle, records and values.

An adapter subclasses :class:`Scorer`, builds its sites with :meth:`Scorer.build_sites`,
computes ``G`` into :attr:`Scorer.grads`, runs the training pass between
:meth:`begin_scoring` / :meth:`end_scoring`, reduces the ``[K, M, B]`` partials over its
model-parallel groups and hands them to :meth:`finish_pass`, with ``<g, G>`` per target
(:meth:`gradient_dots`, the efficiency identity's right-hand side) and the :class:`Stopwatch` that
timed the passes. The user closes each step with :meth:`end_step`, which returns the step's
:class:`~inrun_megatron.step_result.StepResult` and writes it to the scorer's sink, if any.

Nothing a scorer keeps grows with the number of samples seen unless asked for (a
:class:`~inrun_megatron.step_result.MemorySink`, ``ScoringConfig.accumulate_values``): its state
is the step counter (``docs/DESIGN.md`` §2.7).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from inrun_megatron.config import ScoringConfig
from inrun_megatron.microbatch_gradients import LocalScores, ParameterSite, attach_parameter_sites, gradient_scores
from inrun_megatron.optimizer_values import (
    ADAM,
    ADAM_ROW_SUFFIX,
    CURVATURE,
    SECOND_ORDER,
    SGD,
    RunValues,
    precondition_rows,
    row_names,
    split_row_name,
    values_manifest,
)
from inrun_megatron.scores import DocumentPartials, StepScores, TokenLayout, ValueAccumulator, document_partials
from inrun_megatron.sites import Site, SiteBuilder
from inrun_megatron.step_result import PassTimings, ResultSink, StepResult, make_step_result
from inrun_megatron.validation import Batch, GradientStore, as_targets


def clip_coefficient(grad_norm: float | None, max_norm: float) -> float:
    """The factor gradient clipping multiplied the gradient by (1.0 when it did not clip).

    Megatron's optimizer and every DeepSpeed optimizer clip with the same rule,
    ``min(1, max_norm / (norm + 1e-6))`` on the global norm of the unclipped gradient.
    """
    if grad_norm is None or not max_norm:
        return 1.0
    coef = max_norm / (float(grad_norm) + 1.0e-6)
    return coef if coef < 1.0 else 1.0


class Stopwatch:
    """Times between laps; reads ``clock`` (if any) after synchronising CUDA, so that unmeasured
    steps pay nothing and measured ones time finished work, not queued kernels."""

    def __init__(self, clock: Callable[[], float] | None):
        self.clock = clock
        self.laps: list[float] = []
        self.curvature = 0.0  # seconds of the curvature pass, inside the bookkeeping interval
        self.lap()

    def lap(self) -> None:
        if self.clock is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.laps.append(self.clock())

    @contextlib.contextmanager
    def curvature_pass(self):
        """Time the curvature pass (run after the training lap) apart from the bookkeeping."""
        if self.clock is None:
            yield
            return
        self.lap()
        start = self.laps.pop()
        try:
            yield
        finally:
            self.lap()
            self.curvature += self.laps.pop() - start

    def timings(self) -> PassTimings | None:
        """The validation, training and bookkeeping intervals, after their three laps, and the
        curvature pass's time, taken out of the bookkeeping (None untimed)."""
        if self.clock is None:
            return None
        validation, training, bookkeeping = (end - start for start, end in zip(self.laps, self.laps[1:]))
        return PassTimings(validation, training, bookkeeping - self.curvature, self.curvature)


@dataclass
class PendingStep:
    raw: torch.Tensor  # [K, M, B] float64, fully reduced and scaled
    sample_ids: torch.Tensor  # [M, B]
    n_tokens: torch.Tensor  # [M, B]
    validation_losses: dict[str, float]
    batch_dots: torch.Tensor  # [K] <g_t, G_t> of the whole global batch, loss scale removed
    timings: PassTimings | None
    documents: DocumentPartials | None  # with document values on (docs/DESIGN.md §2.9)


class Scorer:
    """Base class of the framework adapters (see module docstring).

    ``sink`` receives every step's result from :meth:`end_step` (a
    :class:`~inrun_megatron.step_result.MemorySink`, a :class:`~inrun_megatron.records.ScoreWriter`,
    or None: the caller takes the returned result). It may also be set after attaching
    (``scorer.sink = writer``), e.g. once a resumed run knows where its dump continues. Set
    ``pass_clock`` to a clock (``time.perf_counter``, or ``time.process_time`` on a shared CPU) to
    have every result carry its :class:`~inrun_megatron.step_result.PassTimings` (it synchronises
    CUDA between the passes, so it is off by default).
    """

    #: Whether the adapter records document values (``ScoringConfig.document_eod``, docs/DESIGN.md §2.9):
    #: it must know every site's token positions and each microbatch's input tokens.
    supports_document_values = False

    def __init__(
        self,
        validation: Sequence[Batch] | Mapping[str, Sequence[Batch]],
        config: ScoringConfig | None,
        sink: ResultSink | None = None,
    ):
        self.config = config or ScoringConfig()
        if self.config.document_eod is not None and not self.supports_document_values:
            raise NotImplementedError(
                f"{type(self).__name__} does not record document values (ScoringConfig.document_eod) yet; the"
                " Megatron-Core adapter does (docs/DESIGN.md §2.9)"
            )
        self._sink: ResultSink | None = None
        self.sink = sink
        self.pass_clock: Callable[[], float] | None = None
        self.targets = as_targets(validation)
        self.scoring: str | None = None  # the path scoring the running training pass, if any
        self.rules_unavailable: str | None = None  # why the rules path cannot score this model
        self.parameter_sites: list[ParameterSite] = []
        self.step_scores: StepScores | None = None
        self.step = 0
        self.accumulator = ValueAccumulator() if self.config.accumulate_values else None
        # Value kinds scored (docs/DESIGN.md §1.5): the store of G holds one row per target and kind.
        self.value_kinds: list[str] = [SGD]
        self._adam_rows_filled = False  # whether this step's store holds P ⊙ G (not at the first Adam step)
        self.sites: list[Site] = []
        self.grads: GradientStore | None = None
        self._pending: PendingStep | None = None
        self._hooks: list = []
        self._on_detach: list[Callable[[], None]] = []

    @property
    def sink(self) -> ResultSink | None:
        """Where :meth:`end_step` writes each step's result (None: nowhere)."""
        return self._sink

    @sink.setter
    def sink(self, sink: ResultSink | None) -> None:
        if sink is not None and not isinstance(sink, ResultSink):
            raise TypeError(
                f"a scorer's sink needs write(result), flush() and close() (a MemorySink or a ScoreWriter), got"
                f" {type(sink).__name__}"
            )
        self._sink = sink

    # ----------------------------------------------------------------------------------
    # adapter interface

    def counts(self, param: torch.nn.Parameter) -> bool:
        """Whether this rank counts ``param`` (False for a tensor-parallel duplicate)."""
        return True

    def tied_output_weight(self, name: str, module: torch.nn.Module) -> torch.nn.Parameter:
        """The weight a linear layer ``module`` without a weight of its own multiplies by (a GPT
        output layer tied to the embedding); site builders ask for it when attaching."""
        raise NotImplementedError(f"{name}: a linear layer without its own weight is not supported by this adapter")

    def counts_gradient(self, param: torch.nn.Parameter) -> bool:
        """Whether this rank counts ``param``'s local gradient on the microbatch-gradient path.

        A tensor-parallel duplicate is counted on one rank, except a weight tagged
        ``sequence_parallel``: each rank's gradient of it covers only its own tokens.
        """
        return getattr(param, "sequence_parallel", False) or self.counts(param)

    def gradient_dots(self) -> torch.Tensor:
        """``<g_t, G_t>`` per target ``[K]`` (float64): the gradient the optimizer is about to step
        with (before clipping, loss scale removed) dotted with ``G``, over the whole global batch
        and every parameter once. By the efficiency identity it equals the sum of the step's raw
        scores over every data-parallel replica; the records store it so that ``inrun-scores
        verify`` checks every step. Adapters call it after the training pass, before the
        optimizer step."""
        raise NotImplementedError

    @property
    def dp_rank(self) -> int:
        return 0

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return None

    # ----------------------------------------------------------------------------------
    # attaching

    def build_sites(
        self,
        roots: Iterable[tuple[str, torch.nn.Module]],
        builders: Mapping[type, SiteBuilder],
        *,
        local_scores: LocalScores = gradient_scores,
        registry: bool = False,
    ) -> None:
        """Build what both scoring paths need for every root module, and the store of ``G``.

        Rules path: a module whose type has a builder becomes sites (its children are not
        visited); every trainable parameter must end up in some site. Where one does not, the
        rules path is unavailable: attaching fails naming the module when ``config.path`` is
        ``"rules"``, otherwise only steps with a micro-batch size above 1 are refused (before
        any work). Microbatch-gradient path: a hook on every trainable parameter this rank counts
        (:mod:`inrun_megatron.microbatch_gradients`), for any module type. ``registry``: ``builders``
        are those of :func:`inrun_megatron.register_rule`, so a refusal names it.
        """
        roots = list(roots)
        claimed: set[int] = set()

        def walk(module: torch.nn.Module, name: str) -> None:
            builder = builders.get(type(module))
            if builder is not None:
                new = builder(self, name, module)
                self.sites.extend(new)
                claimed.update(id(p) for site in new for p in site.params)
                claimed.update(id(p) for p in module.parameters())  # e.g. affine-free norms
                return
            for child_name, child in module.named_children():
                walk(child, f"{name}.{child_name}" if name else child_name)

        if self.config.path != "microbatch":
            for prefix, root in roots:
                walk(root, prefix)
                self.rules_unavailable = self.rules_unavailable or _uncovered(prefix, root, claimed, builders, registry)
            if self.rules_unavailable and self.config.path == "rules":
                raise NotImplementedError(self.rules_unavailable)
        named = [
            (".".join(x for x in (prefix, name) if x), p)
            for prefix, root in roots
            for name, p in root.named_parameters()
        ]
        params = {id(p): p for _, p in named if p.requires_grad}
        params.update({id(p): p for site in self.sites for p in site.params})
        self.grads = self.make_gradient_store(list(params.values()))
        if self.config.path != "rules":
            self.parameter_sites = attach_parameter_sites(
                self, named, counted=self.counts_gradient, local_scores=local_scores
            )

    def make_gradient_store(self, params: list[torch.nn.Parameter]) -> GradientStore:
        """The store of ``G`` for ``params`` (one row per score row of the training pass); adapters
        whose parameters are sharded override it."""
        return GradientStore(params, self.n_store_rows)

    # ----------------------------------------------------------------------------------
    # value kinds (docs/DESIGN.md §1.5)

    def score_adam_values(self) -> None:
        """Also score the Adam-aware value: adapters call it before :meth:`build_sites` when the
        optimizer is Adam and ``config.optimizer_values`` is on. The store of ``G`` then holds
        ``2K`` rows, ``G`` of every target followed by ``P_t ⊙ G`` of every target, so both scoring
        paths produce both raw scores in the same backward."""
        if self.grads is not None:
            raise RuntimeError("value kinds are fixed before the store of G is built")
        self._refuse_row_suffixes()
        self.value_kinds = [SGD, ADAM, *self.value_kinds[1:]]

    def score_second_order(self) -> None:
        """Also record each sample's curvature ``<grad l_z, H_val g_t>`` and second-order value
        (``docs/DESIGN.md`` §1.7): one more score row per target that the adapter's curvature pass
        fills after the training pass (the store of ``G`` does not grow), and one that
        :meth:`end_step` computes from the SGD and curvature rows once ``lr`` and the clipping
        coefficient are known. Adapters call it before :meth:`build_sites` when
        ``config.second_order`` is on."""
        if self.grads is not None:
            raise RuntimeError("value kinds are fixed before the store of G is built")
        self._refuse_row_suffixes()
        self.value_kinds = [*self.value_kinds, CURVATURE, SECOND_ORDER]

    def _refuse_row_suffixes(self) -> None:
        clashing = [t.name for t in self.targets if split_row_name(t.name)[1] != SGD]
        if clashing:
            raise ValueError(
                f"validation target names {clashing} end in a suffix that names another value kind's rows of a"
                f" target ({ADAM_ROW_SUFFIX!r}: docs/DESIGN.md §1.5, ':curvature' and ':second-order': §1.7);"
                " rename them"
            )

    @property
    def score_rows(self) -> list[str]:
        """Name of each row of the store and of the step's score tensor (the records' ``target``)."""
        return row_names([t.name for t in self.targets], self.value_kinds)

    @property
    def values_manifest(self) -> RunValues:
        """The manifest's ``values`` field: which score rows hold which value kind."""
        return values_manifest([t.name for t in self.targets], self.value_kinds)

    @property
    def n_score_rows(self) -> int:
        return len(self.score_rows)

    @property
    def n_store_rows(self) -> int:
        """Rows of the store of ``G`` and of the training pass's scores: every score row but the
        curvature rows, which the curvature pass scores against ``H_val g_t``, and the second-order
        rows, computed by :meth:`end_step` (``docs/DESIGN.md`` §1.7)."""
        scored = [k for k in self.value_kinds if k not in (CURVATURE, SECOND_ORDER)]
        return len(row_names([t.name for t in self.targets], scored))

    @property
    def measured_rows(self) -> list[str]:
        """The score rows a step's passes measure (:meth:`finish_pass`): all but the second-order rows."""
        return [row for row in self.score_rows if split_row_name(row)[1] != SECOND_ORDER]

    def precondition(self, preconditioners: Mapping[torch.nn.Parameter, torch.Tensor | None]) -> None:
        """Fill the Adam rows of the store with ``P_t ⊙ G`` after the step's validation pass.

        ``preconditioners`` maps every stored parameter to its ``P_t`` in the store's layout of
        that parameter (its local shard or ZeRO-3 partition), or to None for all of them when the
        optimizer has taken no step yet: that step has no Adam-aware value and records only the
        SGD rows.
        """
        missing = [p for p in self.grads.params() if p not in preconditioners]
        if missing:
            raise KeyError(
                f"{len(missing)} scored parameters (first of shape {tuple(missing[0].shape)}) have no"
                " optimizer state: is every trainable parameter in the optimizer?"
            )
        defined = {preconditioners[p] is not None for p in self.grads.params()}
        if len(defined) > 1:
            raise RuntimeError(
                "the optimizer has a second moment for some scored parameters but not for others; the Adam-aware"
                " value needs every parameter stepped by the same Adam optimizer"
            )
        self._adam_rows_filled = defined.pop()
        if self._adam_rows_filled:
            rows = [(self.grads.local_rows(p), preconditioners[p]) for p in self.grads.params()]
            precondition_rows(rows, len(self.targets))

    def add_hook(self, handle) -> None:
        self._hooks.append(handle)

    def on_detach(self, fn: Callable[[], None]) -> None:
        self._on_detach.append(fn)

    def detach(self) -> None:
        """Remove every hook and patch; the model is as it was before attaching."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        while self._on_detach:
            self._on_detach.pop()()

    # ----------------------------------------------------------------------------------
    # one step

    def path_for(self, micro_batch_size: int) -> str:
        """The scoring path of a step with this micro-batch size; raises if none can score it.

        Adapters call it when attaching (where the micro-batch size is known) and before a step's
        validation pass, so a refusal always comes before any work.
        """
        path = self.config.path
        if path == "auto":  # document values need the rules' per-token partials (docs/DESIGN.md §2.9)
            path = "microbatch" if micro_batch_size == 1 and self.config.document_eod is None else "rules"
        if path == "microbatch" and micro_batch_size != 1:
            raise ValueError(
                f"the microbatch-gradient path (ScoringConfig(path='microbatch')) scores the gradient of a whole"
                f" microbatch, which is one sequence's only with micro_batch_size 1, not {micro_batch_size};"
                " use path='auto' or 'rules' for larger microbatches"
            )
        if path == "rules" and self.rules_unavailable:
            raise NotImplementedError(
                f"{self.rules_unavailable} (a step with micro_batch_size {micro_batch_size} needs the per-layer rules)"
            )
        return path

    def begin_scoring(
        self, n_microbatches: int, micro_batch_size: int, token_layout: TokenLayout | None = None
    ) -> None:
        """Score the pass about to run against every row of :attr:`grads` (the store of ``G``, or
        the curvature pass's store of ``H_val g_t``); ``token_layout`` (document values on) keeps the
        partials per sequence position."""
        if self._pending is not None:
            raise RuntimeError("call end_step() after each scored step before starting the next one")
        path = self.path_for(micro_batch_size)
        device = self.grads.params()[0].device
        self.step_scores = StepScores(self.grads.n_targets, n_microbatches, micro_batch_size, device, token_layout)
        self.scoring = path

    def end_scoring(self, completed: bool) -> torch.Tensor:
        """Stop scoring; return the local ``[K, M, B]`` partials, ``[K, M, S, B]`` per position with a
        token layout (checked complete if ``completed``)."""
        self.scoring = None
        step, self.step_scores = self.step_scores, None
        try:
            if completed:
                step.check_complete()
        finally:
            step.reset_sites()
        return step.totals

    def finish_pass(
        self,
        raw: torch.Tensor,
        sample_ids: torch.Tensor,
        n_tokens: torch.Tensor,
        validation_losses: dict[str, float],
        batch_dots: torch.Tensor,
        stopwatch: Stopwatch,
        token_spans: torch.Tensor | None = None,
    ) -> None:
        """Accept a reduced step after checking its sample ids over the whole global batch; the
        stopwatch's last lap (validation and training passes done) closes the bookkeeping.

        ``raw`` and ``batch_dots`` have one row per measured row (:attr:`measured_rows`); a step whose
        Adam rows were not filled (:meth:`precondition`) drops them. With document values on, ``raw``
        is per position ``[K, M, S, B]`` and ``token_spans`` ``[M, B, S]`` names each position's
        document span (:func:`~inrun_megatron.scores.document_spans`): the sequences' raw scores are the
        sums of their spans' partials (docs/DESIGN.md §2.9).
        """
        self._check_sample_ids(sample_ids)
        documents = None
        if token_spans is not None:
            documents = document_partials(raw, token_spans)
            raw = documents.raw.sum(-1)
        if ADAM in self.value_kinds and not self._adam_rows_filled:
            keep = [i for i, row in enumerate(self.measured_rows) if split_row_name(row)[1] != ADAM]
            raw, batch_dots = raw[keep], batch_dots[keep]
            if documents is not None:
                documents.raw = documents.raw[keep]
        stopwatch.lap()
        self._pending = PendingStep(
            raw, sample_ids, n_tokens, validation_losses, batch_dots, stopwatch.timings(), documents
        )

    def _check_sample_ids(self, ids: torch.Tensor) -> None:
        group = self.dp_group
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        everyone = [torch.empty_like(ids) for _ in range(size)]
        if size > 1:
            dist.all_gather(everyone, ids, group=group)
        else:
            everyone = [ids]
        all_ids = torch.stack(everyone)
        if (all_ids < 0).any():
            rank, mb, pos = (all_ids < 0).nonzero()[0].tolist()
            raise ValueError(
                f"step {self.step}: no sample id for microbatch {mb}, position {pos} on data-parallel rank {rank};"
                " every training batch needs a 'sample_ids' tensor [micro_batch_size] of global sample ids"
                " (the dataset index of each sequence). No score of this step was recorded."
            )
        unique, counts = torch.unique(all_ids, return_counts=True)
        if (counts > 1).any():
            dupes = unique[counts > 1][:10].tolist()
            raise ValueError(
                f"step {self.step}: sample ids {dupes} occur more than once in the global batch; sample ids must"
                " identify sequences uniquely within a step. No score of this step was recorded."
            )

    def end_step(self, *, lr: float, clip_coef: float = 1.0, skipped: bool = False) -> StepResult:
        """Close the step with ``lr``, the clipping coefficient and whether the update was skipped;
        return its result, after writing it to the sink (if any)."""
        if self._pending is None:
            raise RuntimeError("end_step() needs a scored forward/backward in the same step")
        pending, self._pending = self._pending, None
        rows = self._step_rows(len(pending.batch_dots))
        raw, batch_dots = pending.raw, pending.batch_dots
        if SECOND_ORDER in self.value_kinds:
            raw, batch_dots, rows = self._with_second_order_rows(raw, batch_dots, rows, lr * clip_coef)
        result = make_step_result(
            step=self.step,
            raw=raw,
            sample_ids=pending.sample_ids,
            n_tokens=pending.n_tokens,
            lr=lr,
            clip_coef=clip_coef,
            skipped=skipped,
            dp_rank=self.dp_rank,
            validation_losses={t.name: pending.validation_losses[t.name] for t in self.targets},
            # one dot per score row of the step: without the Adam rows where they were not filled
            batch_dots=dict(zip(rows, batch_dots.tolist())),
            timings=pending.timings,
            documents=pending.documents,
        )
        if self.accumulator is not None:
            self.accumulator.add(result.records)
        if self.sink is not None:
            self.sink.write(result)
        self.step += 1
        return result

    def _step_rows(self, n_rows: int) -> list[str]:
        """The measured rows of a step with ``n_rows`` of them: all, or all but the Adam rows."""
        if n_rows == len(self.measured_rows):
            return self.measured_rows
        return [row for row in self.measured_rows if split_row_name(row)[1] != ADAM]

    def _with_second_order_rows(
        self, raw: torch.Tensor, batch_dots: torch.Tensor, rows: list[str], step: float
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Append the second-order rows (``docs/DESIGN.md`` §1.7): raw ``r − (s/2)·κ`` per target
        with ``s = lr·clip_coef``, so that their value ``s·raw`` is the second-order value and their
        sum over the batch ``<g, G> − (s/2)·<g, H_val g>`` (the efficiency identity's right side)."""
        index = {row: i for i, row in enumerate(rows)}
        names = [t.name for t in self.targets]
        first = [index[t] for t in names]
        curvature = [index[row] for row in row_names(names, [CURVATURE])[len(names) :]]
        extra_raw = raw[first] - 0.5 * step * raw[curvature]
        extra_dots = batch_dots[first] - 0.5 * step * batch_dots[curvature]
        second = row_names(names, [SECOND_ORDER])[len(names) :]
        return torch.cat([raw, extra_raw]), torch.cat([batch_dots, extra_dots]), rows + second

    def values(self, target: str | None = None) -> dict[int, float]:
        """Accumulated values ``{sample_id: phi}`` of this data-parallel replica's samples, summed
        in memory over the steps this scorer ran (``ScoringConfig(accumulate_values=True)``).
        ``target`` is a score row name: ``"name:adam"`` for a target's Adam-aware value."""
        if self.accumulator is None:
            raise RuntimeError(
                "accumulated values are not kept in memory: create the scorer with"
                " ScoringConfig(accumulate_values=True) (memory grows with every sample seen), or write the records"
                " with a ScoreWriter and merge them (`inrun-scores merge RUN -o OUT`)"
            )
        return self.accumulator.values(target or self.targets[0].name)

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue the same records: the step counter, nothing per sample.

        Resuming from it and dropping the dump's rows of later steps (``ScoreWriter(resume_step=...)``)
        gives exactly the rows, and so the merged values, of an uninterrupted run.
        """
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the in-memory accumulated values of checkpoints written by
        earlier versions are ignored (with a warning): the dump holds every step they summed."""
        self.step = int(state["step"])
        old = state.get("accumulator") or {}
        samples = sum(len(per_target) for per_target in old.get("totals", {}).values())
        if samples:
            warnings.warn(
                f"the scorer state of this checkpoint (step {self.step}) holds in-memory accumulated values of"
                f" {samples} (sample, target) pairs, written by an earlier inrun_megatron; they are ignored."
                " Accumulated values come from the score dump, which holds every step up to this checkpoint:"
                " `inrun-scores merge RUN -o OUT`",
                stacklevel=2,
            )


def _uncovered(
    prefix: str, root: torch.nn.Module, claimed: set[int], builders: Mapping[type, SiteBuilder], registry: bool
) -> str | None:
    """Why the rules path cannot score ``root`` (its first trainable parameter no site covers), or None."""
    for param_name, p in root.named_parameters():
        if p.requires_grad and id(p) not in claimed:
            owner_name = param_name.rpartition(".")[0]
            owner = root.get_submodule(owner_name)
            where = ".".join(x for x in (prefix, owner_name) if x) or type(root).__name__
            return (
                f"module {where!r} ({type(owner).__module__}.{type(owner).__name__}) has trainable"
                f" parameter {param_name!r} that no inrun_megatron score rule covers. Supported layers:"
                f" {', '.join(sorted(t.__name__ for t in builders))}. With micro_batch_size 1 the"
                " microbatch-gradient path (ScoringConfig(path='auto' or 'microbatch')) scores any module;"
                " otherwise freeze it (requires_grad=False)"
                + (
                    f", register a score rule for {type(owner).__name__} (inrun_megatron.register_rule),"
                    if registry
                    else ""
                )
                + " or build the model from supported layers"
            )
    return None
