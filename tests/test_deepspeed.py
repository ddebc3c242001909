"""DeepSpeed adapter in one process: per-sample scores against brute force at every ZeRO stage,
identities, mixed precision, and what is refused (docs/DESIGN.md §1, §4)."""

from __future__ import annotations

import pytest
import torch
from ds_common import ds_config, run_deepspeed_case

import oracle
from common import DEVICE, make_data

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


#: Scores of fp32 runs are exact to 1e-4 (docs/DESIGN.md §1.3). Half-precision runs compute activations
#: and gradients in bf16/fp16, so they match the exact scores of the same (rounded) weights only to
#: about the format's precision (bf16: 2^-8, fp16: 2^-11) relative to the largest score.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
PRECISION_CASES = [
    ("llama-tied", 0, "bf16"),
    ("llama-tied", 3, "bf16"),
    ("gpt-untied", 2, "fp16"),
    ("llama-tied", 3, "fp16"),
]


def _validation_sets(model: str, shape) -> dict:
    """The GPT cases score two validation sets at once."""
    validation = {"validation": make_data(shape, 2, 2, seed=6, first_id=10**6)}
    if model == "gpt-untied":
        validation["held-out"] = make_data(shape, 1, 3, seed=7, first_id=2 * 10**6)
    return validation


def _score_one_step(shape, validation: dict, train: list, *, stage: int, dtype: str, path: str = "auto") -> dict:
    """One scored step of ``train`` (one micro-batch per accumulation step) from seed-0 weights.

    Returns the step's record ``columns``, the stored ``G`` by parameter name and target, the
    paths that scored the micro-steps (``scorer.scoring`` while each ran), and per target the
    efficiency identity's two sides (sum of raw, ``<g, G>`` from DeepSpeed's full gradient).
    """
    from deepspeed.utils import safe_get_full_grad
    from ds_common import batch_dot

    from inrun_megatron import ScoringConfig
    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import lm_token_losses
    from inrun_megatron.deepspeed.scorer import masked_token_mean

    engine = _engine(shape, stage=stage, gas=len(train), mbs=len(train[0]["sample_ids"]), dtype=dtype)
    scorer = DeepSpeedScorer(engine, validation, lm_token_losses, ScoringConfig(path=path, accumulate_values=True))
    training_loss, scored_by = masked_token_mean(lm_token_losses), set()

    def loss_fn(model, batch):
        scored_by.add(scorer.scoring)
        return training_loss(model, batch)

    scorer.forward_backward(train, loss_fn)
    stored = {name: scorer.grads[p].clone() for name, p in engine.module.named_parameters()}
    if stage == 3:  # the microbatch path dots each gathered G as a flat view, never a copy
        for p in engine.module.parameters():
            gathered = scorer.grads[p]
            assert gathered.reshape(len(validation), -1).data_ptr() == gathered.data_ptr()
    loss_scale = float(engine.optimizer.loss_scale) if engine.fp16_enabled() else 1.0
    g = {p: safe_get_full_grad(p).double() / loss_scale for p in scorer.grads.params()}
    dots = [batch_dot(scorer, g, k)[0] for k in range(len(validation))]
    engine.step()
    c = scorer.end_step(lr=1.0).records.columns
    scorer.detach()
    efficiency = {t: (float(c["raw"][c["target"] == t].sum()), dot) for t, dot in zip(validation, dots)}
    return dict(columns=c, G=stored, scored_by=scored_by, efficiency=efficiency)


def _brute_force(shape, validation: dict, train: list, dtype: str) -> dict:
    """Per target: ``G`` by name and every sample's raw score from one backward per sample, at the
    same initial weights in a plain module (half precision: the exact scores of the rounded
    weights the run trains)."""
    from inrun_megatron.deepspeed.model import TransformerLM, lm_token_losses

    torch.manual_seed(0)
    reference_model = TransformerLM(shape).to(DEVICE)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    if half is not None:
        with torch.no_grad():
            for p in reference_model.parameters():
                p.copy_(p.to(half))
    out = {}
    for target, batches in validation.items():
        g_val = oracle.validation_gradient(reference_model, batches, lm_token_losses)
        out[target] = (g_val, oracle.per_sample_raw(reference_model, train, lm_token_losses, g_val))
    return out


