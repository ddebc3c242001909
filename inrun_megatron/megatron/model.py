"""A megatron-core GPT from plain data, plus the standard batch format and forward step.

Shared by the demo, the benchmark, the pretraining entry point and the tests, so that each
of them trains exactly the model and loss the scores are checked on.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from inrun_megatron.model_shape import ModelShape
from inrun_megatron.validation import (
    make_batch,  # noqa: F401  (the batch format, re-exported)
    masked_loss_sum,
)


@dataclass
class GPTShape(ModelShape):
    """A :class:`~inrun_megatron.model_shape.ModelShape` plus megatron-only options."""

    recompute: bool = False
    extra_config: dict = field(default_factory=dict)  # further TransformerConfig fields


def transformer_config(shape: GPTShape, **overrides) -> TransformerConfig:
    """Megatron config for ``shape`` at the initialised parallel layout; on a CPU-only machine
    with the flags the CPU shims need. Activations travel between pipeline stages in the
    compute dtype (bf16/fp16 with megatron's mixed precision, else the parameter dtype)."""
    on_cpu = not torch.cuda.is_available()
    options = {**shape.extra_config, **overrides}
    compute_dtype = torch.bfloat16 if options.get("bf16") else torch.float16 if options.get("fp16") else None
    kwargs = {}
    if parallel_state.model_parallel_is_initialized():
        kwargs.update(
            tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
            pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
            virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        )
    kwargs.update(
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
        pipeline_dtype=compute_dtype or shape.params_dtype,
        use_cpu_initialization=on_cpu,
    )
    if on_cpu:
        kwargs.update(batch_p2p_comm=False, batch_p2p_sync=False)
    if shape.recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(options)
    return TransformerConfig(**kwargs)


class TorchNorm:
    """A torch ``LayerNorm``/``RMSNorm`` for megatron layer specs that also works under sequence
    parallelism, without apex or Transformer Engine.

    megatron's own torch norm (``WrappedTorchNorm``, the local spec's norm without apex) refuses
    ``sequence_parallel``. Under sequence parallelism each tensor-parallel rank normalises its
    own slice of the sequence, so its weight gradient is a partial sum; megatron's apex and TE
    norms tag their weights ``sequence_parallel`` so that ``finalize_model_grads`` sums those
    partials over TP. This does the same for the torch norms.
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("TorchNorm supports neither zero-centered gamma nor persistent/memory-efficient norms")
        norm_types = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norm_types:
            raise ValueError(f"TorchNorm supports {sorted(norm_types)}, not {config.normalization!r}")
        norm = norm_types[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def gpt_layer_spec(config: TransformerConfig, vp_stage: int | None = None) -> ModuleSpec | TransformerBlockSubmodules:
    """megatron's local GPT spec; under sequence parallelism with :class:`TorchNorm` for every norm
    (the layers' and the final one), which the stock local spec cannot provide without apex."""
    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    if not config.sequence_parallel:
        return spec
    layer = ModuleSpec(
        module=spec.module,
        params=spec.params,
        submodules=dataclasses.replace(spec.submodules, input_layernorm=TorchNorm, pre_mlp_layernorm=TorchNorm),
    )
    n_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n_layers, layer_norm=TorchNorm)


def build_gpt(
    shape: GPTShape, *, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None, **config
) -> GPTModel:
    cfg = transformer_config(shape, **config)
    extra = {} if vp_stage is None else {"vp_stage": vp_stage}
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=gpt_layer_spec(cfg, vp_stage),
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
    if torch.cuda.is_available():  # as megatron's get_model: torch norms and position embeddings start on the CPU
        model.cuda(torch.cuda.current_device())
    return model


def build_gpt_chunks(shape: GPTShape, **config) -> list[GPTModel]:
    """This rank's model chunks at the initialised pipeline layout: one per virtual stage."""
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None:
        first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        return [build_gpt(shape, pre_process=first, post_process=last, **config)]
    return [
        build_gpt(
            shape,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i),
            vp_stage=i,
            **config,
        )
        for i in range(vpp)
    ]


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's pretraining loss: masked sum of per-token CE and the token count (3-tuple)."""
    loss = masked_loss_sum(output_tensor, loss_mask, source="the model (GPTModel called with labels)")
    n_tokens = loss_mask.sum().to(torch.int)
    return loss, n_tokens, {"lm loss": torch.stack([loss.detach(), n_tokens.detach().float()])}


def gpt_forward_step(data_iterator, model: GPTModel):
    """Forward step for megatron's schedules; stages without data get ``data_iterator=None``."""
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:
        return model(None, None, None), functools.partial(masked_token_loss, None)
    # megatron's reset attention mask when the batch has one (docs/DESIGN.md §2.9), else causal
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, functools.partial(masked_token_loss, batch["loss_mask"])
