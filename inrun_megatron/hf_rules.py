"""Score rules of the Hugging Face ``transformers`` layers that ``torch.nn`` does not cover.

Each rule restates its layer's forward as of transformers 5.23 (the version the tests check) exactly,
casts included, because the score is the dot product of the gradient *that forward* produces
(``docs/DESIGN.md`` §2.2):

* ``Conv1D`` (GPT-2): ``y = x W + bias`` with ``W`` stored ``[d_in, d_out]``, a linear layer
  with a transposed weight.
* Llama-style RMSNorm (Llama, Mistral, Qwen2, Qwen3): ``weight * (x_hat).to(input dtype)``,
  ``x_hat`` computed in float32 from ``x.to(float32)`` with ``variance_epsilon``; the weight's
  gradient is the output gradient times ``x_hat`` *rounded to the input dtype*.
* Gemma-style RMSNorm (Gemma, Gemma 2, Gemma 3): ``(x_hat * (1 + weight.float())).type_as(x)``,
  everything in float32 with ``eps``; the gradient of ``weight`` is that of ``1 + weight``, the
  float32 output gradient times the unrounded float32 ``x_hat``.
* Gemma's scaled word embeddings: ``E[ids] * embed_scale.to(weight dtype)``.

Rules are registered by type, for the modeling modules already imported (a model holding one of
these layers has imported its module), so nothing here imports transformers or any model family.
"""

from __future__ import annotations

import sys

import torch

from inrun_megatron import rules
from inrun_megatron.sites import TORCH_SITE_BUILDERS, lookup_gradient, register_rule, unsupported_embedding


def conv1d_rule(layer: torch.nn.Module, x, grad_output, G, *, projection_dtype):
    """GPT-2's ``Conv1D``: ``torch.addmm(bias, x, W)`` with ``W`` of shape ``[d_in, d_out]``."""
    kw = dict(batch_dim=0, projection_dtype=projection_dtype)
    if "weight" in G:
        return rules.linear_scores(x, grad_output, G["weight"].transpose(1, 2), G.get("bias"), **kw)
    return rules.bias_scores(grad_output, G["bias"], **kw)


def _rms_normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x_hat`` as every transformers RMSNorm computes it: in float32, whatever ``x``'s dtype."""
    x = x.to(torch.float32)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def llama_rms_norm_rule(layer: torch.nn.Module, x, grad_output, G, *, projection_dtype):
    """``weight * x_hat.to(x.dtype)``: the weight multiplies ``x_hat`` rounded to the input dtype."""
    x_hat = _rms_normalised(x, layer.variance_epsilon).to(x.dtype)
    return rules.scale_scores(x_hat, grad_output, G["weight"], batch_dim=0, projection_dtype=projection_dtype)


def gemma_rms_norm_rule(layer: torch.nn.Module, x, grad_output, G, *, projection_dtype):
    """``(x_hat * (1 + weight.float())).type_as(x)``: the output gradient reaches the float32 product
    as float32, which multiplies the unrounded ``x_hat``."""
    x_hat = _rms_normalised(x, layer.eps)
    b = grad_output.to(torch.float32)
    return rules.scale_scores(x_hat, b, G["weight"], batch_dim=0, projection_dtype=projection_dtype)


def scaled_embedding_rule(layer: torch.nn.Embedding, ids, grad_output, G, *, projection_dtype):
    """``E[ids] * embed_scale.to(E.dtype)``: each looked-up row's gradient is the output gradient
    times the scale (a buffer, not a parameter); the ``padding_idx`` row gets none."""
    scale = layer.embed_scale.to(layer.weight.dtype)
    b = lookup_gradient(layer, ids, grad_output) * scale.to(grad_output.device)
    return rules.embedding_scores(ids, b, G["weight"], batch_dim=0, projection_dtype=projection_dtype)


_MODELS = "transformers.models."
#: (modeling module, layer class name, rule, unsupported) per layer kind.
RULES = (
    ("transformers.pytorch_utils", "Conv1D", conv1d_rule, None),
    (_MODELS + "llama.modeling_llama", "LlamaRMSNorm", llama_rms_norm_rule, None),
    (_MODELS + "mistral.modeling_mistral", "MistralRMSNorm", llama_rms_norm_rule, None),
    (_MODELS + "qwen2.modeling_qwen2", "Qwen2RMSNorm", llama_rms_norm_rule, None),
    (_MODELS + "qwen3.modeling_qwen3", "Qwen3RMSNorm", llama_rms_norm_rule, None),
    (_MODELS + "gemma.modeling_gemma", "GemmaRMSNorm", gemma_rms_norm_rule, None),
    (_MODELS + "gemma2.modeling_gemma2", "Gemma2RMSNorm", gemma_rms_norm_rule, None),
    (_MODELS + "gemma3.modeling_gemma3", "Gemma3RMSNorm", gemma_rms_norm_rule, None),
    (_MODELS + "gemma.modeling_gemma", "GemmaTextScaledWordEmbedding", scaled_embedding_rule, unsupported_embedding),
    (_MODELS + "gemma2.modeling_gemma2", "Gemma2TextScaledWordEmbedding", scaled_embedding_rule, unsupported_embedding),
    (_MODELS + "gemma3.modeling_gemma3", "Gemma3TextScaledWordEmbedding", scaled_embedding_rule, unsupported_embedding),
)  # fmt: skip


def register_loaded() -> None:
    """Register the rules of every modeling module imported so far, for the classes that have no rule
    yet: a rule the user registered for one of them, before or after, is never replaced."""
    for module_name, class_name, rule, unsupported in RULES:
        layer_type = getattr(sys.modules.get(module_name), class_name, None)  # older releases lack some
        if layer_type is not None and layer_type not in TORCH_SITE_BUILDERS:
            register_rule(layer_type, unsupported=unsupported)(rule)
