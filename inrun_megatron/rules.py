"""Per-layer score rules: each sample's partial dot product ``<grad of its loss term, G>``.

Every rule takes what one layer sees in its backward pass (its input ``a`` or token ids, the
gradient ``b`` of its output) and the validation gradient ``G`` of the layer's parameters,
stacked over K validation targets, and returns a ``[K, T, B]`` tensor of *per-token partials*: for
each target k, token position t and sample j of the microbatch, token t's contribution to
``<dL_j/dW, G_k>`` (every weight is shared over positions, so a sample's score is the sum of its
tokens' partials). Because other samples' losses do not depend on sample j's activations, ``b``
restricted to sample j *is* the per-sample output gradient, so one ordinary backward gives every
sample's score (``docs/DESIGN.md`` §2.2). The step's score tensor sums the partials over ``T``, or
over the token spans of each document (``docs/DESIGN.md`` §2.9): the one reduction point of every
rule.

Rules are pure tensor math: no framework objects, no communication. Adapters (Megatron,
DeepSpeed, plain PyTorch) decide where ``a``/``b`` come from, which shard of ``G`` applies,
and on which tensor-parallel ranks a rule counts.

``batch_dim`` names the sample dimension of ``a``/``b``/``ids`` (1 for Megatron's
``[s, b, h]`` layout, 0 for ``[b, s, h]``); every other dimension except the last is a token
dimension, flattened into ``T`` (for the layers here, the sequence positions the layer sees).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: Upper bound on the temporary a rule materialises per chunk of tokens, in bytes. Rules
#: split the token dimension so that peak extra memory stays bounded whatever the batch.
CHUNK_BYTES = 64 * 2**20


def _token_chunks(n_tokens: int, bytes_per_token: int) -> list[slice]:
    step = max(1, CHUNK_BYTES // max(1, bytes_per_token))
    return [slice(start, min(start + step, n_tokens)) for start in range(0, n_tokens, step)]


def _as_tokens_first(t: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """View ``t`` as ``[tokens, B, features]`` (a view when the layout allows, else a copy)."""
    t = t.movedim(batch_dim, -2)
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _compute_dtype(t: torch.Tensor, projection_dtype: torch.dtype | None) -> torch.dtype:
    if projection_dtype is not None:
        return projection_dtype
    # Half-precision activations are projected in float32: the score is a sum over
    # millions of products and must not inherit bf16 rounding.
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


@contextlib.contextmanager
def _tensor_core_gemms(enabled: bool) -> Iterator[None]:
    """Let float32 GEMMs on CUDA use TF32 tensor cores while the block runs (the caller's setting is
    restored). Used for bf16 activations promoted to float32, where this loses nothing but speed
    otherwise: a bf16 value is exact in TF32 (8 of its 11 significand bits), the float32 ``G`` is
    rounded to TF32 (at most 2^-10 relative, a quarter of bf16's own rounding of the gradient), and
    products accumulate in float32 as before. fp16 activations keep IEEE float32 GEMMs: TF32's
    rounding of ``G`` would match fp16's own precision."""
    matmul = torch.backends.cuda.matmul
    if not enabled:
        yield
        return
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    previous = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def linear_scores(
    a: torch.Tensor,
    b: torch.Tensor,
    g_weight: torch.Tensor,
    g_bias: torch.Tensor | None = None,
    *,
    batch_dim: int,
    projection_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scores of ``y = a W^T (+ bias)``.

    Args:
        a: layer input ``[..., d_in]``.
        b: gradient of the layer output ``[..., d_out]`` (same leading shape as ``a``).
        g_weight: validation gradient of ``W``, ``[K, d_out, d_in]``.
        g_bias: validation gradient of the bias ``[K, d_out]``, or None.

    Per token, ``b . (G a)`` is that token's contribution to ``<b a^T, G>`` (``[K, T, B]``); this
    costs one GEMM the size of the forward GEMM. The projection goes through whichever side of ``G`` has the
    smaller output (``K*d_out`` vs ``K*d_in``) to keep the temporary small.
    """
    k, d_out, d_in = g_weight.shape
    dtype = _compute_dtype(a, projection_dtype)
    a3 = _as_tokens_first(a, batch_dim)
    b3 = _as_tokens_first(b, batch_dim)
    n_tokens, n_samples = a3.shape[0], a3.shape[1]
    project_input = d_out <= d_in
    if project_input:
        g = g_weight.to(dtype).reshape(k * d_out, d_in).t()  # a @ g -> [.., K*d_out]
        width = k * d_out
    else:
        g = g_weight.to(dtype).permute(1, 0, 2).reshape(d_out, k * d_in)  # b @ g -> [.., K*d_in]
        width = k * d_in
    out = torch.zeros(n_tokens, n_samples, k, dtype=torch.float64, device=a.device)
    tf32 = a.is_cuda and projection_dtype is None and a.dtype == b.dtype == torch.bfloat16
    # Per token: the projection and its product with the other side, plus copies of a and b
    # where they change dtype (a bf16 output-layer gradient in float32 is vocabulary-sized).
    floats = 2 * width + (d_in if a.dtype != dtype else 0) + (d_out if b.dtype != dtype else 0)
    with _tensor_core_gemms(tf32):
        for chunk in _token_chunks(n_tokens, n_samples * floats * torch.finfo(dtype).bits // 8):
            a_c = a3[chunk].to(dtype)
            b_c = b3[chunk].to(dtype)
            if project_input:
                proj = (a_c @ g).view(-1, n_samples, k, d_out)
                out[chunk] = (proj * b_c.unsqueeze(2)).sum(dim=3, dtype=torch.float64)
            else:
                proj = (b_c @ g).view(-1, n_samples, k, d_in)
                out[chunk] = (proj * a_c.unsqueeze(2)).sum(dim=3, dtype=torch.float64)
    out = out.permute(2, 0, 1)
    if g_bias is not None:
        out = out + bias_scores(b, g_bias, batch_dim=batch_dim, projection_dtype=projection_dtype)
    return out


def bias_scores(
    b: torch.Tensor, g_bias: torch.Tensor, *, batch_dim: int, projection_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Scores of an additive bias: per token ``b . G_bias``; ``[K, T, B]``."""
    dtype = _compute_dtype(b, projection_dtype)
    return _feature_products(_as_tokens_first(b.to(dtype), batch_dim), g_bias.to(dtype))


def _feature_products(per_token: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[K, T, B]`` float64 products of per-token feature vectors ``[T, B, d]`` with ``g`` ``[K, d]``."""
    return (per_token @ g.t()).to(torch.float64).permute(2, 0, 1)


def embedding_scores(
    ids: torch.Tensor,
    b: torch.Tensor,
    g_table: torch.Tensor,
    *,
    batch_dim: int,
    row_offset: int = 0,
    projection_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scores of an embedding lookup ``y_t = E[ids_t]``.

    Args:
        ids: token ids ``[..]`` with the same leading shape as ``b`` minus its last dim.
        b: gradient of the looked-up rows ``[..., h]``.
        g_table: validation gradient of the (local shard of the) table ``[K, rows, h]``,
            holding global rows ``[row_offset, row_offset + rows)``.

    Per token, ``b_t . G[ids_t]``; ids outside the local rows contribute nothing (their rows
    live on another vocabulary shard, which adds them there).
    """
    k, rows, h = g_table.shape
    dtype = _compute_dtype(b, projection_dtype)
    ids2 = ids.movedim(batch_dim, -1).reshape(-1, ids.shape[batch_dim])  # [tokens, B]
    b3 = _as_tokens_first(b, batch_dim)
    n_tokens, n_samples = b3.shape[0], b3.shape[1]
    local = ids2 - row_offset
    in_range = (local >= 0) & (local < rows)
    local = torch.where(in_range, local, torch.zeros_like(local))
    out = torch.zeros(k, n_tokens, n_samples, dtype=torch.float64, device=b.device)
    table = g_table.to(dtype)
    # Per token: the gathered rows and their product with b, plus b's copy where it changes dtype.
    floats = 2 * k * h + (h if b.dtype != dtype else 0)
    for chunk in _token_chunks(n_tokens, n_samples * floats * torch.finfo(dtype).bits // 8):
        rows_c = table[:, local[chunk]]  # [K, c, B, h]
        b_c = b3[chunk].to(dtype) * in_range[chunk].unsqueeze(-1)
        out[:, chunk] = (rows_c * b_c.unsqueeze(0)).sum(dim=3, dtype=torch.float64)
    return out


def layer_norm_scores(
    x: torch.Tensor,
    b: torch.Tensor,
    g_weight: torch.Tensor | None,
    g_bias: torch.Tensor | None,
    *,
    eps: float,
    batch_dim: int,
    projection_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scores of ``y = x_hat * gamma + beta`` with ``x_hat = (x - mean) / sqrt(var + eps)``.

    Per token ``(b_t * x_hat_t) . G_gamma + b_t . G_beta``; ``x_hat`` is
    recomputed from the saved input (cheap, elementwise) rather than stored.
    """
    dtype = _compute_dtype(x, projection_dtype)
    x_hat = torch.nn.functional.layer_norm(x.to(dtype), x.shape[-1:], eps=eps)
    return _norm_scores(x_hat, b, g_weight, g_bias, batch_dim=batch_dim, dtype=dtype)


def rms_norm_scores(
    x: torch.Tensor,
    b: torch.Tensor,
    g_weight: torch.Tensor,
    *,
    eps: float,
    batch_dim: int,
    projection_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scores of ``y = x / rms(x) * gamma`` with ``rms(x) = sqrt(mean(x^2) + eps)``."""
    dtype = _compute_dtype(x, projection_dtype)
    x_c = x.to(dtype)
    x_hat = x_c * torch.rsqrt(x_c.pow(2).mean(-1, keepdim=True) + eps)
    return _norm_scores(x_hat, b, g_weight, None, batch_dim=batch_dim, dtype=dtype)


def scale_scores(
    x_hat: torch.Tensor,
    b: torch.Tensor,
    g_weight: torch.Tensor,
    *,
    batch_dim: int,
    projection_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scores of an elementwise scale ``y = x_hat * gamma`` over the last dimension, given ``x_hat`` as
    the layer multiplies it (for norms whose own casts decide its precision, e.g. Hugging Face's
    RMSNorm classes); computed in the dtype of ``b`` (half precision promoted to float32)."""
    dtype = _compute_dtype(b, projection_dtype)
    return _norm_scores(x_hat.to(dtype), b, g_weight, None, batch_dim=batch_dim, dtype=dtype)


def _norm_scores(
    x_hat: torch.Tensor,
    b: torch.Tensor,
    g_weight: torch.Tensor | None,
    g_bias: torch.Tensor | None,
    *,
    batch_dim: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    b_c = b.to(dtype)
    out = None
    if g_weight is not None:
        out = _feature_products(_as_tokens_first(b_c * x_hat, batch_dim), g_weight.to(dtype))
    if g_bias is not None:
        bias = bias_scores(b_c, g_bias, batch_dim=batch_dim, projection_dtype=dtype)
        out = bias if out is None else out + bias
    if out is None:
        raise ValueError("a norm without weight and bias has no parameters to score")
    return out