def _raw_of(columns: dict, target: str) -> dict[int, float]:
    return {int(sid): r for t, sid, r in zip(columns["target"], columns["sample_id"], columns["raw"]) if t == target}


def _max_relative_error(ours: dict[int, float], reference: dict[int, float]) -> float:
    assert sorted(ours) == sorted(reference)
    scale = max(abs(v) for v in reference.values())
    assert len({round(v / scale, 6) for v in reference.values()}) == len(reference)  # no degenerate scores
    return max(abs(ours[sid] - reference[sid]) for sid in reference) / scale


@pytest.mark.parametrize(
    "model,stage,dtype",
    [(m, s, "fp32") for m in MODELS for s in (0, 1, 2, 3)] + PRECISION_CASES,
)
def test_scores_match_brute_force(deepspeed_world, model, stage, dtype):
    """Every sample's score and G of every target against one backward per sample (micro-batch
    size 2: the per-layer rules)."""
    from inrun_megatron.deepspeed.model import llama_shape

    shape = llama_shape(**MODELS[model])
    validation, train = _validation_sets(model, shape), make_data(shape, 3, 2, seed=5)
    ours = _score_one_step(shape, validation, train, stage=stage, dtype=dtype)
    assert ours["scored_by"] == {"rules"}
    tol = TOLERANCE[dtype]
    for k, (target, (g_val, reference)) in enumerate(_brute_force(shape, validation, train, dtype).items()):
        for name, g in g_val.items():
            err = float((ours["G"][name][k] - g).abs().max()) / float(g.abs().max())
            assert err <= (1e-5 if dtype == "fp32" else tol), f"{target} {name}: G differs by {err:.2e}"
        error = _max_relative_error(_raw_of(ours["columns"], target), reference)
        print(f"{model} ZeRO-{stage} {dtype} {target}: max relative error vs brute force {error:.2e}")
        assert error <= tol


@pytest.mark.parametrize(
    "model,stage,dtype",
    [(m, s, "fp32") for m in MODELS for s in (0, 1, 2, 3)]
    + [("llama-tied", 0, "bf16"), ("llama-tied", 3, "bf16"), ("gpt-untied", 2, "fp16")],
)
def test_microbatch_path_matches_brute_force_and_rules(deepspeed_world, model, stage, dtype):
    """Micro-batch size 1 with gradient accumulation: ``path="auto"`` scores with each micro-step's
    parameter gradients; every sample's score matches brute force and, per sample id, the per-layer
    rules forced on the same run; the efficiency identity holds."""
    from inrun_megatron.deepspeed.model import llama_shape

    shape = llama_shape(**MODELS[model])
    validation, train = _validation_sets(model, shape), make_data(shape, 3, 1, seed=5)
    ours = _score_one_step(shape, validation, train, stage=stage, dtype=dtype)
    rules = _score_one_step(shape, validation, train, stage=stage, dtype=dtype, path="rules")
    assert ours["scored_by"] == {"microbatch"} and rules["scored_by"] == {"rules"}
    tol = TOLERANCE[dtype]
    for target, (_, reference) in _brute_force(shape, validation, train, dtype).items():
        raw = _raw_of(ours["columns"], target)
        error = _max_relative_error(raw, reference)
        versus_rules = _max_relative_error(raw, _raw_of(rules["columns"], target))
        total, dot = ours["efficiency"][target]
        efficiency = abs(total - dot) / sum(abs(v) for v in raw.values())
        print(
            f"microbatch path, {model} ZeRO-{stage} {dtype} {target}: max relative error vs brute force"
            f" {error:.2e}, vs rules {versus_rules:.2e}, efficiency residual {efficiency:.1e}"
        )
        assert error <= tol and versus_rules <= tol
        assert efficiency <= (1e-5 if dtype == "fp32" else tol)


