"""The README's Megatron training loop and its score-rule example run as written (with the setup they
leave out), each in a fresh process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common import free_port
from launcher import plain_process_env

SETUP = """
from inrun_megatron import cpu_shims
cpu_shims.install()
import torch, torch.distributed as dist
from megatron.core import parallel_state
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
parallel_state.initialize_model_parallel(1, 1)
cpu_shims.seed(0)
"""
CHECK = """
assert len(result.records) == 8 and len(values) == 80, (len(result.records), len(values))
assert all(v == v for v in values.values())
assert [r.step for r in sink.results] == list(range(10)) and result.step == 9
# the step's facts are the rows' (lr, clip, skipped) and the validation losses of its one target
assert (result.records.columns["lr"] == result.lr).all() and set(result.validation_losses) == {"validation"}
print("README loop OK")
"""


REPO = Path(__file__).parents[1]


@pytest.mark.megatron
def test_readme_megatron_loop_runs():
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "MegatronScorer(" in b)
    code = SETUP.format(port=free_port()) + block + CHECK
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=plain_process_env()
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "README loop OK" in out.stdout


RULE_SETUP = """
from inrun_megatron import cpu_shims
cpu_shims.install_deepspeed()  # a no-op where there is a GPU
"""
RULE_CHECK = """
import sys
sys.path.insert(0, "tests")
import oracle
torch.manual_seed(0)
reference = TinyLM()  # the weights the step was scored at
g_val = oracle.validation_gradient(reference, validation, lm_token_losses)
expected = oracle.per_sample_raw(reference, micro_batches, lm_token_losses, g_val)
ours = dict(zip(records.columns["sample_id"].tolist(), records.columns["raw"].tolist()))
scale = max(abs(v) for v in expected.values())
error = max(abs(ours[sid] - expected[sid]) for sid in expected) / scale
assert sorted(ours) == sorted(expected) == [0, 1, 2, 3] and error <= 1e-4, (ours, expected)
assert scorer.rules_unavailable is None and any(type(s.layer).__name__ == "Gain" for s in scorer.sites)
print(f"README rule OK, max relative error vs brute force {error:.1e}")
"""


def test_readme_register_rule_example_matches_brute_force():
    """The README's ``register_rule`` example: a user's own layer, scored by the per-layer rules at
    micro-batch size 2 under ZeRO-3, gives the brute-force scores."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- register-rule")[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = RULE_SETUP + block + RULE_CHECK
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=plain_process_env()
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "README rule OK" in out.stdout, out.stdout[-2000:]
    print(out.stdout.strip().splitlines()[-1])


HF_TRAINER_SETUP = """
import sys
sys.path.insert(0, {workers!r})
import torch, transformers
from hf_trainer import texts, tokenizer
tokenizer = tokenizer()
train_dataset = [dict(tokenizer(t, padding="max_length", max_length=12)) for t in texts(8, seed=1)]
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1,
                                                             n_head=4, n_positions=32))
"""
HF_TRAINER_CHECK = """
from inrun_megatron.analysis import cli
from inrun_megatron.records import read_manifest
assert read_manifest(args_run).layout.zero_stage == {zero_stage} and len(trainer.state.log_history) == 3
assert "inrun/batch_dot/held_out" in trainer.state.log_history[0]
assert cli.main(["verify", args_run, "--quiet"]) == 0
print("README Trainer OK")
"""


@pytest.mark.parametrize("deepspeed", [True, False], ids=["deepspeed", "plain"])
def test_readme_hugging_face_trainer_recipe_runs(tmp_path, deepspeed):
    """The README's ``ScoringTrainer`` recipe, as written but for where it writes, in one torchrun process:
    its dump passes ``inrun-scores verify``; and so does the plain Trainer's, the recipe without its
    ``deepspeed=`` line (as the README says)."""
    from launcher import torchrun

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- hf-trainer")[1].split("```python\n", 1)[1].split("```", 1)[0]
    if not deepspeed:
        line = '    deepspeed="configs/deepspeed/zero2.json",\n'
        assert block.count(line) == 1
        block = block.replace(line, "")
    run = str(tmp_path / "run")
    block = block.replace('"runs/hf-trainer/checkpoints"', repr(str(tmp_path / "checkpoints")))
    block = block.replace('"runs/hf-trainer"', repr(run))
    block = block.replace('"configs/deepspeed/zero2.json"', repr(str(REPO / "configs" / "deepspeed" / "zero2.json")))
    assert run in block and (str(REPO) in block) == deepspeed
    script = tmp_path / "recipe.py"
    script.write_text(
        RULE_SETUP
        + HF_TRAINER_SETUP.format(workers=str(REPO / "tests" / "workers"))
        + block
        + f"args_run = {run!r}\n"
        + HF_TRAINER_CHECK.format(zero_stage=2 if deepspeed else None)
    )
    out = torchrun(script, 1)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "README Trainer OK" in out.stdout, out.stdout[-2000:]
