"""The shape and architecture options of a decoder-only language model, as plain data.

Names follow megatron-core's ``TransformerConfig``/``GPTModel`` so that one config reads the
same for the Megatron GPT (:mod:`inrun_megatron.megatron.model`) and the plain-PyTorch model
of the DeepSpeed adapter (:mod:`inrun_megatron.deepspeed.model`). Defaults are GPT-2 style;
``LLAMA_STYLE`` holds the options that make a Llama.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LLAMA_STYLE = dict(
    normalization="RMSNorm",
    swiglu=True,
    add_bias_linear=False,
    share_embeddings_and_output_weights=True,
    position_embedding_type="rope",
)


@dataclass
class ModelShape:
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
    params_dtype: torch.dtype = torch.float32
    dropout: float = 0.0
    init_method_std: float = 0.02

    def __post_init__(self) -> None:
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization must be 'RMSNorm' or 'LayerNorm', got {self.normalization!r}")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise ValueError(
                f"position_embedding_type must be 'rope' or 'learned_absolute', got {self.position_embedding_type!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads {self.num_attention_heads}"
            )
