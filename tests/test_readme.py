"""The README's Megatron training loop and its score-rule example run as written (with the setup they
leave out), each in a fresh process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common import free_port

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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "README rule OK" in out.stdout, out.stdout[-2000:]
    print(out.stdout.strip().splitlines()[-1])
