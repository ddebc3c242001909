"""Score bookkeeping: per-step score tensors, per-sample records and the value formula.

Framework independent. An adapter calls :meth:`StepScores.add` from layer backward hooks
with ``[K, T, B]`` per-token partials (rules.py) or ``[K, B]`` per-sample ones, reduces the step
tensor over its model-parallel groups, then turns it into records with :meth:`StepFacts.records`
(and, with document values on, :func:`document_partials` and :meth:`StepFacts.document_records`).
:func:`step_values` is the one place the value of a row is computed (records, dumps, the optional
in-memory :class:`ValueAccumulator` and the offline merge all call it). The meaning of every number is
``docs/DESIGN.md`` §1; :data:`SCORE_CONTRACT` is what dumps and docs repeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from inrun_megatron.optimizer_values import CURVATURE_ROW_SUFFIX
from inrun_megatron.second_order import curvature_values


class CountedSite(Protocol):
    """A site as a step's score tensor sees it (:class:`inrun_megatron.sites.Site`): named, and
    counting its backward passes in the step."""

    name: str
    calls: int


#: How a training loss divides sequence z's masked token-loss sum ``s_z = sum mask * CE`` into its term
#: ``l_z`` (docs/DESIGN.md §1.1); the manifest's ``loss_normalisation`` names one.
MICROBATCH_TOKENS = "microbatch_tokens"
GLOBAL_BATCH_TOKENS = "global_batch_tokens"
LOSS_NORMALISATIONS = {
    MICROBATCH_TOKENS: "l_z = s_z / (loss tokens of z's microbatch * microbatches * data-parallel replicas):"
    " megatron-core's default loss (calculate_per_token_loss=False)",
    GLOBAL_BATCH_TOKENS: "l_z = s_z / (loss tokens of the whole global batch, over every microbatch and data-parallel"
    " replica), as the factor 1/N megatron multiplies the gradients by (computed in float32):"
    " megatron-core's calculate_per_token_loss=True; the divisor is the sum of the step's n_tokens over"
    " every replica's rows of one target where the loss function counts the loss mask (megatron's does)",
}

#: Bumped whenever the meaning of a stored number changes.
SCORE_DEFINITION_VERSION = 1

SCORE_CONTRACT = {
    "score_definition_version": SCORE_DEFINITION_VERSION,
    "raw": "<grad of the sample's additive term in the training loss, grad of the validation loss>"
    " at the step's weights; units: loss^2 / weight^2 (the validation loss is mean per-token"
    " cross-entropy in nats)",
    "value": "lr * clip_coef * raw: first-order estimate of how much the sample's part of the"
    " step lowered the validation loss, in nats",
    "sign": "positive = the sample lowered the validation loss (helpful); the paper's phi is -value",
    "accumulated": "sum of value over the steps that trained on the sample; skipped steps add nothing",
    "skipped": "a step whose update was skipped (fp16 overflow) stores raw NaN and value 0",
    "value_kinds": "the target column names a score row: T holds target T's SGD value (raw and value as above);"
    " T:adam, recorded when the optimizer is Adam/AdamW, its Adam-aware value: raw = <grad of the sample's loss"
    " term, P_t * G>, P_t = (1 - beta1) / (1 - beta1^t) / (sqrt(v_{t-1} / (1 - beta2^(t-1))) + eps) elementwise"
    " from the optimizer's second moment v before step t (t counts the optimizer's steps including this one),"
    " value = lr * clip_coef * raw. The first step (no second moment before it) records no T:adam rows; momentum"
    " carried into later steps and weight decay add no per-sample term. Under plain SGD the SGD value is the"
    " optimizer-aware value. T:curvature, recorded with second-order values: raw = <grad of the sample's loss term,"
    " H_val g_t> (H_val the validation loss's Hessian, g_t the step's whole gradient before clipping, by a central"
    " difference of two validation gradients), value = -(lr * clip_coef)^2 / 2 * raw, the second-order term;"
    " T:second-order, recorded with them: raw = T's raw - lr * clip_coef / 2 * T:curvature's raw, value ="
    " lr * clip_coef * raw, the second-order value (the sum of the T and T:curvature values)."
    " The manifest's 'values' section maps rows to targets and kinds",
    "loss_normalisations": "the sample's loss term l_z under each training loss normalisation the manifest's"
    " loss_normalisation may name: " + "; ".join(f"{name}: {formula}" for name, formula in LOSS_NORMALISATIONS.items()),
}


def step_values(raw: np.ndarray, lr: np.ndarray, clip_coef: np.ndarray, skipped: np.ndarray) -> np.ndarray:
    """The value ``lr * clip_coef * raw`` of each row; exactly 0 in a step whose update was skipped.

    A skipped step changed no weight, so its samples contributed nothing (their raw score is NaN:
    the gradient overflowed). Storing 0 rather than NaN makes every plain sum of values, in
    numpy, pandas, DuckDB or the merge, the accumulated value of ``docs/DESIGN.md`` §1.2.
    """
    return np.where(skipped, 0.0, lr * clip_coef * raw)


def row_values(
    rows: np.ndarray | str, raw: np.ndarray, lr: np.ndarray, clip_coef: np.ndarray, skipped: np.ndarray
) -> np.ndarray:
    """The value of rows of any score row (``rows``: each row's name, or one name for all): the
    second-order term (:func:`inrun_megatron.second_order.curvature_values`) for curvature rows
    (``docs/DESIGN.md`` §1.7), :func:`step_values` for every other row."""
    curvature = np.char.endswith(np.asarray(rows, dtype=str), CURVATURE_ROW_SUFFIX)
    if not curvature.any():
        return step_values(raw, lr, clip_coef, skipped)
    return np.where(curvature, curvature_values(raw, lr, clip_coef, skipped), step_values(raw, lr, clip_coef, skipped))


@dataclass(frozen=True)
class TokenLayout:
    """Which sequence positions a site's per-token partials cover (``docs/DESIGN.md`` §2.9).

    Every site sees the whole sequence of ``seq_length`` positions, except norms under sequence
    parallelism, which see shard ``shard_index`` of ``shard_count`` contiguous equal shards (the
    tensor-parallel rank's tokens)."""

    seq_length: int
    shard_index: int = 0
    shard_count: int = 1

    def positions(self, n_tokens: int, site: str) -> slice:
        if n_tokens == self.seq_length:
            return slice(0, n_tokens)
        if self.shard_count > 1 and n_tokens * self.shard_count == self.seq_length:
            return slice(self.shard_index * n_tokens, (self.shard_index + 1) * n_tokens)
        raise RuntimeError(
            f"layer {site} computed per-token partials for {n_tokens} positions of a sequence of {self.seq_length}"
            f" ({self.shard_count} sequence shards): document values need each token's position"
        )


class StepScores:
    """Partial scores of one optimizer step on one rank: ``[K targets, M microbatches, B]``, or with a
    :class:`TokenLayout` (document values on) per position, ``[K, M, S positions, B]``."""

    def __init__(
        self,
        n_targets: int,
        n_microbatches: int,
        micro_batch_size: int,
        device: torch.device,
        token_layout: TokenLayout | None = None,
    ):
        self.token_layout = token_layout
        per_token = () if token_layout is None else (token_layout.seq_length,)
        shape = (n_targets, n_microbatches, *per_token, micro_batch_size)
        self.totals = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sites: list[CountedSite] = []

    @property
    def n_microbatches(self) -> int:
        return self.totals.shape[1]

    def next_microbatch(self, site: CountedSite) -> int:
        """Claim the microbatch index of this backward call of ``site``."""
        if site.calls == 0:
            self.sites.append(site)
        mb = site.calls
        site.calls += 1
        if mb >= self.n_microbatches:
            raise RuntimeError(
                f"layer {site.name} ran backward {site.calls} times in a step of {self.n_microbatches}"
                " microbatches; a layer used twice per forward needs its own site"
            )
        return mb

    def add(self, microbatch: int, partial: torch.Tensor, site: CountedSite) -> None:
        """Add a site's partial for one microbatch: per token ``[K, T, B]`` (summed over ``T`` here, or
        kept per position for document values) or per sample ``[K, B]``."""
        b = partial.shape[-1]
        if self.token_layout is None:
            self.totals[:, microbatch, :b] += partial.sum(1) if partial.dim() == 3 else partial
        elif partial.dim() == 3:
            self.totals[:, microbatch, self.token_layout.positions(partial.shape[1], site.name), :b] += partial
        else:
            raise RuntimeError(
                f"layer {site.name} gave per-sample scores; document values (docs/DESIGN.md §2.9) need per-token"
                " partials [K, T, B] from every score rule"
            )

    def check_complete(self) -> None:
        """Every site that ran must have run once per microbatch (else the indexing is off)."""
        for site in self.sites:
            if site.calls != self.n_microbatches:
                raise RuntimeError(f"layer {site.name} ran backward {site.calls} times, expected {self.n_microbatches}")

    def reset_sites(self) -> None:
        for site in self.sites:
            site.calls = 0
        self.sites.clear()


def document_spans(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Span index of every position of ``[B, S]`` input tokens: a document's span is the positions
    whose input token belongs to it, its end-of-document token included (the first span is 0).
    This is where megatron's ``reset_attention_mask``/``reset_position_ids`` cut (after each EOD)."""
    is_eod = (tokens == eod).to(torch.int64)
    return is_eod.cumsum(-1) - is_eod


@dataclass
class DocumentPartials:
    """A step's raw scores per document span: ``raw [K, M, B, D]`` (0 past a sequence's last span),
    ``span_tokens [M, B, D]`` (positions of each span) and ``n_spans [M, B]``."""

    raw: torch.Tensor
    span_tokens: torch.Tensor
    n_spans: torch.Tensor


def document_partials(per_token: torch.Tensor, spans: torch.Tensor) -> DocumentPartials:
    """Segment sums of reduced per-token partials ``[K, M, S, B]`` over the spans ``[M, B, S]`` of
    :func:`document_spans` (``docs/DESIGN.md`` §2.9); the sequence's raw score is their sum."""
    k = per_token.shape[0]
    n_spans = spans.amax(-1) + 1
    width = int(n_spans.max())
    index = spans.to(per_token.device)
    raw = torch.zeros(*index.shape[:2], width, k, dtype=torch.float64, device=per_token.device)
    raw.scatter_add_(2, index.unsqueeze(-1).expand(*index.shape, k), per_token.permute(1, 3, 2, 0))
    span_tokens = torch.zeros(*index.shape[:2], width, dtype=torch.int64, device=per_token.device)
    span_tokens.scatter_add_(2, index, torch.ones_like(index))
    return DocumentPartials(raw.permute(3, 0, 1, 2), span_tokens, n_spans)


@dataclass
class StepRecords:
    """Records of one step on one data-parallel replica, as numpy columns: those of
    :data:`inrun_megatron.records.SCORE_SCHEMA` except ``value``, which :attr:`values` computes."""

    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["step"])

    @property
    def values(self) -> np.ndarray:
        """The value of each row (:func:`row_values`)."""
        c = self.columns
        return row_values(c["target"], c["raw"], c["lr"], c["clip_coef"], c["skipped"])


@dataclass(frozen=True)
class StepFacts:
    """What every row of one step on one data-parallel replica shares, given once so that the step's
    sample rows and document rows (``docs/DESIGN.md`` §2.8, §2.9) are built from the same facts.

    ``targets`` are the step's score rows, in the order of the first dimension of its raw tensors.
    """

    step: int
    targets: list[str]
    lr: float
    clip_coef: float
    skipped: bool
    dp_rank: int

    def records(self, raw: torch.Tensor, sample_ids: torch.Tensor, n_tokens: torch.Tensor) -> StepRecords:
        """Flatten a reduced ``[K, M, B]`` raw tensor into one row per (score row, sample)."""
        k, m, b = raw.shape
        n = m * b
        columns = self._shared_columns(raw.detach().cpu().numpy().reshape(k, n))
        columns["sample_id"] = np.tile(sample_ids.cpu().numpy().reshape(n).astype(np.int64), k)
        columns["n_tokens"] = np.tile(n_tokens.cpu().numpy().reshape(n).astype(np.int64), k)
        columns["microbatch"] = np.tile(np.repeat(np.arange(m, dtype=np.int32), b), k)
        columns["position"] = np.tile(np.tile(np.arange(b, dtype=np.int32), m), k)
        return StepRecords(columns)

    def document_records(self, documents: DocumentPartials, sample_ids: torch.Tensor) -> StepRecords:
        """One row per (score row, sample, document span) of the step."""
        k = documents.raw.shape[0]
        n_spans = documents.n_spans.cpu().numpy().reshape(-1)
        width = documents.raw.shape[-1]
        keep = (np.arange(width)[None, :] < n_spans[:, None]).reshape(-1)  # spans that exist, [M*B*D]
        columns = self._shared_columns(documents.raw.detach().cpu().numpy().reshape(k, -1)[:, keep])
        ids = np.repeat(sample_ids.cpu().numpy().reshape(-1).astype(np.int64), width)[keep]
        columns["sample_id"] = np.tile(ids, k)
        columns["span"] = np.tile(np.tile(np.arange(width, dtype=np.int32), len(n_spans))[keep], k)
        columns["span_tokens"] = np.tile(documents.span_tokens.cpu().numpy().reshape(-1)[keep].astype(np.int64), k)
        return StepRecords(columns)

    def _shared_columns(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        """The columns of ``K * N`` rows from their ``[K, N]`` raw scores (score row major) that every
        kind of row has; a skipped step stores NaN raw."""
        k, n = raw.shape
        if self.skipped:
            raw = np.full_like(raw, np.nan)
        return {
            "step": np.full(k * n, self.step, dtype=np.int64),
            "target": np.repeat(np.array(self.targets, dtype=object), n),
            "raw": raw.reshape(k * n).astype(np.float64),
            "lr": np.full(k * n, self.lr, dtype=np.float64),
            "clip_coef": np.full(k * n, self.clip_coef, dtype=np.float64),
            "skipped": np.full(k * n, self.skipped, dtype=np.bool_),
            "dp_rank": np.full(k * n, self.dp_rank, dtype=np.int32),
        }


def make_step_records(
    *,
    step: int,
    targets: list[str],
    raw: torch.Tensor,
    sample_ids: torch.Tensor,
    n_tokens: torch.Tensor,
    lr: float,
    clip_coef: float,
    skipped: bool,
    dp_rank: int,
) -> StepRecords:
    """:meth:`StepFacts.records` for a caller that holds the step's facts one by one. Skipped steps store NaN raw."""
    return StepFacts(step, targets, lr, clip_coef, skipped, dp_rank).records(raw, sample_ids, n_tokens)


@dataclass
class ValueAccumulator:
    """Accumulated value ``phi(z) = sum_t lr_t * c_t * raw_t(z)`` per target and sample id, in memory.

    Two dict entries per sample and target: opt-in (``ScoringConfig(accumulate_values=True)``)
    for short runs; long runs merge their dumps instead (``inrun-scores merge``).
    """

    totals: dict[str, dict[int, float]] = field(default_factory=dict)
    steps_seen: dict[str, dict[int, int]] = field(default_factory=dict)

    def add(self, records: StepRecords) -> None:
        c = records.columns
        values = records.values
        for target, sid, value, skipped in zip(c["target"], c["sample_id"], values, c["skipped"]):
            if skipped:
                continue
            per_target = self.totals.setdefault(target, {})
            per_target[int(sid)] = per_target.get(int(sid), 0.0) + float(value)
            seen = self.steps_seen.setdefault(target, {})
            seen[int(sid)] = seen.get(int(sid), 0) + 1

    def values(self, target: str) -> dict[int, float]:
        return dict(self.totals.get(target, {}))

    def state_dict(self) -> dict:
        return {"totals": self.totals, "steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict) -> None:
        self.totals = {t: dict(v) for t, v in state["totals"].items()}
        self.steps_seen = {t: dict(v) for t, v in state["steps_seen"].items()}
