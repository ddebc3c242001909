"""ScoringTrainer: real ``transformers.Trainer`` runs (tests/workers/hf_trainer.py: tiny GPT-2, texts of different
lengths, the shuffling sampler, two validation targets: texts and tokenized examples), with and without DeepSpeed.

* One launch of 2 gloo processes runs every data-parallel case: the Trainer's DeepSpeed integration at ZeRO-1, 2
  and 3 (micro-batch size 2, two accumulation steps), and the plain Trainer under DDP with micro-batch size 2 and
  two accumulation steps (the per-layer rules) and with micro-batch size 1 and three (the microbatch gradients).
* The plain Trainer in this process (no torch.distributed): SGD, and AdamW (Adam-aware rows from the second step).

For every case the dump must pass ``inrun-scores verify``, every score must match brute force (one backward per
sample at the step's weights, ``l_z`` = sample z's masked token-loss sum divided by the Trainer's
``num_items_in_batch`` of the step, the count of labels over the whole global batch), the sample ids must be the
dataset indices the Trainer's sampler chose, in the order each rank's dataset was asked for them, and the plain
Trainer's run of the same configuration must end with bitwise the same weights and losses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
import transformers

import oracle
from launcher import launch, plain_process_env

REPO = Path(__file__).resolve().parents[1]
DP = 2
STEPS = 2  # tests/workers/hf_trainer.py trains this many steps
DEEPSPEED = {f"zero{stage}": REPO / "configs" / "deepspeed" / f"zero{stage}.json" for stage in (1, 2, 3)}
PLAIN = {  # clipping thresholds between the gradient norms of the two steps: one step clips, the other does not
    "ddp": dict(mbs=2, gas=2, max_grad_norm=0.65),
    "ddp-mbs1": dict(mbs=1, gas=3, max_grad_norm=0.8),
}
IN_PROCESS = {
    "single": dict(mbs=2, gas=2, max_grad_norm=1.0, optim="sgd"),
    "single-adamw": dict(mbs=2, gas=2, max_grad_norm=1.0, optim="adamw_torch"),
}
LAUNCHED = [*DEEPSPEED, *PLAIN]
CASES = [*LAUNCHED, *IN_PROCESS]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_trainer")
    for name, path in DEEPSPEED.items():
        config = json.loads(path.read_text())
        assert config["zero_optimization"]["stage"] == int(name[-1]) and config["gradient_accumulation_steps"] == 2
    cases = [dict(name=name, run_dir=str(tmp / name), deepspeed=str(path)) for name, path in DEEPSPEED.items()]
    cases += [dict(name=name, run_dir=str(tmp / name), deepspeed=None, **spec) for name, spec in PLAIN.items()]
    (tmp / "cases.json").write_text(json.dumps(cases))
    ranks = launch("hf_trainer.py", DP, tmp, str(tmp / "cases.json"))
    return {name: _case_result(tmp / name, [rank[name] for rank in ranks]) for name in LAUNCHED}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The plain Trainer in one process without torch.distributed: a fresh Python process without any
    launcher's variables (the test process may hold a process group from other tests, with which
    Accelerate would wrap the model in DDP, and Accelerate's state would outlive the run)."""
    tmp = tmp_path_factory.mktemp("hf_trainer_single")
    cases = [dict(name=name, run_dir=str(tmp / name), deepspeed=None, **spec) for name, spec in IN_PROCESS.items()]
    (tmp / "cases.json").write_text(json.dumps(cases))
    worker = REPO / "tests" / "workers" / "hf_trainer.py"
    proc = subprocess.run(
        [sys.executable, str(worker), str(tmp), str(tmp / "cases.json")],
        env=plain_process_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-8000:]
    saved = torch.load(tmp / "rank0.pt", weights_only=False)
    return {name: _case_result(tmp / name, [saved[name]]) for name in IN_PROCESS}


def _case_result(run: Path, ranks: list) -> dict:
    rows = ds.dataset(run / "scores", format="parquet").to_table().to_pylist()
    return dict(run=run, ranks=ranks, rows=rows)


@pytest.fixture(params=CASES)
def case(request):
    fixture = "launched" if request.param in LAUNCHED else "in_process"
    return dict(request.getfixturevalue(fixture)[request.param], name=request.param)


