"""Second-order In-Run values (the paper's Theorem 4), framework independent.

The one-step game of ``docs/DESIGN.md`` §4: with plain SGD, step ``t`` moves the weights by
``-s·g_S`` for a subset ``S`` of the batch (``s = η_t·c_t``, ``g_S = Σ_{z∈S} ∇ℓ_z``), so the
validation loss it removes is, to second order,

    U(S) = L_val(w_t) − L_val(w_t − s·g_S) ≈ s·⟨G_t, g_S⟩ − (s²/2)·g_Sᵀ H_val g_S.

The quadratic term is a pairwise game: ``g_zᵀ H g_z`` belongs to ``z`` alone and each cross term
``g_zᵀ H g_j`` (which appears twice in the quadratic form, once per order) gives one copy to each
of ``z`` and ``j``. The Shapley value of the quadratic part is therefore ``g_zᵀ H_val g_t`` with
``g_t`` the whole batch's gradient, ``z`` included (Wang et al., ICLR 2025, Theorem 4 and App. C),
and in this project's sign (positive = helped)

    value₂(z) = s·⟨∇ℓ_z, G_t⟩ − (s²/2)·⟨∇ℓ_z, H_val g_t⟩.

Its sum over the batch is the second-order Taylor expansion of the whole step's loss change. An
adapter needs one Hessian-vector product per step and target (:func:`validation_hessian_vector_product`)
and, per sample, the *curvature* ``⟨∇ℓ_z, H_val g_t⟩``: a dot product against a weight-shaped
vector like the raw score, so the same machinery computes it. Raw score and curvature are kept
apart (as ``raw``, ``lr`` and ``clip_coef`` are, ``docs/DESIGN.md`` §1.4) so the value can be
recomputed offline; :func:`second_order_step_values` is the one formula, and
:func:`curvature_values` its second-order term, the ``value`` of a curvature row.

The adapters compute ``H_val g_t`` by :func:`central_difference_hvp` (``docs/DESIGN.md`` §1.7):
megatron-core's tensor-parallel autograd functions and its cross-entropy are not twice
differentiable, while a central difference of two validation gradients needs only the validation
pass, which every layout already runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch


def validation_hessian_vector_product(
    params: Sequence[torch.Tensor], validation_loss: Callable[[], torch.Tensor], vector: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``H_val · vector`` (one tensor per parameter) by double backward through ``validation_loss()``.

    ``validation_loss`` must be twice differentiable all the way through: megatron-core's
    vocab-parallel cross-entropy is not (its backward is a hand-written in-place kernel, so a
    Hessian-vector product through it is silently wrong, ``docs/DESIGN.md`` §4); compute the
    validation loss with ``torch.nn.functional.cross_entropy`` or an equivalent. Parameters the loss
    does not use get a zero row (their Hessian rows are zero).
    """
    params, vector = list(params), list(vector)
    if len(params) != len(vector):
        raise ValueError(f"vector has {len(vector)} tensors for {len(params)} parameters")
    for i, (p, v) in enumerate(zip(params, vector)):
        if p.shape != v.shape:
            raise ValueError(f"vector[{i}] has shape {tuple(v.shape)}, parameter {i} has {tuple(p.shape)}")
    loss = validation_loss()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [(p, g, v) for p, g, v in zip(params, grads, vector) if g is not None]
    directional = sum((g * v.to(g.dtype)).sum() for _, g, v in used)
    if not isinstance(directional, torch.Tensor) or not directional.requires_grad:
        # The gradient does not depend on the weights (a linear loss): the Hessian is zero.
        return [torch.zeros_like(p) for p in params]
    hvp = torch.autograd.grad(directional, [p for p, _, _ in used], allow_unused=True)
    by_param = {id(p): h for (p, _, _), h in zip(used, hvp)}
    return [torch.zeros_like(p) if by_param.get(id(p)) is None else by_param[id(p)] for p in params]


