"""Megatron-Core tensor-parallel layers inside a DeepSpeed engine.

DeepSpeed does data parallelism and ZeRO; megatron-core's ``ColumnParallelLinear``,
``RowParallelLinear``, vocab-parallel embeddings and norms do tensor parallelism. Scoring composes
the megatron-core layer support (:class:`inrun_megatron.megatron_core_layers.MegatronCoreLayers`),
the same unit the Megatron adapter uses: linear layers are scored inside megatron's linear
backward, tensor-parallel shards are summed over the TP group and TP duplicates counted once
(``docs/DESIGN.md`` §2.4). This module adds what is DeepSpeed's: the layouts it refuses, and the
model-parallel unit DeepSpeed must be told the layout with,
``deepspeed.initialize(..., mpu=MegatronMPU())``, and activation recomputation held off in the
curvature pass's replay (:func:`reentrant_recomputation_off`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from inrun_megatron.config import ScoringConfig
from inrun_megatron.megatron_core_layers import MegatronCoreLayers


class MegatronMPU:
    """megatron-core's ``parallel_state`` as DeepSpeed's model-parallel unit (``mpu=``).

    DeepSpeed asks an mpu for model-parallel and data-parallel groups, ranks and sizes;
    ``parallel_state`` has all of them except the model-parallel rank and size, added here.
    Everything else is looked up in ``parallel_state`` (so DeepSpeed's ``hasattr`` probes for
    optional features see exactly what megatron-core offers).
    """

    def __getattr__(self, name: str):
        return getattr(parallel_state, name)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(group=parallel_state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(group=parallel_state.get_model_parallel_group())


def megatron_core_layers(engine, config: ScoringConfig) -> MegatronCoreLayers:
    """The megatron-core layer support for ``engine``'s module; refuses, before any work, the
    megatron-core layouts DeepSpeed cannot run with it."""
    layers = MegatronCoreLayers([engine.module], allow_untested_megatron=config.allow_untested_megatron)
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron-core layers need megatron's parallel state: call"
            " parallel_state.initialize_model_parallel(tensor_model_parallel_size=...) before building the model"
        )
    unsupported = {
        "pipeline parallelism": parallel_state.get_pipeline_model_parallel_world_size() > 1,
        "context parallelism": parallel_state.get_context_parallel_world_size() > 1,
        "sequence parallelism": getattr(getattr(engine.module, "config", None), "sequence_parallel", False),
    }
    refused = [name for name, on in unsupported.items() if on]
    if refused:
        raise NotImplementedError(
            f"megatron-core {', '.join(refused)} inside DeepSpeed is not supported: use tensor parallelism only"
            " (pipeline_model_parallel_size=1, context_parallel_size=1, sequence_parallel=False), or the Megatron"
            " adapter (inrun_megatron.megatron.MegatronScorer) with megatron's own data parallelism"
        )
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1 and not isinstance(engine.mpu, MegatronMPU):
        raise ValueError(
            f"tensor parallelism (TP={tp}) under DeepSpeed needs megatron's layout passed to DeepSpeed:"
            " deepspeed.initialize(..., mpu=inrun_megatron.deepspeed.MegatronMPU())"
        )
    return layers


#: megatron-core's per-module switches of selective recomputation through its reentrant checkpoint
#: (``tensor_parallel.checkpoint``): core attention and the MLP. (Full recomputation is switched by
#: ``TransformerConfig.recompute_granularity``; the norms' selective recomputation does not re-enter
#: autograd.)
REENTRANT_RECOMPUTATION_SWITCHES = ("checkpoint_core_attention", "recompute_mlp")


@contextlib.contextmanager
def reentrant_recomputation_off(module: torch.nn.Module) -> Iterator[None]:
    """Inside: ``module``'s megatron-core layers keep their activations instead of recomputing them
    through megatron's reentrant checkpoint (``docs/DESIGN.md`` §2.10).

    The curvature pass's replay backwards with ``torch.autograd.grad`` so that no ``.grad`` is written
    and no ZeRO gradient hook fires; megatron's checkpoint refuses that (its backward runs a nested
    backward that accumulates into ``.grad``). The replay computes the same thing without
    recomputation: the checkpointed forward draws the same random numbers as a plain one, and the
    recomputation only repeats it. Its activations then stay alive like the validation pass's
    (which runs in eval mode, where megatron never recomputes). The switches are restored on exit.
    """
    configs = {
        id(m.config): m.config for m in module.modules() if isinstance(getattr(m, "config", None), TransformerConfig)
    }
    full = [c for c in configs.values() if c.recompute_granularity == "full"]
    switched = [
        (m, s) for m in module.modules() for s in REENTRANT_RECOMPUTATION_SWITCHES if getattr(m, s, False) is True
    ]
    try:
        for config in full:
            config.recompute_granularity = None
        for m, switch in switched:
            setattr(m, switch, False)
        yield
    finally:
        for config in full:
            config.recompute_granularity = "full"
        for m, switch in switched:
            setattr(m, switch, True)
