"""Unmodified Hugging Face causal LMs under DeepSpeed (tiny configurations, random weights, built in
tests/hf_common.py).

* Micro-batch size 2 at DP=2: the per-layer rules, among them the built-in Hugging Face rules
  (GPT-2's ``Conv1D``, the Llama, Mistral, Qwen2 and Gemma RMSNorms, Gemma's scaled embedding), score
  Llama (tied and untied), GPT-2, Qwen2, Mistral and Gemma at ZeRO-0 and ZeRO-3, all in one launch.
* Micro-batch size 1 in one process: the microbatch-gradient path scores them, rules or not.

Every case trains two steps with gradient accumulation and scores them: step 0's scores against
brute force (one backward per sample through the same model), the efficiency and SGD identities in
every step, and the same run without scoring gives bitwise the same losses and weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_common import LR, MODELS, build, data_shape, run_hf_case
from test_deepspeed_parallel import _residuals

import oracle
from common import DEVICE, make_data
from launcher import launch

DP = 2


def _brute_force_error(name: str, raw: dict, initial: torch.nn.Module, validation: list, train: list) -> float:
    """Largest difference of step 0's scores ``{sample id: raw}`` of the whole global batch from brute
    force through ``initial``, relative to the largest brute-force score."""
    from inrun_megatron.deepspeed.model import hf_causal_lm_token_losses

    g_val = oracle.validation_gradient(initial, validation, hf_causal_lm_token_losses)
    reference = oracle.per_sample_raw(initial, train, hf_causal_lm_token_losses, g_val)
    assert sorted(raw) == sorted(reference), name
    scale = max(abs(v) for v in reference.values())
    assert len({round(v / scale, 6) for v in reference.values()}) == len(reference), f"{name}: scores not distinct"
    return max(abs(raw[sid] - reference[sid]) for sid in reference) / scale


def _check_identities(name: str, got: dict) -> str:
    assert not got["changed_by_scoring"], f"{name}: scoring changed {got['changed_by_scoring']}"
    efficiency, sgd = _residuals(got, LR)
    assert efficiency <= 1e-5, f"{name}: efficiency identity off by {efficiency:.1e}"
    assert sgd <= 1e-4, f"{name}: SGD identity off by {sgd:.1e}"
    return f"efficiency residual {efficiency:.1e}, SGD residual {sgd:.1e}, clip {got['clip']}"


@pytest.mark.slow
def test_hugging_face_models_at_micro_batch_size_2_match_brute_force(tmp_path):
    """The rules path at DP=2, micro-batch size 2, two accumulation steps, ZeRO-0 and ZeRO-3 (where each
    layer's G is gathered from both ranks' partitions inside its backward)."""
    cases = [dict(name=name, stage=stage, gas=2, mbs=2, steps=2) for name in MODELS for stage in (0, 3)]
    ranks = launch("hf_models.py", DP, tmp_path, json.dumps(cases))
    for i, case in enumerate(cases):
        label = f"{case['name']} ZeRO-{case['stage']} DP={DP} micro-batch size 2"
        assert all(rank[i]["path"] == "rules" for rank in ranks), f"{label}: scored by {ranks[0][i]['path']}"
        identities = [_check_identities(label, rank[i]) for rank in ranks]
        raw = {sid: r for rank in ranks for sid, r in rank[i]["raw"][0]["validation"].items()}
        torch.manual_seed(0)
        initial = build(case["name"]).to(DEVICE)
        tied = initial.lm_head.weight is initial.get_input_embeddings().weight
        assert tied == (case["name"] in ("llama-tied", "gpt2", "gemma")), label
        validation = make_data(data_shape(), 2, 2, seed=6, first_id=10**6)
        train = make_data(data_shape(), case["gas"] * DP, case["mbs"], seed=100, first_id=0)
        error = _brute_force_error(label, raw, initial, validation, train)
        print(f"{label}: max relative error vs brute force {error:.2e}, {identities[0]}")
        assert error <= 1e-4, f"{label}: {error:.2e} from brute force"


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("name", ["llama-tied", "llama-untied", "gpt2"])
def test_hugging_face_models_at_micro_batch_size_1_match_brute_force(deepspeed_world, name, stage):
    scored = run_hf_case(name, stage=stage, gas=3, mbs=1, steps=2, scored=True)
    plain = run_hf_case(name, stage=stage, gas=3, mbs=1, steps=2, scored=False)
    assert scored["path"] == "microbatch"
    assert (scored["initial"].lm_head.weight is scored["initial"].get_input_embeddings().weight) == (
        name != "llama-untied"
    )
    changed = [n for n, w in plain["weights"].items() if not torch.equal(w, scored["weights"][n])]
    scored["changed_by_scoring"] = changed + ([] if plain["losses"] == scored["losses"] else ["the losses"])
    label = f"{name} ZeRO-{stage} micro-batch size 1"
    identities = _check_identities(label, scored)
    raw = scored["raw"][0]["validation"]
    error = _brute_force_error(label, raw, scored["initial"], scored["validation"], scored["train"])
    print(f"{label}: max relative error vs brute force {error:.2e}, {identities}")
    assert error <= 1e-4


def test_unregistered_hugging_face_layer_is_refused_above_micro_batch_size_1(deepspeed_world):
    """OLMo 2's RMSNorm multiplies by its weight *before* casting back, unlike Llama's: no rule is
    registered for it (rules match types, never names), so micro-batches of two sequences are refused
    at attach, naming the layer and the registry."""
    import deepspeed
    import transformers
    from ds_common import ds_config

    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import hf_causal_lm_token_losses

    shape = data_shape()
    config = transformers.Olmo2Config(
        vocab_size=shape.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=shape.seq_length,
    )
    model = transformers.Olmo2ForCausalLM(config)
    config = ds_config(stage=0, gas=1, mbs=2, clip=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config)
    with pytest.raises(NotImplementedError) as refused:
        DeepSpeedScorer(engine, make_data(shape, 2, 2, seed=6, first_id=10**6), hf_causal_lm_token_losses)
    message = str(refused.value)
    assert "'model.layers.0.self_attn.q_norm'" in message and "Olmo2RMSNorm" in message, message
    assert "inrun_megatron.register_rule" in message and "micro_batch_size 1" in message, message


@pytest.mark.parametrize(("mbs", "path"), [(1, "microbatch"), (2, "rules")])
def test_entry_point_scores_a_hugging_face_model(tmp_path, mbs, path):
    """``launch/deepspeed_train.py --model hf-gpt2 --micro-batch-size N --scoring-path PATH`` in one
    process at ZeRO-3 (two accumulation steps): the microbatch-gradient path at micro-batch size 1, the
    per-layer rules (GPT-2's Conv1D among them) at 2, score every sequence of every step."""
    import sys

    import pyarrow.dataset as ds
    from test_deepspeed_launchers import _config, _run

    from inrun_megatron.records import read_manifest

    config = _config(tmp_path, "zero3.json", 2)
    run = tmp_path / "hf"
    _run(sys.executable, "launch/deepspeed_train.py", "--deepspeed_config", str(config), "--out", str(run),
         "--steps", "2", "--model", "hf-gpt2", "--micro-batch-size", str(mbs), "--scoring-path", path,
         "--num-layers", "1", "--hidden-size", "16", "--vocab-size", "64", "--seq-length", "16")  # fmt: skip
    manifest = read_manifest(run)
    assert manifest.scoring["path"] == path and manifest.scoring_path == path
    table = ds.dataset(run / "scores", format="parquet").to_table().to_pydict()
    per_step = 2 * mbs
    expected = [(step, step * per_step + i) for step in range(2) for i in range(per_step)]
    rows = {target: sorted((s, i) for s, i, t in zip(table["step"], table["sample_id"], table["target"]) if t == target)
            for target in ("validation", "validation:adam")}  # fmt: skip
    assert rows["validation"] == expected
    # AdamW: the Adam-aware rows (docs/DESIGN.md §1.5) exist from the optimizer's second step on
    assert manifest.values.default == "adam" and rows["validation:adam"] == expected[per_step:]
    assert all(r == r and r != 0.0 for r in table["raw"]), table["raw"]
