"""Optimizer-aware values: the preconditioner of an Adam step (framework independent).

``docs/DESIGN.md`` §1.5. With the optimizer state held fixed for step ``t``, Adam moves the weights
by ``-lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_t = beta1 m_{t-1} + (1 - beta1) g_t``, so the part of
the update that sample ``z``'s gradient causes is ``-lr * P_t ⊙ grad l_z`` with the diagonal

    P_t = (1 - beta1) / (1 - beta1^t) / (sqrt(v_{t-1} / (1 - beta2^(t-1))) + eps)

(``t`` the optimizer's step count after this step, ``v_{t-1}`` the second moment before it). Its
first-order effect on the validation loss is ``lr * clip * <grad l_z, P_t ⊙ G_t>``: the raw score
against the *preconditioned* validation gradient. The adapters store ``P_t ⊙ G_t`` as extra rows
of the validation-gradient store (one per target), so both scoring paths produce both raw scores
in the same backward: no extra pass and no extra GEMM call, the same GEMMs and dot products with
twice the validation rows.

A step with no second moment before it (the optimizer's first step) has no Adam-aware value:
:func:`adam_preconditioner` returns None and the step records no Adam rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Value kinds a run may record. ``sgd``: ``lr * clip * <grad l_z, G>``; ``adam``: the same
#: against ``P_t ⊙ G_t`` (docs/DESIGN.md §1.5); ``curvature``: the second-order term of the value,
#: ``-(s²/2) <grad l_z, H_val g_t>``, and ``second-order``: the whole second-order value
#: (docs/DESIGN.md §1.7, :mod:`inrun_megatron.second_order`).
SGD, ADAM, CURVATURE, SECOND_ORDER = "sgd", "adam", "curvature", "second-order"

#: Suffix of the record rows (the ``target`` column) that hold the Adam-aware value of a target.
ADAM_ROW_SUFFIX = ":adam"
#: Suffix of the rows that hold a target's curvature ``<grad l_z, H_val g_t>`` (docs/DESIGN.md §1.7).
CURVATURE_ROW_SUFFIX = ":curvature"
#: Suffix of the rows that hold a target's second-order value (docs/DESIGN.md §1.7).
SECOND_ORDER_ROW_SUFFIX = ":second-order"
#: Each value kind but the SGD value, with the suffix of its rows, in the order of a step's rows.
ROW_SUFFIXES = {ADAM: ADAM_ROW_SUFFIX, CURVATURE: CURVATURE_ROW_SUFFIX, SECOND_ORDER: SECOND_ORDER_ROW_SUFFIX}

#: Optimizer classes, by name, whose update is Adam's (torch, apex, Transformer Engine, DeepSpeed).
ADAM_OPTIMIZERS = ("Adam", "AdamW", "FusedAdam", "DeepSpeedCPUAdam")


def adam_preconditioner(
    exp_avg_sq: torch.Tensor,
    step: int,
    betas: tuple[float, float],
    eps: float,
    *,
    bias_correction: bool = True,
) -> torch.Tensor | None:
    """The diagonal ``P_t`` of an Adam/AdamW step, from the state *before* the step; None at the first step.

    Args:
        exp_avg_sq: the optimizer's second moment ``v_{t-1}`` of one parameter (or shard), as it
            is before this step's update.
        step: how many updates the optimizer has already applied to this parameter (torch's
            ``state["step"]`` before this step; this step is ``t = step + 1``).
        betas: ``(beta1, beta2)`` of the parameter's group.
        eps: the group's ``eps``, added to ``sqrt(v_hat)`` as Adam does.
        bias_correction: False for optimizers built with ``bias_correction=False`` (apex,
            DeepSpeed): then neither moment is bias-corrected.

    Returns ``(1 - beta1) / (1 - beta1^t) / (sqrt(v_{t-1} / (1 - beta2^(t-1))) + eps)`` in float32
    (float64 for a float64 state): the derivative of the update by the gradient, divided by
    ``-lr``, with the state held fixed. Weight decay (decoupled or L2) adds a term that does not
    depend on the batch, so it is not part of ``P``. Returns None when ``step`` is 0: there is no
    second moment before the first step (``v_0 = 0`` and its bias correction is ``0/0``).
    """
    if step < 0:
        raise ValueError(f"an optimizer step count is never negative, got {step}")
    if step == 0:
        return None
    beta1, beta2 = betas
    t = step + 1
    dtype = torch.float64 if exp_avg_sq.dtype == torch.float64 else torch.float32
    v = exp_avg_sq.to(dtype)
    if bias_correction:
        first = (1.0 - beta1) / (1.0 - beta1**t)
        v = v / (1.0 - beta2**step)
    else:
        first = 1.0 - beta1
    return first / (v.sqrt() + eps)


def torch_adam_preconditioner(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, group: dict | None = None
) -> torch.Tensor | None:
    """``P_t`` of ``param`` (a key of ``optimizer.state``) for torch's Adam/AdamW, apex's, Transformer
    Engine's and DeepSpeed's FusedAdam; None before the first step. Raises for variants whose update
    is not Adam's (amsgrad, maximize). ``group``: the parameter group whose hyperparameters apply,
    where ``param`` is not listed in one between steps (DeepSpeed ZeRO-3)."""
    group = group or next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        raise KeyError(f"a parameter of shape {tuple(param.shape)} is in none of the optimizer's parameter groups")
    for option in ("amsgrad", "maximize"):
        if group.get(option):
            raise NotImplementedError(f"Adam-aware values of Adam with {option}=True are not defined")
    state = optimizer.state.get(param, {})
    if "exp_avg_sq" not in state:
        return None  # no step taken yet
    step = state.get("step", group.get("step"))  # apex and Transformer Engine keep it per group
    if step is None:
        raise KeyError(f"{type(optimizer).__name__} keeps no step count where Adam keeps it (state or group 'step')")
    exp_avg_sq = state["exp_avg_sq"]
    unscaled = getattr(optimizer, "get_unscaled_state", None)  # Transformer Engine's low-precision states
    if unscaled is not None:
        exp_avg_sq = unscaled(param, "exp_avg_sq")
    return adam_preconditioner(
        exp_avg_sq,
        int(step),
        tuple(group["betas"]),
        float(group["eps"]),
        bias_correction=bool(group.get("bias_correction", True)),
    )


def is_adam(optimizer: object) -> bool:
    """Whether ``optimizer`` (a torch optimizer, unwrapped) applies Adam's update."""
    return any(cls.__name__ in ADAM_OPTIMIZERS for cls in type(optimizer).__mro__)