def test_scoring_does_not_change_training(case):
    for rank in case["ranks"]:
        assert rank["changed_by_scoring"] == [], rank["changed_by_scoring"]
        assert rank["losses"] == rank["plain_losses"] and len(rank["losses"]) == STEPS


def test_the_dump_passes_verify(case):
    from inrun_megatron.analysis import cli
    from inrun_megatron.records import read_manifest

    manifest = read_manifest(case["run"])
    name, rank0 = case["name"], case["ranks"][0]
    assert manifest.layout.zero_stage == (int(name[-1]) if name in DEEPSPEED else None)
    trained = (
        "DeepSpeedEngine" if name in DEEPSPEED else "DistributedDataParallel" if name in PLAIN else "GPT2LMHeadModel"
    )
    assert {rank["wrapped"] for rank in case["ranks"]} == {trained}
    assert manifest.layout.data_parallel == len(case["ranks"])
    assert manifest.scoring_path == ("microbatch" if rank0["mbs"] == 1 else "rules")
    assert [t["name"] for t in manifest.targets] == ["held_out", "tokenized"]
    adam = name == "single-adamw"
    assert {r["target"] for r in case["rows"]} == {"held_out", "tokenized"} | (
        {"held_out:adam", "tokenized:adam"} if adam else set()
    )
    assert cli.main(["verify", str(case["run"]), "--quiet"]) == 0


def test_sample_ids_are_the_indices_the_shuffling_sampler_chose(case):
    rows, rank0 = case["rows"], case["ranks"][0]
    per_rank = rank0["gas"] * rank0["mbs"] * STEPS
    chosen = []
    for rank, saved in enumerate(case["ranks"]):
        mine = sorted(
            (r["step"], r["microbatch"], r["position"], r["sample_id"])
            for r in rows
            if r["dp_rank"] == rank and r["target"] == "held_out"
        )
        ids = [sid for *_, sid in mine]
        assert ids == saved["requested"][:per_rank], f"rank {rank}: recorded {ids}, sampler chose {saved['requested']}"
        chosen += ids
    assert len(set(chosen)) == len(chosen) == len(case["ranks"]) * per_rank
    assert chosen != sorted(chosen), "the sampler did not shuffle: the test would not tell indices from positions"


def _brute_force_batch(example: dict) -> dict:
    """One training example in the batch format, built independently of the code under test: the
    collator ignores padding (id 0) in the labels; causal attention never lets a real token see the
    padding after it, so no attention mask is needed."""
    from inrun_megatron.validation import make_batch

    ids = torch.tensor([example["input_ids"]])
    return make_batch(ids, torch.tensor([0]), loss_mask=(ids[:, 1:] != 0))


def _preconditioned(g_val: dict, optimizer_state: dict, betas=(0.9, 0.999), eps=1e-8) -> dict:
    """``P_t ⊙ G`` from the AdamW state before the step (the Trainer's default betas and eps)."""
    return {
        name: g * oracle.adam_preconditioner_of(s["exp_avg_sq"], int(s["step"]), betas, eps).to(g)
        for name, g in g_val.items()
        for s in [optimizer_state[name]]
    }


