"""Unmodified Hugging Face causal LMs under DeepSpeed, shared by the single-process tests and the
data-parallel worker: tiny configurations with random weights (nothing is downloaded), the same
data and loop as :mod:`ds_common`.

Step ``t`` trains on the ``gas * dp`` micro-batches ``make_data(..., seed=100 + t)``; data-parallel
rank ``r`` takes micro-batches ``r, r + dp, ...``.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import transformers
from ds_common import ds_config, train

from common import DEVICE, make_data

LR = 0.5
MODELS = ["llama-tied", "llama-untied", "gpt2", "qwen2", "mistral", "gemma"]


def data_shape():
    """Only its vocabulary size and sequence length are used: the data of the other DeepSpeed tests."""
    from inrun_megatron.deepspeed.model import llama_shape

    return llama_shape()


def build(name: str) -> torch.nn.Module:
    """A two-layer model of family ``name`` with hidden size 16 and grouped-query attention where the
    family has it; GPT-2, ``llama-tied`` and Gemma tie the output layer to the embedding."""
    shape = data_shape()
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=shape.vocab_size,
            n_embd=16,
            n_layer=2,
            n_head=4,
            n_positions=shape.seq_length,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return transformers.GPT2LMHeadModel(config)
    family = name.split("-")[0]
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q/k/v biases
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),  # 1 + weight norms, scaled embedding
    }[family]
    config = config_class(
        vocab_size=shape.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=shape.seq_length,
        tie_word_embeddings=name in ("llama-tied", "gemma"),
    )
    model = model_class(config)
    if family == "gemma":  # its norm weights start at 0 (scale 1 + 0); make them matter
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, GemmaRMSNorm):
                    module.weight.normal_(std=0.5)
    return model


def run_hf_case(name: str, *, stage: int, gas: int, mbs: int, steps: int, scored: bool, path: str = "auto") -> dict:
    """``steps`` steps of ``name`` in a DeepSpeed engine on the current world (plain SGD, clipping at
    1.0), scored or not; ``initial``: the model before training (the brute-force reference's)."""
    import deepspeed

    from inrun_megatron import ScoringConfig
    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import hf_causal_lm_token_losses
    from inrun_megatron.deepspeed.scorer import masked_token_mean

    dp, rank = dist.get_world_size(), dist.get_rank()
    shape = data_shape()
    torch.manual_seed(0)
    model = build(name)
    initial = copy.deepcopy(model).to(DEVICE)
    config = ds_config(stage=stage, gas=gas, mbs=mbs, clip=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    in_memory = ScoringConfig(accumulate_values=True, path=path)  # train() reads scorer.values()
    scorer = DeepSpeedScorer(engine, validation, hf_causal_lm_token_losses, in_memory) if scored else None

    def global_batch(step: int) -> list:
        return make_data(shape, gas * dp, mbs, seed=100 + step, first_id=1000 * step)

    out = train(
        engine, scorer, lambda step: global_batch(step)[rank::dp], steps, masked_token_mean(hf_causal_lm_token_losses)
    )
    out.update(initial=initial, validation=validation, train=global_batch(0))
    return out
