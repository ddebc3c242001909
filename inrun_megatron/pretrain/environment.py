"""Process setup for ``launch/pretrain_gpt.py``: rank and world size from whichever launcher
started it (torchrun, the deepspeed launcher, srun, mpirun or none; see
:mod:`inrun_megatron.distributed`), the process groups and megatron's parallel state.

Errors that every rank finds alike (a bad config) stop each rank on its own. Errors that may
differ between ranks (a file missing on one node) are agreed on with :func:`agree_on_errors`,
so every rank stops together instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from inrun_megatron import distributed
from inrun_megatron.pretrain.config import ConfigError, Layout


@dataclass
class ProcessEnv:
    rank: int
    world_size: int
    launcher: str


def read_process_env() -> ProcessEnv:
    """This process's rank and the world size, before any process group exists."""
    try:
        launcher = distributed.adopt_launcher_layout()
    except RuntimeError as e:
        raise ConfigError(str(e)) from e
    values = {}
    for name in ("RANK", "WORLD_SIZE"):
        value = os.environ[name]
        if not value.isdigit():
            raise ConfigError(f"environment variable {name}={value!r} is not a non-negative integer")
        values[name] = int(value)
    return ProcessEnv(values["RANK"], values["WORLD_SIZE"], launcher)


def fail(env: ProcessEnv, message: str, code: int = 2) -> None:
    """Stop this process with ``message`` (printed once, by rank 0)."""
    if env.rank == 0:
        print(f"pretrain_gpt: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def init_distributed(layout: Layout, seed: int) -> None:
    """Process groups (NCCL on GPUs, gloo on CPUs) and megatron's model-parallel state."""
    if not torch.cuda.is_available():
        from inrun_megatron import cpu_shims

        cpu_shims.install()
    distributed.init_distributed()  # a wrapping script may have set it up already
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
