"""Run megatron-core and DeepSpeed on a CPU-only machine with gloo, for tests, the demo and CPU benchmarks.

The one module of CPU-only patches; production code on GPUs never imports it, and nothing in the
scoring library depends on it.

megatron-core assumes CUDA in a handful of places (RNG tracker, ``cuda`` device strings,
streams, a triton-only MoE module, the CUDA kernel of gradient accumulation fusion).
:func:`install` patches exactly those places so that megatron's real layers, schedules, DDP
and optimizer run unmodified on the CPU. Call it once, before building models, and wrap
megatron optimizer construction and ``optimizer.step()`` in :class:`CudaToCpuMode`. Model
configs also need ``pipeline_dtype`` when PP > 1 and ``batch_p2p_comm=False,
batch_p2p_sync=False`` (see :data:`REQUIRED_CONFIG`).

DeepSpeed's CPU accelerator refuses fp16 on CPUs without oneDNN fp16 kernels although torch
computes fp16 on any CPU, and builds a shared-memory op that gloo does not need:
:func:`install_deepspeed` handles both. ``INRUN_CPU_FP16=absent|present`` (:data:`CPU_FP16_ENV`)
makes a process report the CPU's fp16 support as absent or present, so that either kind of CPU
can be simulated on the other.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import operator
import os
import sys
import types
from functools import reduce
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: Environment variable that overrides what this process reports as the CPU's fp16 support
#: (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``, true on CPUs with AVX512-FP16 or AMX-FP16):
#: ``absent`` or ``present``; unset or empty, the CPU's own answer.
CPU_FP16_ENV = "INRUN_CPU_FP16"

#: TransformerConfig fields that megatron-core needs on the CPU.
REQUIRED_CONFIG = {"batch_p2p_comm": False, "batch_p2p_sync": False, "use_cpu_initialization": True}

_installed = False


def _stub_triton_moe_module() -> None:
    """megatron-core >= 0.17 imports triton at module level in an MoE-only kernel module."""
    if importlib.util.find_spec("triton") is not None:
        return
    name = "megatron.core.transformer.moe.ops.paged_stash"
    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _needs_triton(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("paged_stash kernels need triton, which is not installed")

    stub.paged_stash_copy_kernel = stub.paged_stash_pop_kernel = _needs_triton
    sys.modules[name] = stub


def _wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` as the CUDA kernels of ``fused_weight_gradient_mlp_cuda``
    do it: products and the sum with ``main_grad`` in float32, rounded once to ``main_grad``'s dtype."""
    dtype = torch.promote_types(total_input.dtype, torch.float32)
    main_grad.copy_(main_grad.to(dtype) + grad_output.t().to(dtype) @ total_input.to(dtype))


def _install_fused_wgrad_kernels() -> None:
    """A CPU stand-in for megatron's ``fused_weight_gradient_mlp_cuda`` extension, so that
    ``gradient_accumulation_fusion=True`` runs megatron's own fused-accumulation protocol
    (weight gradients added to ``main_grad`` inside the linear backward) on the CPU."""
    kernels = types.ModuleType("fused_weight_gradient_mlp_cuda")
    kernels.wgrad_gemm_accum_fp32 = kernels.wgrad_gemm_accum_fp16 = _wgrad_gemm_accum
    sys.modules["fused_weight_gradient_mlp_cuda"] = kernels
    from megatron.core.tensor_parallel import layers

    layers.fused_weight_gradient_mlp_cuda = kernels
    layers._grad_accum_fusion_available = True