def row_names(targets: Sequence[str], kinds: Sequence[str]) -> list[str]:
    """Names of the score rows of a run: every target once per value kind, in the order of
    :data:`ROW_SUFFIXES` after the SGD rows.

    The ``target`` column of the records holds these names: ``name`` for the SGD value and
    ``name`` plus the kind's suffix for the others (``name:adam``, ``name:curvature``,
    ``name:second-order``).
    """
    names = list(targets)
    for kind, suffix in ROW_SUFFIXES.items():
        if kind in kinds:
            names += [f"{t}{suffix}" for t in targets]
    return names


def split_row_name(row: str) -> tuple[str, str]:
    """``(target, value kind)`` of a score row name (:func:`row_names`)."""
    for kind, suffix in ROW_SUFFIXES.items():
        if row.endswith(suffix):
            return row[: -len(suffix)], kind
    return row, SGD


@dataclass(frozen=True)
class RunValues:
    """The manifest's ``values`` field (``docs/DESIGN.md`` §1.5): which value kinds a run recorded,
    which score rows hold which, and the value every analysis reads by default."""

    kinds: list[str]
    """The value kinds recorded: ``"sgd"`` always, then ``"adam"``, ``"curvature"`` and ``"second-order"``
    where recorded."""
    default: str
    """What analyses read when no ``--value`` is given: the Adam-aware value where it was recorded."""
    rows: dict[str, dict[str, str]]
    """Per score row (the records' ``target`` column), its ``target`` and ``value`` kind."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunValues:
        """Type the field as read from JSON."""
        return cls(kinds=list(data["kinds"]), default=data["default"], rows=dict(data["rows"]))


def values_manifest(targets: Sequence[str], kinds: Sequence[str]) -> RunValues:
    """What a run's manifest says about its value kinds: which score rows hold which value, and
    the default of every analysis (the Adam-aware value where it was recorded)."""
    rows = row_names(targets, kinds)
    return RunValues(
        kinds=list(kinds),
        default=ADAM if ADAM in kinds else SGD,
        rows={row: dict(zip(("target", "value"), split_row_name(row))) for row in rows},
    )


def precondition_rows(store_rows: Sequence[tuple[torch.Tensor, torch.Tensor | None]], n_targets: int) -> None:
    """Write ``P ⊙ G`` into rows ``[K, 2K)`` of each stored ``[2K, ...]`` gradient, from rows ``[0, K)``.

    ``store_rows`` pairs each stored gradient with its ``P`` (the stored gradient's trailing shape,
    or a flat tensor of as many elements). Called once per step, after the validation pass and
    before the training microbatches.
    """
    for rows, p in store_rows:
        g, adam = rows[:n_targets], rows[n_targets:]
        adam.copy_(g * p.reshape(g.shape[1:]).to(g.dtype))