@pytest.mark.parametrize("stage,dtype", [(0, "bf16"), (3, "bf16"), (1, "fp16"), (3, "fp16")])
def test_mixed_precision_identities_and_skipped_steps(deepspeed_world, stage, dtype):
    """Efficiency and SGD identities through DeepSpeed's loss scaling and clipping; fp16 starts at a
    loss scale of 2^20 so that the first steps overflow: DeepSpeed skips them, they are recorded as
    skipped (raw NaN, value 0, no weight change) and the scale comes down until steps apply."""
    from inrun_megatron.deepspeed.model import llama_shape

    result = run_deepspeed_case(
        llama_shape(), stage=stage, gas=2, mbs=2, steps=6, lr=0.5, seed=3, dtype=dtype, fp16_scale_power=20
    )
    # The optimizer's gradient is summed from half-precision weight-gradient GEMMs, the scores from
    # exact products of the same half-precision activations: the identities hold to the format's
    # precision relative to the size of the summands (sum of |raw|), not of their (cancelling) sum.
    tol = TOLERANCE[dtype]
    if dtype == "fp16":
        assert result["skipped"][0] and not result["skipped"][-1], result["skipped"]
    else:
        assert not any(result["skipped"])
    applied = [i for i, skipped in enumerate(result["skipped"]) if not skipped]
    for i, (raw, (value, change)) in enumerate(zip(result["raw"], result["sgd"])):
        if i not in applied:
            assert all(v != v for v in raw["validation"].values()) and value == 0.0 and change == 0.0
    assert len(result["efficiency"]) == len(applied)
    for i, (total, dot), scale in zip(applied, result["efficiency"], result["abs_raw"]):
        assert abs(total - dot) <= tol * scale, f"step {i}: efficiency"
        value, change = result["sgd"][i]
        assert abs(value - change) <= tol * 0.5 * result["clip"][i] * scale, f"step {i}: SGD identity"


