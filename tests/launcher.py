"""Start a worker script under torchrun with N gloo processes and collect what each rank saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent


#: What a launcher exports to a process it starts (and DeepSpeed or Accelerate export to their own).
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def plain_process_env() -> dict:
    """The environment of a process started by hand, not by a launcher: this one's without what
    earlier tests' process groups (DeepSpeed, Accelerate) may have exported into it, plus the
    tests' and the repository's paths."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("ACCELERATE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(TESTS), str(TESTS.parent)) if p)
    return env


def torchrun(
    script: Path, nproc: int, *args: str, timeout: int = 900, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` gloo ranks (loopback only, on the CPU even where there is a GPU);
    return the finished process."""
    full_env = dict(os.environ)
    full_env.update(
        OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", **(env or {})
    )
    paths = [full_env.get("PYTHONPATH"), str(TESTS), str(TESTS.parent)]
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    return subprocess.run([*cmd, *args], env=full_env, capture_output=True, text=True, timeout=timeout)


def launch(worker: str, nproc: int, out_dir: Path, *args: str, timeout: int = 900) -> list:
    """Run ``tests/workers/<worker>`` on ``nproc`` ranks; return each rank's ``torch.save``d result.

    Workers get ``out_dir`` as first argument and save ``out_dir/rank<r>.pt``.
    """
    proc = torchrun(TESTS / "workers" / worker, nproc, str(out_dir), *args, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{worker} failed with exit code {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-12000:]}"
        )
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(nproc)]
