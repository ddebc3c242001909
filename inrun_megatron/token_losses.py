"""Per-token losses of causal language models (framework independent).

Every adapter's validation loss is the masked mean of a ``token_losses(model, batch) -> [b, s]``
function over the validation set (``docs/DESIGN.md`` §2.1); these are the ones the library ships for
models that return logits. Batches use the format of :func:`inrun_megatron.validation.make_batch`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``[b, s]`` of ``logits [b, s, vocab]`` against already shifted
    ``labels [b, s]``, in float32 (float64 for float64 logits)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none").view_as(labels)


def hf_causal_lm_token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token cross-entropy ``[b, s]`` of a Hugging Face causal LM (``LlamaForCausalLM``,
    ``GPT2LMHeadModel``, any ``AutoModelForCausalLM``), bare or wrapped (a DeepSpeed engine, DDP).

    The model gets no ``labels``: it would shift them once more and return only their mean, while
    the batch format's labels are already the next tokens and scoring needs every token's loss.
    """
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], use_cache=False)
    return token_cross_entropy(output.logits, batch["labels"])
