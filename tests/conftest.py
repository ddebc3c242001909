"""Single-process megatron and DeepSpeed tests run inside the pytest process on a 1-rank world:
gloo on a CPU-only machine (with the CPU shims), gloo and NCCL where there is a GPU."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch

from inrun_megatron import cpu_shims

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cpu_shims.install()  # before any test module imports megatron-core


@pytest.fixture(scope="session")
def megatron_world():
    """A 1-process world with megatron's parallel state at TP=PP=DP=1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from common import BACKEND, free_port

    if not dist.is_initialized():
        dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    cpu_shims.seed(1234)
    yield


@pytest.fixture(scope="session")
def deepspeed_world():
    """DeepSpeed on a 1-process world (shared with megatron_world when both are used)."""
    from ds_common import init_deepspeed

    init_deepspeed()
    yield
