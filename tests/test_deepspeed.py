"""DeepSpeed adapter in one process: per-sample scores against brute force at every ZeRO stage,
identities, mixed precision, and what is refused (DESIGN §1, §4)."""

from __future__ import annotations

import pytest
import torch
from ds_common import ds_config

import oracle
from common import make_data

MODELS = {
    # Llama: RMSNorm, SwiGLU, no biases, rotary positions, output projection tied to the embedding.
    "llama-tied": dict(),
    # GPT-2: LayerNorm, GELU, biases, learned positions (a second nn.Embedding), untied output.
    "gpt-untied": dict(
        normalization="LayerNorm",
        swiglu=False,
        add_bias_linear=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="learned_absolute",
    ),
}


def _engine(shape, *, stage: int, gas: int, mbs: int = 2, clip: float = 0.0, dtype: str = "fp32", seed: int = 0):
    import deepspeed

    from inrun_megatron.deepspeed.model import TransformerLM

    torch.manual_seed(seed)
    model = TransformerLM(shape)
    config = ds_config(stage=stage, gas=gas, mbs=mbs, clip=clip, dtype=dtype)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    return engine


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_scores_match_brute_force(deepspeed_world, stage, model):
    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import LMShape, TransformerLM, lm_token_losses

    shape = LMShape(**MODELS[model])
    engine = _engine(shape, stage=stage, gas=3)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    train = make_data(shape, 3, 2, seed=5)
    scorer = DeepSpeedScorer(engine, validation, lm_token_losses)
    scorer.forward_backward(train)
    stored = {name: scorer.grads[p][0].clone() for name, p in engine.module.named_parameters()}
    engine.step()
    records = scorer.end_step(lr=1.0)
    ours = dict(zip(records.columns["sample_id"].tolist(), records.columns["raw"].tolist()))
    scorer.detach()

    # The reference: the same initial weights in a plain module, one backward per sample.
    torch.manual_seed(0)
    reference_model = TransformerLM(shape)
    g_val = oracle.validation_gradient(reference_model, validation, lm_token_losses)
    for name, g in g_val.items():
        assert torch.allclose(stored[name], g, rtol=0, atol=1e-5 * float(g.abs().max())), name
    reference = oracle.per_sample_raw(reference_model, train, lm_token_losses, g_val)
    assert sorted(ours) == sorted(reference)
    scale = max(abs(v) for v in reference.values())
    errors = {sid: abs(ours[sid] - reference[sid]) / scale for sid in reference}
    assert max(errors.values()) <= 1e-4, errors
    assert len({round(v / scale, 6) for v in reference.values()}) == len(reference)
