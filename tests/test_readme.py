"""The README's Megatron training loop runs as written (with the process-group setup it leaves out)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common import free_port

pytestmark = pytest.mark.megatron

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


def test_readme_megatron_loop_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "MegatronScorer(" in b)
    code = SETUP.format(port=free_port()) + block + CHECK
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "README loop OK" in out.stdout