def test_scores_match_brute_force_and_the_trainer_logs_them(case):
    from inrun_megatron.token_losses import hf_causal_lm_token_losses

    rank0, rows = case["ranks"][0], case["rows"]
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(rank0["config"]))
    logs = [entry for entry in rank0["log_history"] if "loss" in entry]
    assert len(logs) == STEPS
    worst = 0.0
    for step in range(STEPS):
        model.load_state_dict(rank0["weights"][step])
        step_rows = [r for r in rows if r["step"] == step]
        samples = {r["sample_id"]: _brute_force_batch(rank0["examples"][r["sample_id"]]) for r in step_rows}
        # The Trainer divides every token's loss by its num_items_in_batch, the labels of the global batch
        # it counts (for GPT2LMHeadModel in transformers 5.23 the first label of each sequence too).
        n_items = rank0["num_items"][step]
        assert n_items >= sum(float(b["loss_mask"].sum()) for b in samples.values())
        gradients = {}
        for sid, batch in samples.items():

            def loss_z(batch=batch):
                return (hf_causal_lm_token_losses(model, batch) * batch["loss_mask"]).sum() / n_items

            gradients[sid] = oracle.gradients(model, loss_z)
        for target, batches in rank0["validation"].items():
            g_val = oracle.validation_gradient(model, batches, hf_causal_lm_token_losses)
            score_rows = {target: g_val}
            if rank0["optimizer_states"] and rank0["optimizer_states"][step]:  # Adam, after its first step
                score_rows[f"{target}:adam"] = _preconditioned(g_val, rank0["optimizer_states"][step])
            for row, reference_g in score_rows.items():
                reference = {sid: oracle.dot(grad, reference_g) for sid, grad in gradients.items()}
                got = {r["sample_id"]: r["raw"] for r in step_rows if r["target"] == row}
                assert sorted(got) == sorted(reference), row
                scale = max(abs(v) for v in reference.values())
                error = max(abs(got[sid] - reference[sid]) for sid in reference) / scale
                worst = max(worst, error)
                assert error <= 1e-4, f"step {step} {row}: {error:.2e} from brute force"
                assert logs[step][f"inrun/batch_dot/{row}"] == pytest.approx(sum(got.values()), rel=1e-4)
            assert f"inrun/validation_loss/{target}" in logs[step]
        for r in step_rows:
            assert r["n_tokens"] == int(samples[r["sample_id"]]["loss_mask"].sum())
    print(f"ScoringTrainer {case['name']}: max relative error vs brute force {worst:.2e}")


@pytest.mark.parametrize("name", ["single", *PLAIN])
def test_the_plain_trainers_records_carry_the_clip_coefficient_it_applied(name, request):
    """Plain SGD, so the SGD identity ``sum_z v_t(z) = <G_t, w_t - w_t+1>`` (brute-force ``G``, the weights the
    Trainer left) holds only with the clipping coefficient the Trainer actually multiplied the gradient by; each
    run clips in one step and not in the other."""
    from inrun_megatron.token_losses import hf_causal_lm_token_losses

    case = request.getfixturevalue("launched" if name in LAUNCHED else "in_process")[name]
    rank0, rows = case["ranks"][0], case["rows"]
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(rank0["config"]))
    after = [*rank0["weights"][1:], rank0["final_weights"]]
    clips = []
    for step in range(STEPS):
        model.load_state_dict(rank0["weights"][step])
        names = dict(model.named_parameters())
        for target, batches in rank0["validation"].items():
            g_val = oracle.validation_gradient(model, batches, hf_causal_lm_token_losses)
            change = {n: rank0["weights"][step][n] - after[step][n] for n in g_val}
            assert set(g_val) <= set(names)
            step_rows = [r for r in rows if r["step"] == step and r["target"] == target]
            (clip,) = {r["clip_coef"] for r in step_rows}
            (lr,) = {r["lr"] for r in step_rows}
            total, expected = sum(r["value"] for r in step_rows), oracle.dot(change, g_val)
            scale = lr * clip * sum(abs(r["raw"]) for r in step_rows)
            assert abs(total - expected) <= 1e-4 * scale, f"step {step} {target}: {total} vs {expected}"
        clips.append(clip)
    assert min(clips) < 1.0 == max(clips), f"clip coefficients {clips}: the test needs a clipped and an unclipped step"


@pytest.mark.parametrize(
    "refused, options, scoring",
    [
        (r"fp16 without DeepSpeed \(its gradient scaler", dict(fp16=True), {}),
        (r"validation_split='split'\) without DeepSpeed", {}, dict(validation_split="split")),
    ],
    ids=["fp16", "split"],
)
def test_what_the_plain_trainer_does_not_follow_is_refused_at_construction(tmp_path, refused, options, scoring):
    """Before any work, naming what to change."""
    sys.path.insert(0, str(REPO / "tests" / "workers"))
    from hf_trainer import _reset_accelerate, tokenizer

    from inrun_megatron import ScoringConfig
    from inrun_megatron.hf_trainer import ScoringTrainer

    tok = tokenizer()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=4))
    train = [dict(tok("abcd")) for _ in range(4)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True, **options
    )
    try:
        with pytest.raises(NotImplementedError, match=refused):
            ScoringTrainer(
                model=model,
                args=args,
                train_dataset=train,
                validation=["ab", "cd"],
                run_dir=tmp_path,
                scoring=ScoringConfig(**scoring),
            )
    finally:
        _reset_accelerate(next_case=True)