_CPU_FP16_PROBE = """
import torch
from inrun_megatron import cpu_shims
cpu_shims.simulate_cpu_fp16()
cpu = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
torch.ops.mkldnn._is_mkldnn_fp16_supported.default  # torch.export enumerates every op's overloads
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
unpatched = bool(CPU_Accelerator.is_fp16_supported(None))
cpu_shims.install_deepspeed()
from deepspeed.accelerator import get_accelerator
print(cpu, unpatched, get_accelerator().is_fp16_supported(), torch.float16 in get_accelerator().supported_dtypes())
"""


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU shims only: on a GPU, DeepSpeed's CUDA accelerator decides fp16")
@pytest.mark.parametrize("reported", ["absent", "present"])
def test_cpu_fp16_switch_and_deepspeed_fp16_on_either_kind_of_cpu(reported):
    """INRUN_CPU_FP16 makes a process report the CPU's fp16 support absent or present (DeepSpeed's
    own check follows it), and with the CPU shims DeepSpeed accepts fp16 either way: the fp16
    tests above run on both kinds of CPU."""
    import os
    import subprocess
    import sys

    from inrun_megatron.cpu_shims import CPU_FP16_ENV

    env = dict(os.environ, DS_ACCELERATOR="cpu", **{CPU_FP16_ENV: reported})
    out = subprocess.run([sys.executable, "-c", _CPU_FP16_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    present = reported == "present"
    assert out.stdout.split()[-4:] == [str(present), str(present), "True", "True"], out.stdout
    env[CPU_FP16_ENV] = "maybe"
    out = subprocess.run([sys.executable, "-c", _CPU_FP16_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and f"{CPU_FP16_ENV}='maybe'" in out.stderr


def _refusal(model: torch.nn.Module, config: dict) -> str:
    import deepspeed

    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import llama_shape, lm_token_losses

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    with pytest.raises(NotImplementedError) as refused:
        DeepSpeedScorer(engine, make_data(llama_shape(), 2, 2, seed=1, first_id=10**6), lm_token_losses)
    return str(refused.value)


class _TinyMoE(torch.nn.Module):
    vocab_size = 64

    def __init__(self):
        from deepspeed.moe.layer import MoE

        super().__init__()
        self.embedding = torch.nn.Embedding(64, 8)
        self.moe = MoE(hidden_size=8, expert=torch.nn.Linear(8, 8), num_experts=2, ep_size=1)


def test_unsupported_deepspeed_features_are_refused_at_attach(deepspeed_world):
    from deepspeed.pipe import PipelineModule

    from inrun_megatron.deepspeed.model import TransformerLM, llama_shape

    plain = ds_config(stage=0, gas=1, mbs=2, clip=0.0)
    pipeline = PipelineModule(layers=[torch.nn.Linear(4, 4)], num_stages=1, loss_fn=lambda out, labels: out.sum())
    offload = ds_config(stage=2, gas=1, mbs=2, clip=0.0)
    offload["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    offload["zero_force_ds_cpu_optimizer"] = False
    refusals = {
        "PipelineEngine": _refusal(pipeline, plain),
        "offload_optimizer": _refusal(TransformerLM(llama_shape()), offload),
        "mixture-of-experts": _refusal(_TinyMoE(), plain),
        "fp16 without ZeRO": _refusal(
            TransformerLM(llama_shape()), ds_config(stage=0, gas=1, mbs=2, clip=0.0, dtype="fp16")
        ),
    }
    for feature, message in refusals.items():
        assert feature in message and "Supported: " in message and "ZeRO stage 0, 1, 2 or 3" in message, message


class _WithConv(torch.nn.Module):
    vocab_size = 64

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(64, 8)
        self.conv = torch.nn.Conv1d(8, 8, 1)


def test_layers_without_a_score_rule_are_refused_above_micro_batch_size_1(deepspeed_world):
    """A layer no rule covers is refused at attach when micro-batches hold several sequences, with
    the remedy; at micro-batch size 1 the microbatch-gradient path takes it (forcing the rules path
    refuses it again), and the microbatch path refuses larger micro-batches."""
    import deepspeed

    from inrun_megatron import ScoringConfig
    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import llama_shape, lm_token_losses

    message = _refusal(_WithConv(), ds_config(stage=3, gas=1, mbs=2, clip=0.0))
    assert "'conv'" in message and "Conv1d" in message and "Linear" in message and "requires_grad=False" in message
    assert "micro_batch_size 1" in message and "micro_batch_size 2" in message, message

    def attach(mbs: int, path: str) -> DeepSpeedScorer:
        model = _WithConv()
        config = ds_config(stage=3, gas=1, mbs=mbs, clip=0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        validation = make_data(llama_shape(), 2, 2, seed=1, first_id=10**6)
        return DeepSpeedScorer(engine, validation, lm_token_losses, ScoringConfig(path=path, accumulate_values=True))

    scorer = attach(1, "auto")
    assert scorer.path == "microbatch" and scorer.rules_unavailable and "'conv'" in scorer.rules_unavailable
    scorer.detach()
    with pytest.raises(NotImplementedError, match="'conv'"):
        attach(1, "rules")
    with pytest.raises(ValueError, match="one sequence's only with micro_batch_size 1, not 2"):
        attach(2, "microbatch")


def test_bad_step_input_is_rejected_before_any_work(deepspeed_world):
    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import llama_shape, lm_token_losses

    shape = llama_shape()
    engine = _engine(shape, stage=2, gas=2)
    scorer = DeepSpeedScorer(engine, make_data(shape, 2, 2, seed=1, first_id=10**6), lm_token_losses)
    good = make_data(shape, 2, 2, seed=2)
    no_ids = [{k: v for k, v in b.items() if k != "sample_ids"} for b in good]
    duplicated = [good[0], dict(good[1], sample_ids=good[0]["sample_ids"])]
    bad = {
        "takes the 2 micro-batches": good[:1],
        "has batch size 1, but the engine's train_micro_batch_size_per_gpu is 2": make_data(shape, 2, 1, seed=2),
        "has no 'sample_ids'": no_ids,
        "occur more than once": duplicated,
    }
    for message, batches in bad.items():
        with pytest.raises(ValueError, match=message):
            scorer.forward_backward(batches)
        assert engine.micro_steps == 0 and all(p.grad is None for p in engine.module.parameters())
    scorer.forward_backward(good)
    with pytest.raises(ValueError, match="call end_step"):
        scorer.forward_backward(good)
    with pytest.raises(RuntimeError, match=r"call engine\.step\(\)"):
        scorer.end_step()
    engine.step()
    records = scorer.end_step().records
    assert sorted(records.columns["sample_id"].tolist()) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="needs a scored forward"):
        scorer.end_step()


def test_readme_training_loop_runs(deepspeed_world, monkeypatch, capsys):
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    block = readme.split("<!-- deepspeed-loop")[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(repo)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    values = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(values) == list(range(12)) and all(v == v for v in values.values())


class _TinyLM(torch.nn.Module):
    """Embedding, a Linear called with ``input=`` and an output projection; optionally a position
    embedding looked up without a batch dimension and broadcast over the batch (GPT-2 code does)."""

    vocab_size = 64

    def __init__(self, broadcast_positions: bool):
        super().__init__()
        self.broadcast_positions = broadcast_positions
        self.embedding = torch.nn.Embedding(64, 16)
        self.position_embedding = torch.nn.Embedding(16, 16)
        self.hidden = torch.nn.Linear(16, 16)
        self.output_layer = torch.nn.Linear(16, 64)

    def forward(self, tokens, position_ids):
        positions = torch.arange(tokens.shape[1], device=tokens.device) if self.broadcast_positions else position_ids
        x = self.embedding(tokens) + self.position_embedding(positions)
        return self.output_layer(torch.tanh(self.hidden(input=x)))


@pytest.mark.parametrize("broadcast_positions", [False, True])
def test_torch_layers_keyword_inputs_and_broadcast_embeddings(deepspeed_world, broadcast_positions):
    import deepspeed

    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import llama_shape, lm_token_losses

    torch.manual_seed(0)
    model = _TinyLM(broadcast_positions)
    config = ds_config(stage=0, gas=1, mbs=2, clip=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    shape = llama_shape()
    validation, train = make_data(shape, 2, 2, seed=1, first_id=10**6), make_data(shape, 1, 2, seed=2)
    scorer = DeepSpeedScorer(engine, validation, lm_token_losses)
    if broadcast_positions:  # one output shared by the batch has no per-sequence gradient: refused, not summed
        with pytest.raises(
            RuntimeError,
            match=r"position_embedding \(Embedding\) failed: it was looked up with indices of shape \(16,\)",
        ):
            scorer.forward_backward(train)
        return
    scorer.forward_backward(train)
    engine.step()
    c = scorer.end_step(lr=1.0).records.columns
    torch.manual_seed(0)
    reference_model = _TinyLM(broadcast_positions).to(DEVICE)
    g_val = oracle.validation_gradient(reference_model, validation, lm_token_losses)
    reference = oracle.per_sample_raw(reference_model, train, lm_token_losses, g_val)
    scale = max(abs(v) for v in reference.values())
    assert all(abs(r - reference[int(s)]) <= 1e-4 * scale for s, r in zip(c["sample_id"], c["raw"]))