def finite_difference_step(weight_norm: float, direction_norm: float, dtype: torch.dtype) -> float:
    """The step ``ε`` of :func:`central_difference_hvp` along ``g``: ``ε·‖g‖ = √eps · ‖w‖``.

    ``eps`` is the machine epsilon of ``dtype`` (``torch.finfo(dtype).eps``, twice the unit roundoff;
    the dtype the validation gradient is computed in). The
    central difference errs by the truncation ``(ε²/6)·D⁴L_val[g, g, g, ·]`` plus the rounding of the
    two gradients divided by ``2ε``. The classical balance, a displacement of ``∛eps·‖w‖``, assumes
    the fourth derivative is of the order of the second on the scale of ``‖w‖``; on a transformer
    it is not (``docs/DESIGN.md`` §1.7: on the tests' GPT ``∛eps`` errs by 9·10⁻² in float32 and
    8·10⁻⁸ in float64), so the displacement is ``√eps·‖w‖``: 3.5·10⁻⁴ of ``‖w‖`` in float32,
    1.5·10⁻⁸ in float64 (there 1.4·10⁻⁴ and 1.9·10⁻¹⁰). Returns 0 when ``g`` is 0 (then ``H_val g``
    is 0 too).
    """
    if not (math.isfinite(weight_norm) and math.isfinite(direction_norm)):
        raise FloatingPointError(
            f"non-finite norm of the weights ({weight_norm}) or of the gradient ({direction_norm})"
        )
    if direction_norm == 0.0:
        return 0.0
    return math.sqrt(torch.finfo(dtype).eps) * weight_norm / direction_norm


def central_difference_hvp(
    params: Sequence[torch.Tensor],
    vector: Sequence[torch.Tensor],
    step: float,
    gradient_at: Callable[[], Sequence[torch.Tensor]],
    out: Sequence[torch.Tensor],
) -> None:
    """``out ← (∇L(w + ε·v) − ∇L(w − ε·v)) / (2ε)`` with ``ε = step``, ``w`` the ``params``.

    ``gradient_at()`` returns the gradient at the current values of ``params`` (one tensor per
    entry of ``out``, of its shape; it may stack several losses, ``[K, *param.shape]``, with ``v``
    broadcast over the leading dimension). The parameters are moved in place and restored
    bitwise from a copy afterwards, even if ``gradient_at`` raises. Memory: one copy of the
    parameters; the first gradient is kept in ``out``.

    Error (``docs/DESIGN.md`` §1.7): for every coordinate ``i``, Taylor's theorem with Lagrange
    remainder on each side gives ``|out_i − (H v)_i| ≤ (ε²/6)·max_{|τ|≤ε} |D⁴L(w + τv)[v, v, v, ·]_i|``
    plus the rounding of the two gradients divided by ``2ε``.
    """
    params, vector, out = list(params), list(vector), list(out)
    if not (len(params) == len(vector) == len(out)):
        raise ValueError(f"{len(params)} parameters, {len(vector)} vector tensors and {len(out)} outputs")
    if step == 0.0:
        for o in out:
            o.zero_()
        return
    saved = [p.detach().clone() for p in params]
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, w, v in zip(params, saved, vector):
                    p.copy_(w + (sign * step) * v.to(w.dtype))
            gradients = gradient_at()
            for o, g in zip(out, gradients):
                if sign > 0:
                    o.copy_(g)
                else:
                    o.sub_(g).div_(2.0 * step)
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)


def curvature_values(curvature: np.ndarray, lr: np.ndarray, clip_coef: np.ndarray, skipped: np.ndarray) -> np.ndarray:
    """The second-order term ``−(s²/2)·curvature`` of each row's value, ``s = lr·clip_coef``: the
    ``value`` of a curvature row (``T:curvature``), so that a sample's second-order value is the sum
    of its ``T`` and ``T:curvature`` values, step by step and accumulated. 0 in a skipped step."""
    step = lr * clip_coef
    return np.where(skipped, 0.0, -0.5 * step * step * curvature)


def second_order_step_values(
    raw: np.ndarray, curvature: np.ndarray, lr: np.ndarray, clip_coef: np.ndarray, skipped: np.ndarray
) -> np.ndarray:
    """The second-order value ``s·raw − (s²/2)·curvature`` of each row, ``s = lr·clip_coef``.

    ``raw = ⟨∇ℓ_z, G_t⟩`` and ``curvature = ⟨∇ℓ_z, H_val g_t⟩`` with ``g_t`` the batch gradient
    before clipping: clipping scales the whole update, ``c_t·g_t``, so it enters squared with the
    learning rate (the clip factor is held fixed for every subset, as in the first-order value).
    Exactly 0 in a step whose update was skipped, like :func:`inrun_megatron.scores.step_values`.
    """
    step = lr * clip_coef
    return np.where(skipped, 0.0, step * raw) + curvature_values(curvature, lr, clip_coef, skipped)
