"""Unmodified Hugging Face causal LMs under DeepSpeed at micro-batch size 1: the microbatch-gradient
path scores modules no per-layer rule covers (GPT-2's ``Conv1D``, Llama's ``LlamaRMSNorm``) exactly.

Tiny configurations built here with random weights (nothing is downloaded). Each case trains two
steps with gradient accumulation and scores them: step 0's scores against brute force (one backward
per sample through the same model), the efficiency and SGD identities in every step, and the same
run without scoring gives bitwise the same losses and weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from ds_common import ds_config, train

import oracle
from common import DEVICE, make_data

GAS = 3
STEPS = 2
LR = 0.5


def _shape():
    from inrun_megatron.deepspeed.model import llama_shape

    return llama_shape()  # only its vocabulary size and sequence length: the data of the other tests


def _build(name: str) -> torch.nn.Module:
    shape = _shape()
    if name.startswith("llama"):
        config = transformers.LlamaConfig(
            vocab_size=shape.vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention
            max_position_embeddings=shape.seq_length,
            tie_word_embeddings=name == "llama-tied",
        )
        return transformers.LlamaForCausalLM(config)
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


def _run(name: str, *, stage: int, scored: bool) -> dict:
    """Two steps of ``name`` in a DeepSpeed engine (plain SGD, clipping at 1.0); the initial model
    is kept as ``initial`` for the reference."""
    import deepspeed

    from inrun_megatron import ScoringConfig
    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import hf_causal_lm_token_losses
    from inrun_megatron.deepspeed.scorer import masked_token_mean

    shape = _shape()
    torch.manual_seed(0)
    model = _build(name)
    initial = copy.deepcopy(model).to(DEVICE)
    config = ds_config(stage=stage, gas=GAS, mbs=1, clip=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    in_memory = ScoringConfig(accumulate_values=True)  # train() reads scorer.values()
    scorer = DeepSpeedScorer(engine, validation, hf_causal_lm_token_losses, in_memory) if scored else None

    def batches_of_step(step: int) -> list:
        return make_data(shape, GAS, 1, seed=100 + step, first_id=1000 * step)

    out = train(engine, scorer, batches_of_step, STEPS, masked_token_mean(hf_causal_lm_token_losses))
    out.update(initial=initial, validation=validation, train=batches_of_step(0))
    return out


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("name", ["llama-tied", "llama-untied", "gpt2"])
def test_hugging_face_models_match_brute_force(deepspeed_world, name, stage):
    from inrun_megatron.deepspeed.model import hf_causal_lm_token_losses

    scored = _run(name, stage=stage, scored=True)
    plain = _run(name, stage=stage, scored=False)
    assert scored["path"] == "microbatch"
    assert (scored["initial"].lm_head.weight is scored["initial"].get_input_embeddings().weight) == (
        name != "llama-untied"
    )
    changed = [n for n, w in plain["weights"].items() if not torch.equal(w, scored["weights"][n])]
    assert not changed and plain["losses"] == scored["losses"], f"scoring changed {changed or 'the losses'}"

    reference_model = scored["initial"]
    g_val = oracle.validation_gradient(reference_model, scored["validation"], hf_causal_lm_token_losses)
    reference = oracle.per_sample_raw(reference_model, scored["train"], hf_causal_lm_token_losses, g_val)
    ours = scored["raw"][0]["validation"]
    assert sorted(ours) == sorted(reference)
    scale = max(abs(v) for v in reference.values())
    assert len({round(v / scale, 6) for v in reference.values()}) == len(reference)
    error = max(abs(ours[sid] - reference[sid]) for sid in reference) / scale
    efficiency = max(abs(t - d) / a for (t, d), a in zip(scored["efficiency"], scored["abs_raw"]))
    sgd = max(abs(t - d) / (LR * c * a) for (t, d), c, a in zip(scored["sgd"], scored["clip"], scored["abs_raw"]))
    print(
        f"{name} ZeRO-{stage}: max relative error vs brute force {error:.2e}, efficiency residual"
        f" {efficiency:.1e}, SGD residual {sgd:.1e}, clip {scored['clip']}"
    )
    assert error <= 1e-4
    assert efficiency <= 1e-5 and sgd <= 1e-4


def test_hugging_face_model_is_refused_above_micro_batch_size_1(deepspeed_world):
    """GPT-2's Conv1D has no per-layer rule: micro-batches of two sequences cannot be scored."""
    import deepspeed

    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import hf_causal_lm_token_losses

    model = _build("gpt2")
    config = ds_config(stage=0, gas=1, mbs=2, clip=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config)
    with pytest.raises(NotImplementedError) as refused:
        DeepSpeedScorer(engine, make_data(_shape(), 2, 2, seed=6, first_id=10**6), hf_causal_lm_token_losses)
    message = str(refused.value)
    assert "'transformer.h.0.attn.c_attn'" in message and "Conv1D" in message, message
    assert "micro_batch_size 1" in message, message


def test_entry_point_scores_a_hugging_face_model(tmp_path):
    """``launch/deepspeed_train.py --model hf-gpt2 --micro-batch-size 1 --scoring-path microbatch`` in
    one process at ZeRO-3: the microbatch-gradient path scores every sequence of every step."""
    import sys

    import pyarrow.dataset as ds
    from test_deepspeed_launchers import _config, _run

    from inrun_megatron.records import read_manifest

    config = _config(tmp_path, "zero3.json", 2)
    run = tmp_path / "hf"
    _run(sys.executable, "launch/deepspeed_train.py", "--deepspeed_config", str(config), "--out", str(run),
         "--steps", "2", "--model", "hf-gpt2", "--micro-batch-size", "1", "--scoring-path", "microbatch",
         "--num-layers", "1", "--hidden-size", "16", "--vocab-size", "64", "--seq-length", "16")  # fmt: skip
    manifest = read_manifest(run)
    assert manifest.scoring["path"] == "microbatch" and manifest.scoring_path == "microbatch"
    table = ds.dataset(run / "scores", format="parquet").to_table().to_pydict()
    assert sorted(zip(table["step"], table["sample_id"])) == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert all(r == r and r != 0.0 for r in table["raw"]), table["raw"]
