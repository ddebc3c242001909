"""Per-layer score rules against per-token gradients materialised by autograd: a rule returns each
token position's part of every sample's score (``[K, T, B]``, docs/DESIGN.md §2.2, §2.9)."""

from __future__ import annotations

import pytest
import torch

from inrun_megatron import rules

K = 2  # validation targets


def _per_token_grads(y, upstream, params, batch_dim=0):
    """``[T][B][param]`` gradients of each token's term ``<y_t, upstream_t>`` of each sample, one autograd
    call per token (the brute-force definition; their sum over tokens is the sample's gradient)."""
    y, upstream = y.movedim(batch_dim, 0), upstream.movedim(batch_dim, 0)
    n_samples, n_tokens = y.shape[:2]
    return [
        [
            [
                torch.zeros_like(p) if g is None else g
                for g, p in zip(
                    torch.autograd.grad((y[j, t] * upstream[j, t]).sum(), params, retain_graph=True, allow_unused=True),
                    params,
                )
            ]
            for j in range(n_samples)
        ]
        for t in range(n_tokens)
    ]


def _reference(grads_per_token, g_targets):
    """``[K, T, B]``: <per-token grad, G_k> summed over parameters."""
    return torch.tensor(
        [
            [
                [sum(float((g * G[k]).sum()) for g, G in zip(grads, g_targets)) for grads in per_sample]
                for per_sample in grads_per_token
            ]
            for k in range(K)
        ],
        dtype=torch.float64,
    )


def _layout(t, batch_dim):
    """Move the sample dim of a ``[B, T, d]`` tensor to ``batch_dim``."""
    return t if batch_dim == 0 else t.transpose(0, 1)


@pytest.mark.parametrize("batch_dim", [0, 1])
@pytest.mark.parametrize(("d_in", "d_out"), [(6, 4), (4, 7)])  # both projection sides
@pytest.mark.parametrize("bias", [False, True])
def test_linear(batch_dim, d_in, d_out, bias, monkeypatch):
    monkeypatch.setattr(rules, "CHUNK_BYTES", 64)  # force several token chunks
    g = torch.Generator().manual_seed(0)
    B, T = 3, 5
    x = torch.randn(B, T, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    bvec = torch.randn(d_out, generator=g, dtype=torch.float64, requires_grad=True)
    y = x @ w.t() + (bvec if bias else 0)
    upstream = torch.randn(B, T, d_out, generator=g, dtype=torch.float64)
    params = [w, bvec] if bias else [w]
    grads = _per_token_grads(y, upstream, params)
    G = [torch.randn(K, *p.shape, generator=g, dtype=torch.float64) for p in params]
    got = rules.linear_scores(
        _layout(x, batch_dim), _layout(upstream, batch_dim), G[0], G[1] if bias else None, batch_dim=batch_dim
    )
    torch.testing.assert_close(got, _reference(grads, G), rtol=1e-12, atol=1e-12)


def test_linear_half_precision_is_projected_in_float32():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 16, generator=g).bfloat16()
    upstream = torch.randn(2, 8, 12, generator=g).bfloat16()
    G = torch.randn(K, 12, 16, generator=g)
    got = rules.linear_scores(x, upstream, G, batch_dim=0)
    exact = torch.einsum("btd,bto,kod->ktb", x.double(), upstream.double(), G.double())
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-6)


