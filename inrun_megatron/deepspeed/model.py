"""A Llama/GPT-style language model in plain PyTorch, plus its per-token losses.

Built only from the layers the DeepSpeed adapter scores without Megatron (``nn.Linear``,
``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``), with the output projection optionally tied
to the token embedding (one ``Parameter`` shared by both modules, as Hugging Face models do).
Shared by the DeepSpeed entry point and the tests, so that both train exactly the model the
scores are checked on. Batches use the standard format of :func:`inrun_megatron.validation.make_batch`;
:func:`hf_causal_lm_token_losses` reads the same batches into Hugging Face causal LMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inrun_megatron.model_shape import LLAMA_STYLE, ModelShape
from inrun_megatron.token_losses import hf_causal_lm_token_losses as hf_causal_lm_token_losses
from inrun_megatron.token_losses import token_cross_entropy


def llama_shape(**overrides) -> ModelShape:
    """A Llama-style :class:`ModelShape` (RMSNorm, SwiGLU, no biases, rotary positions, tied output)."""
    return ModelShape(**{**LLAMA_STYLE, **overrides})


def _norm(shape: ModelShape) -> nn.Module:
    if shape.normalization == "RMSNorm":
        return nn.RMSNorm(shape.hidden_size, eps=1e-5)
    return nn.LayerNorm(shape.hidden_size, eps=1e-5)


def _rotate(x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x [b, heads, s, d]`` at ``position_ids [b, s]``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d))
    angles = (position_ids.to(torch.float64).unsqueeze(-1) * inv_freq).unsqueeze(1)  # [b, 1, s, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.heads = shape.num_attention_heads
        self.rope = shape.position_embedding_type == "rope"
        self.dropout = shape.dropout
        self.qkv = nn.Linear(shape.hidden_size, 3 * shape.hidden_size, bias=shape.add_bias_linear)
        self.proj = nn.Linear(shape.hidden_size, shape.hidden_size, bias=shape.add_bias_linear)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = _rotate(q, position_ids), _rotate(k, position_ids)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(b, s, h))


class MLP(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        ffn = shape.ffn_hidden_size or 4 * shape.hidden_size
        self.swiglu = shape.swiglu
        self.fc1 = nn.Linear(shape.hidden_size, (2 if shape.swiglu else 1) * ffn, bias=shape.add_bias_linear)
        self.fc2 = nn.Linear(ffn, shape.hidden_size, bias=shape.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.attention_norm = _norm(shape)
        self.attention = Attention(shape)
        self.mlp_norm = _norm(shape)
        self.mlp = MLP(shape)
        self.dropout = nn.Dropout(shape.dropout)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), position_ids))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class TransformerLM(nn.Module):
    """Decoder-only LM: ``forward(tokens [b, s], position_ids [b, s]) -> logits [b, s, vocab]``."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.vocab_size = shape.vocab_size
        self.embedding = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.position_embedding = (
            nn.Embedding(shape.seq_length, shape.hidden_size)
            if shape.position_embedding_type == "learned_absolute"
            else None
        )
        self.embedding_dropout = nn.Dropout(shape.dropout)
        self.layers = nn.ModuleList(Block(shape) for _ in range(shape.num_layers))
        self.final_norm = _norm(shape)
        self.output_layer = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.share_embeddings_and_output_weights:
            self.output_layer.weight = self.embedding.weight
        self.init_method_std = shape.init_method_std
        self.init_weights()
        self.to(shape.params_dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Weights ~ N(0, init_method_std), biases 0, norm weights 1.

        Built under ``deepspeed.zero.Init`` the parameters are already partitioned when this runs in
        ``__init__``; call it again inside ``deepspeed.zero.GatheredParameters(list(model.parameters()),
        modifier_rank=0)`` to give the model the same weights as without ZeRO-3.
        """
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=self.init_method_std)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(position_ids)
        x = self.embedding_dropout(x)
        for layer in self.layers:
            x = layer(x, position_ids)
        return self.output_layer(self.final_norm(x))


def lm_token_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token next-token cross-entropy ``[b, s]`` of :class:`TransformerLM` (float32, float64
    for a float64 model). ``model`` may be the bare module or the DeepSpeed engine wrapping it."""
    return token_cross_entropy(model(batch["tokens"], batch["position_ids"]), batch["labels"])
