"""Start a worker script under torchrun with N gloo processes and collect what each rank saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent


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
