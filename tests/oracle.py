"""Brute-force references: one forward and backward per sample, plain autograd, no scorer.

A fresh forward per sample keeps the oracle independent of autograd subtleties of the code
under test (megatron's cross-entropy backward works in place; recomputation forbids
``autograd.grad``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

TokenLosses = Callable[[torch.nn.Module, dict], torch.Tensor]


def gradients(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: d loss / d param}`` for every trainable parameter, via ``.backward()``."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.grad for n, p in params.items()}
    for p in params.values():
        p.grad = None
    loss_fn().backward()
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in params.items()}
    for n, p in params.items():
        p.grad = saved[n]
    return grads


def dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))


def abs_dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``sum |a_i b_i|``: bounds how far rounding each ``a_i`` can move ``dot(a, b)``."""
    return float(sum((a[n].double() * b[n].double()).abs().sum() for n in a))


def validation_gradient(model: torch.nn.Module, batches: Sequence[dict], token_losses: TokenLosses) -> dict:
    """Gradient of the mean per-token (masked) loss over every validation batch.

    The masked token loss is written out here rather than taken from
    ``inrun_megatron.validation.masked_loss_sum``: the oracle checks the library, so it shares none
    of the library's loss code.
    """
    n_tokens = sum(float(b["loss_mask"].sum()) for b in batches)
    return gradients(model, lambda: sum((token_losses(model, b) * b["loss_mask"]).sum() for b in batches) / n_tokens)


def per_sample_raw(
    model: torch.nn.Module,
    microbatches: Sequence[dict],
    token_losses: TokenLosses,
    g_val: dict[str, torch.Tensor],
    dp_size: int = 1,
    combine: Callable[[dict, dict], Any] = dot,
    per_token_loss: bool = False,
) -> dict[int, Any]:
    """``combine(grad l_z, G)`` (default ``<grad l_z, G>``) for every sample, with megatron's
    default normalisation of l_z: masked token-loss sum / (tokens in the microbatch *
    microbatches * DP size); with ``per_token_loss`` (megatron's ``calculate_per_token_loss``),
    masked token-loss sum / the loss tokens of all of ``microbatches``, which must then be the
    whole global batch (every DP rank's microbatches). megatron multiplies the gradients by the
    reciprocal of that count computed in float32 (``1.0 / count`` of its integer count tensor), so
    the per-token term is multiplied by exactly that factor here too: in float64 runs its rounding
    (up to 6e-8) is far above the tolerance."""
    out = {}
    n_micro = len(microbatches)
    global_tokens = sum(float(b["loss_mask"].sum()) for b in microbatches)
    reciprocal = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(max(global_tokens, 1.0)))
    for batch in microbatches:
        per_microbatch = 1.0 / (max(float(batch["loss_mask"].sum()), 1.0) * n_micro * dp_size)
        factor = reciprocal if per_token_loss else per_microbatch
        for j, sid in enumerate(batch["sample_ids"].tolist()):

            def loss_z(batch=batch, j=j):
                return (token_losses(model, batch)[j] * batch["loss_mask"][j]).sum() * factor

            out[int(sid)] = combine(gradients(model, loss_z), g_val)
    return out


def document_positions(tokens: torch.Tensor, eod: int) -> list[list[int]]:
    """The positions of each document of one row of input tokens, written out here (not the library's):
    a document runs through its end-of-document token; the next starts after it."""
    documents: list[list[int]] = [[]]
    for position, token in enumerate(tokens.tolist()):
        documents[-1].append(position)
        if token == eod and position < len(tokens) - 1:
            documents.append([])
    return documents


def per_document_raw(
    model: torch.nn.Module,
    microbatches: Sequence[dict],
    token_losses: TokenLosses,
    g_val: dict[str, torch.Tensor],
    eod: int,
    dp_size: int = 1,
) -> dict[tuple[int, int], float]:
    """``<grad of document d's own loss terms, G>`` per (sample id, document index in the sequence): one
    backward of the terms of ``l_z`` (normalised as in :func:`per_sample_raw`) at the document's positions."""
    out = {}
    n_micro = len(microbatches)
    for batch in microbatches:
        denom = max(float(batch["loss_mask"].sum()), 1.0) * n_micro * dp_size
        for j, sid in enumerate(batch["sample_ids"].tolist()):
            for d, positions in enumerate(document_positions(batch["tokens"][j], eod)):

                def loss_d(batch=batch, j=j, positions=positions):
                    terms = token_losses(model, batch)[j] * batch["loss_mask"][j]
                    return terms[positions].sum() / denom

                out[(int(sid), d)] = dot(gradients(model, loss_d), g_val)
    return out


def adam_preconditioner(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> torch.Tensor:
    """``P_t`` of torch Adam/AdamW for ``param`` from its state before step ``t`` (:func:`adam_preconditioner_of`)."""
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    state = optimizer.state[param]
    return adam_preconditioner_of(state["exp_avg_sq"], int(state["step"]), group["betas"], group["eps"])


def adam_preconditioner_of(
    exp_avg_sq: torch.Tensor, steps_taken: int, betas: tuple[float, float], eps: float
) -> torch.Tensor:
    """``P_t``, written out from Adam's update rule (docs/DESIGN.md §1.5), in float64.

    Before step ``t`` the state holds ``m_{t-1}``, ``v_{t-1}`` and ``k = t - 1`` steps taken. With ``v``
    held at ``v_{t-1}``, the update is ``-lr * (beta1 m_{t-1} + (1 - beta1) g) / (1 - beta1^t) / (sqrt(v_hat) + eps)``
    with ``v_hat = v_{t-1} / (1 - beta2^k)``; its derivative by ``g``, over ``-lr``, is ``P_t``.
    """
    beta1, beta2 = betas
    v_hat = exp_avg_sq.double() / (1.0 - beta2**steps_taken)
    m_t_per_g = (1.0 - beta1) / (1.0 - beta1 ** (steps_taken + 1))
    return m_t_per_g / (torch.sqrt(v_hat) + eps)
