"""What one scored step produces, and where it goes: :class:`StepResult` and the sinks.

``Scorer.end_step`` returns one :class:`StepResult`: the step's records (one row per sample and
target of this data-parallel replica) together with the facts of the step that every row shares
or that no row holds (learning rate, clipping coefficient, skipped, validation loss per target,
``<g_t, G_t>`` per score row, the pass timings). Callers read those facts from the result, never back
from the rows. The scorer hands every result to its sink, if it has one (``docs/DESIGN.md`` §2.8):
:class:`MemorySink` keeps them in memory, :class:`~inrun_megatron.records.ScoreWriter` appends
them to a Parquet dump. Framework independent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from inrun_megatron.optimizer_values import ADAM, CURVATURE, SECOND_ORDER, row_names
from inrun_megatron.scores import DocumentPartials, StepFacts, StepRecords


@dataclass(frozen=True)
class PassTimings:
    """Seconds of the parts of one scored forward/backward, on the scorer's ``pass_clock``."""

    validation: float  # the validation pass: G of every target
    training: float  # the framework's training forward/backward, scoring included
    bookkeeping: float  # reducing the partial scores, checking the sample ids, <g, G> per target
    curvature: float = 0.0  # the curvature pass of second-order values (docs/DESIGN.md §1.7); 0 without one


@dataclass(frozen=True)
class StepResult:
    """One closed optimizer step as this data-parallel replica scored it.

    Attributes:
        step: the scorer's step counter for this step (0 for the first step it scored after
            attaching, or the step a checkpoint restored).
        records: this replica's rows of the step (``records.columns``, ``records.values``).
        lr: the learning rate of the update.
        clip_coef: the factor gradient clipping multiplied the gradient by (1.0: no clipping).
        skipped: whether the update was skipped (fp16 overflow); its rows hold raw NaN, value 0.
        validation_losses: the validation loss per target at the step's weights (mean per-token
            cross-entropy, nats), from the validation pass that computed ``G``.
        batch_dots: ``<g_t, G_t>`` per score row over the whole global batch (before clipping, loss
            scale removed): by the efficiency identity (``docs/DESIGN.md`` §1.3) the sum of the
            step's raw scores of that row over every replica. Its keys are the score rows of the
            step, in the records' order: every target, then ``T:adam`` with ``<g_t, P_t ⊙ G_t>``
            for every target ``T`` when the step has Adam-aware rows (``docs/DESIGN.md`` §1.5).
        timings: the pass timings when the scorer's ``pass_clock`` is set, else None.
        documents: with document values on (``ScoringConfig.document_eod``, ``docs/DESIGN.md`` §2.9),
            one row per score row, sample and document span (``documents.columns``,
            ``documents.values``), whose raw scores sum to the sample's; else None.
    """

    step: int
    records: StepRecords
    lr: float
    clip_coef: float
    skipped: bool
    validation_losses: Mapping[str, float]
    batch_dots: Mapping[str, float]
    timings: PassTimings | None = None
    documents: StepRecords | None = None

    @property
    def targets(self) -> list[str]:
        """The validation targets, in the scorer's order."""
        return list(self.validation_losses)

    @property
    def score_rows(self) -> list[str]:
        """The step's score rows (the records' ``target`` column): the targets, then their
        Adam-aware rows where the step has them (``docs/DESIGN.md`` §1.5)."""
        return list(self.batch_dots)


def make_step_result(
    *,
    step: int,
    raw: torch.Tensor,
    sample_ids: torch.Tensor,
    n_tokens: torch.Tensor,
    lr: float,
    clip_coef: float,
    skipped: bool,
    dp_rank: int,
    validation_losses: Mapping[str, float],
    batch_dots: Mapping[str, float],
    timings: PassTimings | None = None,
    documents: DocumentPartials | None = None,
) -> StepResult:
    """The result of a step from its reduced ``[K, M, B]`` raw scores and its facts: the rows
    (:meth:`~inrun_megatron.scores.StepFacts.records`, one score row per key of ``batch_dots``,
    in that order: the targets of ``validation_losses`` in their order, then possibly their
    Adam-aware rows) and the facts come from the same arguments, so they always agree."""
    targets = list(validation_losses)
    rows = list(batch_dots)
    second_order = [CURVATURE, SECOND_ORDER]
    if rows not in [row_names(targets, kinds) for kinds in ([], [ADAM], second_order, [ADAM, *second_order])]:
        raise ValueError(
            f"batch_dots are for targets {rows}; the validation losses are for targets {targets}, whose"
            " score rows are the targets, then (for an Adam-aware step) every target's Adam-aware row, then"
            " (with second-order values) every target's curvature row and second-order row"
        )
    if raw.shape[0] != len(rows):
        raise ValueError(f"raw scores have {raw.shape[0]} rows, batch_dots {len(rows)} score rows {rows}")
    facts = StepFacts(step=step, targets=rows, lr=lr, clip_coef=clip_coef, skipped=skipped, dp_rank=dp_rank)
    document_records = None if documents is None else facts.document_records(documents, sample_ids)
    return StepResult(
        step=step,
        records=facts.records(raw, sample_ids, n_tokens),
        lr=float(lr),
        clip_coef=float(clip_coef),
        skipped=bool(skipped),
        validation_losses={t: float(v) for t, v in validation_losses.items()},
        batch_dots={t: float(v) for t, v in batch_dots.items()},
        timings=timings,
        documents=document_records,
    )


@runtime_checkable
class ResultSink(Protocol):
    """Where a scorer writes each step's result (``Scorer(..., sink=...)``).

    ``write`` is called once per step by ``end_step``, in step order; ``flush`` makes everything
    written so far durable (an entry point calls it before a checkpoint claims those steps);
    ``close`` flushes and releases the sink. Whoever created a sink flushes and closes it.
    """

    def write(self, result: StepResult) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class MemorySink:
    """Keeps every step's result in memory (``results``), for notebooks, short runs and tests.

    It grows with every sample seen; a long run writes to a
    :class:`~inrun_megatron.records.ScoreWriter` instead (``docs/DESIGN.md`` §2.7).
    """

    results: list[StepResult] = field(default_factory=list)

    def write(self, result: StepResult) -> None:
        self.results.append(result)

    def flush(self) -> None:
        """Nothing to make durable: the results live in this object."""

    def close(self) -> None:
        """Nothing to release; the results stay readable."""