def test_tensor_core_gemms_restore_the_callers_matmul_precision():
    """The TF32 switch for bf16 score GEMMs is local: whatever the caller set comes back, and a
    disabled switch touches nothing."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with rules._tensor_core_gemms(True):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    matmul.fp32_precision = "ieee"
    try:
        with rules._tensor_core_gemms(False):
            assert matmul.fp32_precision == "ieee"
        with rules._tensor_core_gemms(True):
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before


@pytest.mark.parametrize("row_offset", [0, 5])  # a vocabulary shard holding rows [5, 15)
def test_embedding(row_offset, monkeypatch):
    monkeypatch.setattr(rules, "CHUNK_BYTES", 64)
    g = torch.Generator().manual_seed(2)
    B, T, V, h = 3, 6, 20, 4
    ids = torch.randint(0, V, (B, T), generator=g)
    table = torch.randn(V, h, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(B, T, h, generator=g, dtype=torch.float64)
    out = table[ids]
    grads = _per_token_grads(out, upstream, [table])
    G_full = torch.randn(K, V, h, generator=g, dtype=torch.float64)
    rows = 10 if row_offset else V
    G_local = G_full[:, row_offset : row_offset + rows]
    got = rules.embedding_scores(ids, upstream, G_local, batch_dim=0, row_offset=row_offset)
    G_masked = torch.zeros_like(G_full)
    G_masked[:, row_offset : row_offset + rows] = G_local  # only local rows count on this shard
    torch.testing.assert_close(got, _reference(grads, [G_masked]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["layer_norm", "layer_norm_no_bias", "rms_norm"])
def test_norms(kind):
    g = torch.Generator().manual_seed(3)
    T, B, h = 5, 3, 8  # megatron layout: batch_dim=1
    x = torch.randn(T, B, h, generator=g, dtype=torch.float64)
    gamma = (1 + 0.1 * torch.randn(h, generator=g, dtype=torch.float64)).requires_grad_()
    beta = torch.randn(h, generator=g, dtype=torch.float64, requires_grad=True)
    eps = 1e-5
    if kind == "rms_norm":
        y = torch.nn.functional.rms_norm(x, (h,), gamma, eps)
        params = [gamma]
    else:
        with_bias = kind == "layer_norm"
        y = torch.nn.functional.layer_norm(x, (h,), gamma, beta if with_bias else None, eps)
        params = [gamma, beta] if with_bias else [gamma]
    upstream = torch.randn(T, B, h, generator=g, dtype=torch.float64)
    grads = _per_token_grads(y, upstream, params, batch_dim=1)
    G = [torch.randn(K, h, generator=g, dtype=torch.float64) for _ in params]
    if kind == "rms_norm":
        got = rules.rms_norm_scores(x, upstream, G[0], eps=eps, batch_dim=1)
    else:
        got = rules.layer_norm_scores(x, upstream, G[0], G[1] if len(G) > 1 else None, eps=eps, batch_dim=1)
    torch.testing.assert_close(got, _reference(grads, G), rtol=1e-12, atol=1e-12)


def _hugging_face_layer(class_name: str, dtype: torch.dtype, g: torch.Generator) -> torch.nn.Module:
    """A Hugging Face layer with random parameters of ``dtype`` (its module imported, its rules registered)."""
    import importlib

    from inrun_megatron import hf_rules

    module_name = next(m for m, c, *_ in hf_rules.RULES if c == class_name)
    cls = getattr(importlib.import_module(module_name), class_name)
    if class_name == "Conv1D":
        layer = cls(7, 5)  # 5 -> 7 features
    elif class_name.endswith("ScaledWordEmbedding"):
        layer = cls(20, 8, padding_idx=0, embed_scale=8**0.5)
    else:
        layer = cls(8, eps=1e-6)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return layer.to(dtype)


HF_NORMS = ["LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"]
HF_NORMS += ["GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"]
HF_LAYERS = ["Conv1D", *HF_NORMS, "GemmaTextScaledWordEmbedding", "Gemma2TextScaledWordEmbedding"]
HF_LAYERS += ["Gemma3TextScaledWordEmbedding"]


@pytest.mark.parametrize(
    ("class_name", "input_dtype"),
    [pytest.param(c, torch.float64, id=f"{c}-float64") for c in HF_LAYERS]
    + [pytest.param(c, torch.bfloat16, id=f"{c}-bf16") for c in HF_NORMS],
)
def test_hugging_face_layer_rules(class_name, input_dtype):
    """Each built-in Hugging Face rule against per-sample autograd through the real layer.

    bf16 inputs to norms with float32 weights (mixed precision) tell the casts apart: Llama-style
    norms multiply the weight by x_hat *rounded to bf16*, Gemma's by the float32 x_hat; the wrong one
    is off by about 1e-3. Tolerances are those of the arithmetic the layer itself runs: float64 layers
    are exact to 1e-12, except Gemma's norm, which computes in float32 whatever its input."""
    from inrun_megatron import hf_rules

    g = torch.Generator().manual_seed(4)
    layer = _hugging_face_layer(class_name, torch.float64 if input_dtype == torch.float64 else torch.float32, g)
    B, T = 3, 5
    if class_name.endswith("Embedding"):
        x = torch.randint(0, 20, (B, T), generator=g)
        x[:, ::2] = 0  # the padding row: no gradient, but (as with a tied output layer) a validation gradient
    else:
        x = torch.randn(B, T, 5 if class_name == "Conv1D" else 8, generator=g, dtype=torch.float64).to(input_dtype)
    y = layer(x)
    upstream = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    named = dict(layer.named_parameters())
    grads = _per_token_grads(y, upstream, list(named.values()))
    G = {n: torch.randn(K, *p.shape, generator=g, dtype=p.dtype) for n, p in named.items()}
    rule = next(r for _, c, r, _ in hf_rules.RULES if c == class_name)
    got = rule(layer, x, upstream, G, projection_dtype=None)
    expected = _reference(grads, list(G.values()))
    gemma_norm = class_name.startswith("Gemma") and class_name.endswith("RMSNorm")
    float64_arithmetic = input_dtype == torch.float64 and not gemma_norm
    tolerance = (1e-12 if float64_arithmetic else 1e-5) * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)


def test_registered_embedding_rule_skips_the_padding_row():
    """``nn.Embedding(padding_idx=...)``'s registered rule: the padding row gets no gradient from the
    lookup even where its validation gradient is not zero (an output layer tied to the table)."""
    from inrun_megatron.sites import embedding_rule

    g = torch.Generator().manual_seed(5)
    layer = torch.nn.Embedding(20, 4, padding_idx=3).double()
    ids = torch.randint(0, 20, (3, 6), generator=g)
    ids[:, 1::2] = 3
    y = layer(ids)
    upstream = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = _per_token_grads(y, upstream, [layer.weight])
    G = torch.randn(K, 20, 4, generator=g, dtype=torch.float64)
    got = embedding_rule(layer, ids, upstream, {"weight": G}, projection_dtype=None)
    torch.testing.assert_close(got, _reference(grads, [G]), rtol=1e-12, atol=1e-12)


def test_built_in_hugging_face_rules_never_replace_a_users_rule(monkeypatch):
    """Registering the built-in Hugging Face rules (at every attach) keeps a rule the user registered
    for one of those classes; ``register_rule`` takes module types only."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from inrun_megatron import register_rule
    from inrun_megatron.hf_rules import registered_builders
    from inrun_megatron.sites import TORCH_SITE_BUILDERS

    built_in = registered_builders()[LlamaRMSNorm]
    monkeypatch.setitem(TORCH_SITE_BUILDERS, LlamaRMSNorm, built_in)  # restored after the test
    register_rule(LlamaRMSNorm)(lambda layer, x, grad_output, G, *, projection_dtype: None)
    users = TORCH_SITE_BUILDERS[LlamaRMSNorm]
    assert users is not built_in and registered_builders()[LlamaRMSNorm] is users
    with pytest.raises(TypeError, match=r"torch\.nn\.Module subclasses"):
        register_rule("LlamaRMSNorm")
