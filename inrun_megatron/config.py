"""Scoring options shared by every framework adapter, as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

#: The accepted values of each option: the one list that ScoringConfig, the run configs' YAML
#: validation and the command lines check against.
VALIDATION_SPLITS = ("replicate", "split")
SCORING_PATHS = ("auto", "rules", "microbatch")
#: dtypes the per-layer score GEMMs may be forced to, by name (``torch.<name>``).
PROJECTION_DTYPES = ("float32", "float64", "bfloat16")


@dataclass
class ScoringConfig:
    """How In-Run Data Shapley is computed; none of these options changes what a score means.

    Attributes:
        validation_split: ``"replicate"`` runs the whole validation set on every data-parallel
            rank (no communication); ``"split"`` spreads its batches over the DP ranks and
            all-reduces the validation gradient (less compute for large validation sets).
            Both give the same ``G``.
        projection_dtype: dtype of the per-layer score GEMMs; None uses the activation dtype,
            with float16/bfloat16 activations promoted to float32 (bf16 ones on a GPU through
            TF32 tensor cores, which represent them exactly: see ``rules._tensor_core_gemms``).
        path: how per-sample gradients are dotted with ``G``. ``"microbatch"`` scores each
            microbatch's own parameter gradient (exact when a microbatch holds one sequence; any
            layer type; no extra GEMM), ``"rules"`` runs a per-layer rule inside each layer's
            backward (any micro-batch size; only layers with a rule), ``"auto"`` picks
            ``"microbatch"`` for steps whose micro-batch size is 1 and ``"rules"`` otherwise. Both
            give the same scores.
        allow_untested_megatron: attach to a megatron-core version outside the tested ones.
        accumulate_values: also sum each sample's values in memory (``scorer.values()``, a
            :class:`~inrun_megatron.scores.ValueAccumulator`).
        optimizer_values: when the optimizer is Adam/AdamW, also score every sample against the
            preconditioned validation gradient ``P_t ⊙ G_t`` (the Adam-aware value,
            ``docs/DESIGN.md`` §1.5), in the same backward as the SGD value; False records the
            SGD value only.
        document_eod: the end-of-document token id of packed training sequences, to also record each
            document's part of every sequence's raw score (``docs/DESIGN.md`` §2.9): the same
            backward's per-token partials summed over each document's span (the positions whose
            input token belongs to it, its end-of-document token included), which add up to the
            sequence's raw score. Exactly the document's own value when attention and position ids
            reset at document boundaries. Needs the per-layer rules (``path="auto"`` then always
            takes them; ``"microbatch"``, whose gradient is the whole sequence's, is refused) and a
            Megatron-Core model. None (default): off.
        second_order: also record every sample's curvature ``<grad l_z, H_val g_t>`` (a
            ``T:curvature`` row per target), from which the second-order value
            ``lr·clip·raw − (lr·clip)²/2 · curvature`` follows (``docs/DESIGN.md`` §1.7). Costs a
            curvature pass per step: two more validation passes and the training microbatches
            forward and backward once more (Megatron adapter; fp32/float64 weights).

    ``accumulate_values`` is off by default because it grows with every sample seen (a 7B run sees ~10^8
    sequences per replica, and an in-memory accumulator of them costs gigabytes per rank), while
    the scorer itself holds only one step: ``end_step`` returns the step's result, a
    :class:`~inrun_megatron.records.ScoreWriter` sink makes it durable, and ``inrun-scores merge``
    (:mod:`inrun_megatron.analysis.merge`) sums the rows into accumulated values out of core. Turn
    it on for short runs and notebooks. It is not part of ``Scorer.state_dict()``: the
    accumulator covers the steps this scorer object ran (``docs/DESIGN.md`` §2.7).
    """

    validation_split: str = "replicate"
    projection_dtype: torch.dtype | None = None
    path: str = "auto"
    allow_untested_megatron: bool = False
    accumulate_values: bool = False
    optimizer_values: bool = True
    document_eod: int | None = None
    second_order: bool = False

    def __post_init__(self) -> None:
        if self.validation_split not in VALIDATION_SPLITS:
            raise ValueError(f"validation_split must be one of {VALIDATION_SPLITS}, got {self.validation_split!r}")
        if self.path not in SCORING_PATHS:
            raise ValueError(f"path must be one of {SCORING_PATHS}, got {self.path!r}")
        if self.document_eod is not None and self.path == "microbatch":
            raise ValueError(
                "document values (document_eod) need per-token partials, which only the per-layer rules give: the"
                " microbatch-gradient path sees one gradient per sequence. Use path='auto' or 'rules'"
            )
        if self.document_eod is not None and self.second_order:
            raise ValueError(
                "document values (document_eod) and second-order values (second_order) cannot be recorded together:"
                " the curvature pass scores whole sequences, not document spans. Turn one of them off"
            )
        allowed = [getattr(torch, name) for name in PROJECTION_DTYPES]
        if self.projection_dtype is not None and self.projection_dtype not in allowed:
            raise ValueError(f"projection_dtype must be None or one of {allowed}, got {self.projection_dtype!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["projection_dtype"] = None if self.projection_dtype is None else str(self.projection_dtype)
        return d


def projection_dtype(name: str | None) -> torch.dtype | None:
    """``ScoringConfig.projection_dtype`` from its name in a run config or on a command line."""
    if name is not None and name not in PROJECTION_DTYPES:
        raise ValueError(f"projection dtype {name!r} is not one of {PROJECTION_DTYPES}")
    return None if name is None else getattr(torch, name)