def _cpu_device(device: Any) -> Any:
    is_index = isinstance(device, int) and not isinstance(device, bool)
    is_cuda_str = isinstance(device, str) and device.startswith("cuda")
    is_cuda_dev = isinstance(device, torch.device) and device.type == "cuda"
    return torch.device("cpu") if is_index or is_cuda_str or is_cuda_dev else device


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` (and integer devices) to the CPU inside megatron code.

    Also reports ``torch.cuda.*`` tensor type names, which megatron's distributed optimizer
    checks for.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to:
            args = tuple(a if isinstance(a, (torch.Tensor, torch.dtype)) else _cpu_device(a) for a in args)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.current_stream()`` (megatron 0.19 DDP waits on it)."""

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _in_cpu_mode(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with CudaToCpuMode():
            return fn(*args, **kwargs)

    return wrapper


def _patch_memory_buffer() -> None:
    from megatron.core import utils as mcore_utils

    def get_tensor(self, shape, dtype, name, mem_alloc_context=None):
        numel = reduce(operator.mul, shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device="cpu")
            self.buffer[(name, dtype)] = buf
        return buf[0:numel].view(*shape)

    mcore_utils.GlobalMemoryBuffer.get_tensor = get_tensor


def _patch_rng_tracker() -> None:
    """Map megatron's CUDA RNG tracker onto the CPU generator."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    mcore_random.CudaRNGStatesTracker.add = add
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)


def _patch_causal_masks() -> None:
    """The torch-softmax attention path builds its causal masks with ``device="cuda"``."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    for name in ("get_default_causal_mask", "get_sliding_window_causal_mask"):
        patched = _in_cpu_mode(getattr(transformer_utils, name))
        for module in (transformer_utils, fused_softmax):
            setattr(module, name, patched)


def _patch_embedding_setup() -> None:
    """With tied embeddings under pipeline parallelism, the last stage's copy of the embedding is
    all-reduced at construction after ``weight.data.cuda()``."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _in_cpu_mode(LanguageModule.setup_embeddings_and_output_layer)


def install() -> None:
    """Apply every CPU patch once. Call before building megatron models."""
    global _installed
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_shims is for CPU-only machines; a GPU is present, run megatron-core unpatched")
    _stub_triton_moe_module()
    _patch_memory_buffer()
    _patch_rng_tracker()
    _patch_causal_masks()
    _patch_embedding_setup()
    _install_fused_wgrad_kernels()
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.current_stream = lambda *args, **kwargs: _NullStream()
    torch.cuda.synchronize = lambda *args, **kwargs: None  # dist_checkpointing's writer syncs before saving
    from megatron.core.pipeline_parallel import schedules

    for name in (
        "forward_backward_no_pipelining",
        "forward_backward_pipelining_without_interleaving",
        "forward_backward_pipelining_with_interleaving",
    ):
        setattr(schedules, name, _in_cpu_mode(getattr(schedules, name)))
    _installed = True


def seed(value: int) -> None:
    """Seed torch and megatron's (CPU-mapped) model-parallel RNG tracker."""
    from megatron.core import tensor_parallel

    torch.manual_seed(value)
    tensor_parallel.model_parallel_cuda_manual_seed(value)


def simulate_cpu_fp16() -> None:
    """Make ``torch.ops.mkldnn._is_mkldnn_fp16_supported()`` answer as :data:`CPU_FP16_ENV` says.

    DeepSpeed's CPU accelerator asks exactly this to decide whether fp16 is supported, so
    setting the variable turns a machine into the other kind for everything that asks.
    """
    choice = os.environ.get(CPU_FP16_ENV, "")
    if choice not in ("", "absent", "present"):
        raise ValueError(f"{CPU_FP16_ENV}={choice!r}: expected 'absent', 'present' or unset (the CPU's own answer)")
    if choice:
        packet = torch.ops.mkldnn._is_mkldnn_fp16_supported
        original = getattr(packet, "wrapped_op", packet)  # installed twice: wrap the real op only
        torch.ops.mkldnn._is_mkldnn_fp16_supported = _ReportedOp(original, choice == "present")


class _ReportedOp:
    """Answers a fixed value when called; everything else (``.default``, the overloads torch's
    export utilities enumerate) is the wrapped operator's."""

    def __init__(self, op: Any, reported: bool):
        self.wrapped_op = op
        self.reported = reported

    def __call__(self, *args: Any, **kwargs: Any) -> bool:
        return self.reported

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped_op, name)


def install_deepspeed() -> None:
    """Prepare DeepSpeed's CPU accelerator for training with gloo on any CPU. Call before
    ``deepspeed.initialize``.

    * fp16: DeepSpeed 0.19's CPU accelerator reports fp16 supported only where oneDNN has fp16
      kernels (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``: AVX512-FP16/AMX-FP16) and the
      engine then refuses fp16 configs; yet torch computes fp16 on every CPU (oneDNN's kernels
      only make it faster). Where DeepSpeed's own check says no, it is patched to say yes, so
      fp16 trains, and is tested, on both kinds of CPU; where it says yes it runs unpatched.
    * The shared-memory communication op, a 30 s JIT build on first use, is skipped: gloo does
      the collectives.
    """
    if torch.cuda.is_available():
        raise RuntimeError("install_deepspeed() is for CPU-only machines; a GPU is present, run DeepSpeed unpatched")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    simulate_cpu_fp16()
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if not CPU_Accelerator.is_fp16_supported(None):
        CPU_Accelerator.is_fp16_supported = lambda self: True
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
