"""The DeepSpeed entry point end to end under the real launchers (``deepspeed``, ``mpirun``,
``torchrun``), started through the documented scripts in ``launch/``: every layout writes the
scores of a single-process run of the same global batches, per step and sample id."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from inrun_megatron.distributed import free_port
from inrun_megatron.records import read_manifest

from common import plant_wrong_row, verified_efficiency

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH")] if p)
    env["MASTER_PORT"] = str(free_port())
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")  # CI containers run as root
    return env


def _run(*cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _config(tmp: Path, name: str, accumulation_steps: int) -> Path:
    config = json.loads((REPO / "configs" / "deepspeed" / name).read_text())
    config["gradient_accumulation_steps"] = accumulation_steps
    path = tmp / f"{Path(name).stem}-gas{accumulation_steps}.json"
    path.write_text(json.dumps(config))
    return path


def _scores(run: Path) -> dict:
    """``{(step, sample_id): (raw, lr, clip_coef)}`` of the SGD value from a run directory, checking
    its manifest. The launcher trains with AdamW, so every step but the first also records the
    Adam-aware row of every sample (docs/DESIGN.md §1.5); its layouts are compared per sample at
    eps 1e-3 in tests/test_adam_values.py (P amplifies rounding at the launcher's eps 1e-8)."""
    manifest = read_manifest(run)
    assert "positive = the sample lowered the validation loss" in manifest.contract["sign"]
    assert manifest.values is not None and manifest.values.default == "adam", manifest.values
    table = ds.dataset(run / "scores", format="parquet").to_table().to_pydict()
    rows: dict[str, dict] = {row: {} for row in manifest.values.rows}
    for step, target, sid, raw, lr, clip in zip(
        table["step"], table["target"], table["sample_id"], table["raw"], table["lr"], table["clip_coef"], strict=True
    ):
        assert (step, sid) not in rows[target], f"{run}: sample {sid} recorded twice in step {step} for {target}"
        rows[target][step, sid] = (raw, lr, clip)
    (sgd,) = [row for row, kind in manifest.values.rows.items() if kind["value"] == "sgd"]
    (adam,) = [row for row, kind in manifest.values.rows.items() if kind["value"] == "adam"]
    assert sorted(rows[adam]) == sorted(key for key in rows[sgd] if key[0] > 0), f"{run}: Adam-aware rows"
    return rows[sgd]


def _assert_same_scores(ours: dict, reference: dict, what: str) -> None:
    assert sorted(ours) == sorted(reference), what
    for step in range(STEPS):
        ids = [key for key in reference if key[0] == step]
        scale = max(abs(reference[k][0]) for k in ids)
        worst = max(abs(ours[k][0] - reference[k][0]) for k in ids) / scale
        print(f"{what}: step {step}: max relative error vs the single-process run {worst:.2e}")
        assert worst <= 1e-4, f"{what}: step {step} differs from the single-process run by {worst:.2e}"
        for k in ids:
            assert np.allclose(ours[k][1:], reference[k][1:], rtol=1e-5), f"{what}: lr/clip of {k}"


def _single_process(tmp: Path, config: Path, *options: str) -> dict:
    run = tmp / f"reference-{config.stem}"
    _run(sys.executable, "launch/deepspeed_train.py", "--deepspeed_config", str(config), "--out", str(run),
         "--steps", str(STEPS), *options)  # fmt: skip
    return _scores(run)


def test_deepspeed_launcher_and_mpirun_end_to_end(tmp_path):
    """ZeRO-3 under ``deepspeed --num_gpus 2`` (DP=2, 2 accumulation steps) and ZeRO-2 under ``mpirun
    -np 2`` at micro-batch size 1 (DP=2, 4 accumulation steps: the microbatch-gradient path) against
    one process with micro-batch size 2 and 4 accumulation steps (the per-layer rules). Every
    micro-batch holds the same number of tokens, so all three train the same sequences per step
    with the same per-sample loss terms."""
    reference = _single_process(tmp_path, _config(tmp_path, "zero1.json", 4))
    _run("launch/deepspeed_single_node.sh", "2", str(_config(tmp_path, "zero3.json", 2)), str(tmp_path / "ds"),
         "--steps", str(STEPS))  # fmt: skip
    _assert_same_scores(_scores(tmp_path / "ds"), reference, "deepspeed launcher, ZeRO-3, DP=2")
    env = _env()
    env.pop("MASTER_PORT")  # mpirun: rank 0 picks the rendezvous port and shares it over MPI
    _run("launch/deepspeed_mpirun.sh", "2", str(_config(tmp_path, "zero2.json", 4)), str(tmp_path / "mpi"),
         "--steps", str(STEPS), "--micro-batch-size", "1", env=env)  # fmt: skip
    _assert_same_scores(_scores(tmp_path / "mpi"), reference, "mpirun, ZeRO-2, DP=2, micro-batch size 1")
    manifest = read_manifest(tmp_path / "mpi")
    layout = manifest.layout
    assert (layout.data_parallel, layout.tensor_parallel, layout.zero_stage, layout.world_size) == (2, 1, 2, 2)
    assert (layout.micro_batch_size, layout.num_microbatches, layout.global_batch_size) == (1, 4, 8)
    assert manifest.entry_point == "launch/deepspeed_train.py" and manifest.launcher == "mpirun"
    assert manifest.scoring_path == "microbatch" and read_manifest(tmp_path / "ds").scoring_path == "rules"
    for run in ("reference-zero1-gas4", "ds", "mpi"):  # <g, G> from each rank's own gradient shards
        verified_efficiency(tmp_path / run, steps=STEPS)


def test_verify_names_the_step_of_a_wrong_row(tmp_path, capsys):
    """``inrun-scores verify`` on a DeepSpeed run prints the efficiency check of every step, and fails
    naming the step once one row is wrong."""
    from inrun_megatron.analysis import cli

    config = _config(tmp_path, "zero2.json", 2)
    _run(sys.executable, "launch/deepspeed_train.py", "--deepspeed_config", str(config), "--out",
         str(tmp_path / "run"), "--steps", str(STEPS))  # fmt: skip
    capsys.readouterr()
    assert cli.main(["verify", str(tmp_path / "run"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "efficiency identity" in out and "steps checked" in out and "worst residual" in out
    assert re.search(rf"│ validation +│ {STEPS} ", out), out
    assert re.search(rf"│ validation:adam +│ {STEPS - 1} ", out), out  # none at the optimizer's first step
    plant_wrong_row(tmp_path / "run", step=1)
    assert cli.main(["verify", str(tmp_path / "run"), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert any("efficiency identity fails for target 'validation' at steps 1 " in p for p in problems), problems


@pytest.mark.megatron
def test_torchrun_tensor_parallel_end_to_end(tmp_path):
    """A megatron-core GPT at TP=2 inside DeepSpeed (ZeRO-1) under torchrun against TP=1."""
    config = _config(tmp_path, "zero1.json", 4)
    reference = _single_process(tmp_path, config, "--model", "megatron-gpt")
    proc = _run("launch/deepspeed_torchrun.sh", "2", str(config), str(tmp_path / "tp"), "--steps", str(STEPS),
                "--model", "megatron-gpt", "--tensor-model-parallel-size", "2")  # fmt: skip
    assert "UserWarning" not in proc.stderr, proc.stderr[-3000:]  # megatron's import warnings are quieted
    _assert_same_scores(_scores(tmp_path / "tp"), reference, "torchrun, TP=2 inside DeepSpeed")
    verified_efficiency(tmp_path / "tp", steps=STEPS)
