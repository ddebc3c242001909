"""Process setup for ``launch/pretrain_gpt.py`` under torchrun, the deepspeed launcher or Slurm.

* ``torchrun`` and the ``deepspeed`` launcher export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``.
* ``srun`` exports ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``; the batch script
  exports ``MASTER_ADDR``/``MASTER_PORT`` (see ``launch/slurm_pretrain.sbatch``).
* Without a launcher the script runs as one process.

Errors that every rank finds alike (a bad config) stop each rank on its own. Errors that may
differ between ranks (a file missing on one node) are agreed on with :func:`agree_on_errors`,
so every rank stops together instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from inrun_megatron.pretrain.config import ConfigError, Layout


@dataclass
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str


def _int_env(name: str) -> int:
    value = os.environ[name]
    if not value.isdigit():
        raise ConfigError(f"environment variable {name}={value!r} is not a non-negative integer")
    return int(value)


def read_process_env() -> ProcessEnv:
    """This process's rank and the world size, from whichever launcher started it."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return ProcessEnv(
            _int_env("RANK"), _int_env("WORLD_SIZE"), int(os.environ.get("LOCAL_RANK", "0")), "torchrun/deepspeed"
        )
    if "SLURM_PROCID" in os.environ:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ConfigError(
                    f"under srun, export {name} in the batch script (see launch/slurm_pretrain.sbatch): e.g."
                    " MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) MASTER_PORT=29500"
                )
        env = ProcessEnv(_int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS"), _int_env("SLURM_LOCALID"), "slurm")
        os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
        return env
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return ProcessEnv(0, 1, 0, "single process")


def fail(env: ProcessEnv, message: str, code: int = 2) -> None:
    """Stop this process with ``message`` (printed once, by rank 0)."""
    if env.rank == 0:
        print(f"pretrain_gpt: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def init_distributed(env: ProcessEnv, layout: Layout, seed: int) -> torch.device:
    """Process groups (NCCL on GPUs, gloo on CPUs) and megatron's model-parallel state."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    else:
        from inrun_megatron.megatron import cpu_shims

        cpu_shims.install()
    if not dist.is_initialized():  # a wrapping script may have set it up already
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(
            backend, rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(minutes=30)
        )
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
    )
    # megatron's convention: pipeline stages draw different random numbers
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    return torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")


def agree_on_errors(env: ProcessEnv, check: Callable[[], object]):
    """Run ``check`` on every rank; if it fails anywhere, every rank stops with the errors."""
    try:
        result, error = check(), None
    except (ConfigError, OSError, ValueError) as e:
        result, error = None, f"{e}"
    errors: list[str | None] = [None] * env.world_size
    dist.all_gather_object(errors, error)
    if any(errors):
        by_message: dict[str, list[int]] = {}
        for rank, message in enumerate(errors):
            if message:
                by_message.setdefault(message, []).append(rank)
        everywhere = len(by_message) == 1 and len(next(iter(by_message.values()))) == env.world_size
        fail(env, "\n".join(m if everywhere else f"{m} (rank {_ranks(r)})" for m, r in by_message.items()))
    return result


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) if len(ranks) <= 4 else f"{ranks[0]}-{ranks[-1]} ({len(ranks)} ranks)"
