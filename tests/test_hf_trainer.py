"""ScoringTrainer: a real ``transformers.Trainer`` run with a DeepSpeed ZeRO-2 config on 2 gloo processes
(tests/workers/hf_trainer.py: tiny GPT-2, micro-batch size 2, two accumulation steps, shuffled sampler,
texts of different lengths, two validation targets: texts and tokenized examples).

One launch; its dump must pass ``inrun-scores verify``, every score must match brute force (one
backward per sample at the step's weights, ``l_z`` = sample z's masked token-loss sum divided by the
Trainer's ``num_items_in_batch`` of the step, the count of labels over the whole global batch), and the sample ids must
be the dataset indices the Trainer's sampler chose, in the order each rank's dataset was asked for them.
The same run by the plain Trainer (same launch) ends with bitwise the same weights and losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
import transformers

import oracle
from launcher import launch

REPO = Path(__file__).resolve().parents[1]
DP = 2
STEPS = 2  # tests/workers/hf_trainer.py trains this many steps


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_trainer")
    config = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    assert config["zero_optimization"]["stage"] == 2 and config["gradient_accumulation_steps"] == 2
    path = tmp / "zero2.json"
    path.write_text(json.dumps(config))
    ranks = launch("hf_trainer.py", DP, tmp, str(tmp / "run"), str(path))
    table = ds.dataset(tmp / "run" / "scores", format="parquet").to_table().to_pylist()
    return dict(run=tmp / "run", ranks=ranks, rows=table, config=config)


def test_scoring_does_not_change_training(trainer_run):
    for rank in trainer_run["ranks"]:
        assert rank["changed_by_scoring"] == [], rank["changed_by_scoring"]
        assert rank["losses"] == rank["plain_losses"] and len(rank["losses"]) == STEPS


def test_the_dump_passes_verify(trainer_run):
    from inrun_megatron.analysis import cli
    from inrun_megatron.records import read_manifest

    manifest = read_manifest(trainer_run["run"])
    assert manifest.layout.zero_stage == 2 and manifest.layout.data_parallel == DP
    assert manifest.scoring_path == "rules"
    assert [t["name"] for t in manifest.targets] == ["held_out", "tokenized"]
    assert cli.main(["verify", str(trainer_run["run"]), "--quiet"]) == 0


def test_sample_ids_are_the_indices_the_shuffling_sampler_chose(trainer_run):
    config, rows = trainer_run["config"], trainer_run["rows"]
    per_rank = config["gradient_accumulation_steps"] * config["train_micro_batch_size_per_gpu"] * STEPS
    chosen = []
    for rank, saved in enumerate(trainer_run["ranks"]):
        mine = sorted(
            (r["step"], r["microbatch"], r["position"], r["sample_id"])
            for r in rows
            if r["dp_rank"] == rank and r["target"] == "held_out"
        )
        ids = [sid for *_, sid in mine]
        assert ids == saved["requested"][:per_rank], f"rank {rank}: recorded {ids}, sampler chose {saved['requested']}"
        chosen += ids
    assert len(set(chosen)) == len(chosen) == DP * per_rank
    assert chosen != sorted(chosen), "the sampler did not shuffle: the test would not tell indices from positions"


def _brute_force_batch(example: dict) -> dict:
    """One training example in the batch format, built independently of the code under test: the
    collator ignores padding (id 0) in the labels; causal attention never lets a real token see the
    padding after it, so no attention mask is needed."""
    from inrun_megatron.validation import make_batch

    ids = torch.tensor([example["input_ids"]])
    return make_batch(ids, torch.tensor([0]), loss_mask=(ids[:, 1:] != 0))


def test_scores_match_brute_force_and_the_trainer_logs_them(trainer_run):
    from inrun_megatron.deepspeed.model import hf_causal_lm_token_losses

    rank0 = trainer_run["ranks"][0]
    rows = trainer_run["rows"]
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
        for target, batches in rank0["validation"].items():
            g_val = oracle.validation_gradient(model, batches, hf_causal_lm_token_losses)
            reference = {}
            for sid, batch in samples.items():

                def loss_z(batch=batch):
                    return (hf_causal_lm_token_losses(model, batch) * batch["loss_mask"]).sum() / n_items

                reference[sid] = oracle.dot(oracle.gradients(model, loss_z), g_val)
            got = {r["sample_id"]: r["raw"] for r in step_rows if r["target"] == target}
            assert sorted(got) == sorted(reference)
            scale = max(abs(v) for v in reference.values())
            error = max(abs(got[sid] - reference[sid]) for sid in reference) / scale
            worst = max(worst, error)
            assert error <= 1e-4, f"step {step} {target}: {error:.2e} from brute force"
            assert logs[step][f"inrun/batch_dot/{target}"] == pytest.approx(sum(got.values()), rel=1e-4)
            assert f"inrun/validation_loss/{target}" in logs[step]
        for r in step_rows:
            assert r["n_tokens"] == int(samples[r["sample_id"]]["loss_mask"].sum())
    print(f"ScoringTrainer ZeRO-2 DP={DP}: max relative error vs brute force {worst:.2e}")


def test_the_plain_trainer_is_refused_at_construction(tmp_path):
    """Before any work: the plain Trainer (no DeepSpeed), naming what to change."""
    import sys

    sys.path.insert(0, str(REPO / "tests" / "workers"))
    from hf_trainer import tokenizer

    from inrun_megatron.hf_trainer import ScoringTrainer

    tok = tokenizer()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=4))
    train = [dict(tok("abcd")) for _ in range(4)]
    plain = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[])
    with pytest.raises(NotImplementedError, match=r"TrainingArguments\(deepspeed=<config>\)"):
        ScoringTrainer(model=model, args=plain, train_dataset=train, validation=["ab", "cd"], run_dir=tmp_path)
