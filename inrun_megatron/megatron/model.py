"""A megatron-core GPT from plain data, plus the standard batch format and forward step.

Shared by the demo, the benchmark, the pretraining entry point and the tests, so that each
of them trains exactly the model and loss the scores are checked on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from inrun_megatron.validation import make_batch  # noqa: F401  (the batch format, re-exported)


@dataclass
class GPTShape:
    """Model shape and the few options the scorer distinguishes; megatron names where they exist."""

    num_layers: int = 2
    hidden_size: int = 32
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None
    vocab_size: int = 64
    seq_length: int = 16
    normalization: str = "LayerNorm"
    swiglu: bool = False
    add_bias_linear: bool = True
    share_embeddings_and_output_weights: bool = False
    position_embedding_type: str = "learned_absolute"
    recompute: bool = False
    params_dtype: torch.dtype = torch.float32
    dropout: float = 0.0
    init_method_std: float = 0.02
    extra_config: dict = field(default_factory=dict)


def transformer_config(shape: GPTShape, **overrides) -> TransformerConfig:
    """Megatron config for ``shape``; on a CPU-only machine with the flags the CPU shims need."""
    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization=shape.normalization,
        gated_linear_unit=shape.swiglu,
        activation_func=torch.nn.functional.silu if shape.swiglu else torch.nn.functional.gelu,
        add_bias_linear=shape.add_bias_linear,
        hidden_dropout=shape.dropout,
        attention_dropout=shape.dropout,
        init_method_std=shape.init_method_std,
        params_dtype=shape.params_dtype,
        pipeline_dtype=shape.params_dtype,
        use_cpu_initialization=on_cpu,
    )
    if on_cpu:
        kwargs.update(batch_p2p_comm=False, batch_p2p_sync=False)
    if shape.recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(shape.extra_config)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt(
    shape: GPTShape, *, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None, **config
) -> GPTModel:
    cfg = transformer_config(shape, **config)
    extra = {} if vp_stage is None else {"vp_stage": vp_stage}
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=shape.normalization),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=shape.share_embeddings_and_output_weights,
        position_embedding_type=shape.position_embedding_type,
        **extra,
    )
    if shape.params_dtype == torch.float64:
        model = model.double()
    return model


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's pretraining loss: masked sum of per-token CE and the token count (3-tuple)."""
    losses = output_tensor.to(torch.promote_types(output_tensor.dtype, torch.float32))  # fp32, or fp64 if so
    loss = (losses * loss_mask.to(losses)).sum()
    n_tokens = loss_mask.sum().to(torch.int)
    return loss, n_tokens, {"lm loss": torch.stack([loss.detach(), n_tokens.detach().float()])}


def gpt_forward_step(data_iterator, model: GPTModel):
    """Forward step for megatron's schedules; stages without data get ``data_iterator=None``."""
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:
        return model(None, None, None), functools.partial(masked_token_loss, None)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, functools.partial(masked_token_loss, batch["loss_mask"])
