"""Checkpoints with megatron-core's distributed checkpointing, the scorer's state included.

``<dir>/iter_0000100/`` holds one checkpoint (megatron ``dist_checkpointing``: every rank writes
its shards in parallel). ``<dir>/latest`` names the last *complete* one; it is replaced
atomically only after every rank finished writing, so a crash during a save leaves the
previous checkpoint in charge and the half-written directory is overwritten by the next save.

What is saved: the model chunks and optimizer (sharded), the LR schedule, the iteration and the
number of consumed samples (which fixes the data position), the run config, each rank's RNG
states, and each data-parallel replica's scorer state (its step counter: nothing per sample, so
a checkpoint does not grow as the run goes on; ``docs/DESIGN.md`` §2.7).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from inrun_megatron.records import atomic_write_bytes
from inrun_megatron.scorer import Scorer

LATEST = "latest"

#: The distributed optimizer's checkpoint format: its own flat buffers, reshardable across DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def iteration_dir(checkpoint_dir: Path, iteration: int) -> Path:
    return checkpoint_dir / f"iter_{iteration:07d}"


def latest_iteration(checkpoint_dir: Path) -> int | None:
    """The iteration of the last complete checkpoint, or None."""
    path = checkpoint_dir / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path} is corrupt ({text!r}); it should hold the iteration of the last checkpoint")
    return int(text)


@dataclass
class TrainingState:
    """Everything a checkpoint restores besides the model and optimizer tensors."""

    iteration: int
    consumed_samples: int
    config: dict


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _rank_coordinates() -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return shape, offset


def _sharded_state_dict(
    models: list[torch.nn.Module], optimizer, scheduler, scorer: Scorer | None, state: TrainingState | None
) -> dict[str, Any]:
    """The state dict to save (``state`` given) or the template to load into (``state`` None)."""
    loading = state is None
    sd: dict[str, Any] = {}
    for i, model in enumerate(models):
        sd["model" if len(models) == 1 else f"model{i}"] = model.sharded_state_dict()
    model_sd = {k: v for k, v in sd.items() if k.startswith("model")}
    sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=OPTIMIZER_METADATA)
    shape, offset = _rank_coordinates()
    sd["rng_state"] = ShardedObject("rng_state", None if loading else _rng_state(), shape, offset, replica_id=0)
    if scorer is not None:
        # one copy per data-parallel replica; its model-parallel ranks hold identical states
        mp_rank = parallel_state.get_model_parallel_group().rank()
        sd["scorer"] = ShardedObject(
            "scorer", None if loading else scorer.state_dict(), (shape[2],), (offset[2],), replica_id=mp_rank
        )
    if not loading:
        sd["scheduler"] = scheduler.state_dict()
        sd["training"] = {"iteration": state.iteration, "consumed_samples": state.consumed_samples}
        sd["config"] = state.config
    return sd


def save_checkpoint(
    checkpoint_dir: Path,
    models: list[torch.nn.Module],
    optimizer,
    scheduler,
    scorer: Scorer | None,
    state: TrainingState,
) -> Path:
    """Save on every rank; ``latest`` points at it only once all ranks have finished."""
    target = iteration_dir(checkpoint_dir, state.iteration)
    if dist.get_rank() == 0:
        if target.exists():  # debris of a save that crashed
            shutil.rmtree(target)
        target.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(models, optimizer, scheduler, scorer, state), str(target))
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write_bytes(checkpoint_dir / LATEST, f"{state.iteration}\n".encode())
    dist.barrier()
    return target


def _materialize_optimizer_state(optimizer) -> None:
    """megatron's distributed optimizer builds its load template from its own state, which torch's
    Adam (megatron's fallback without apex/Transformer Engine) only creates at its first step.
    Create it with megatron's own zero-gradient step, as megatron does before loading FSDP
    checkpoints; the checkpoint then overwrites every value that step touched (model weights
    included, which are loaded after it)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        initialize = getattr(inner, "_init_optimizer_states_with_dummy_values", None)
        if initialize is not None and not inner.optimizer.state:
            initialize()


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """Give torch Adam's per-parameter ``step`` the checkpoint's value, one tensor per parameter.

    megatron keeps that step in the param groups of its checkpoint, but loading the distributed
    optimizer's ``dp_reshardable`` state then copies every per-parameter state from the load
    template, ``step`` included, so it would restart from the template's count (and megatron puts
    one shared tensor in every parameter's state, which torch's Adam increments once per
    parameter). Without apex/Transformer Engine megatron uses torch's Adam, whose bias correction
    depends on that step; with their fused Adam the state holds no step.
    """
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded] if len(inners) == 1 else [loaded[i] for i in range(len(inners))]
    for inner, state in zip(inners, states):
        groups = state.get("optimizer", {}).get("param_groups", []) if isinstance(state, dict) else []
        steps = {float(g["step"]) for g in groups if "step" in g}
        if len(steps) != 1 or not hasattr(inner, "optimizer"):
            continue
        step = steps.pop()
        for param_state in inner.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = torch.tensor(step, dtype=param_state["step"].dtype)


def load_checkpoint(
    checkpoint_dir: Path, iteration: int, models: list[torch.nn.Module], optimizer, scheduler, scorer: Scorer | None
) -> TrainingState:
    """Restore everything :func:`save_checkpoint` saved; returns the training state."""
    source = iteration_dir(checkpoint_dir, iteration)
    common = dist_checkpointing.load_common_state_dict(str(source))
    _materialize_optimizer_state(optimizer)
    template = _sharded_state_dict(models, optimizer, scheduler, scorer, None)
    loaded = dist_checkpointing.load(template, str(source))
    for i, model in enumerate(models):
        model.load_state_dict(loaded["model" if len(models) == 1 else f"model{i}"])
    with torch.no_grad():  # the fp32 distributed optimizer's main params are views of the model's
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    _set_rng_state(loaded["rng_state"])
    if scorer is not None:
        if "scorer" not in loaded or loaded["scorer"] is None:
            raise ValueError(f"{source} holds no scorer state: it was saved by a run without scoring")
        scorer.load_state_dict(loaded["scorer"])
    training = common["training"]
    return TrainingState(training["iteration"], training["consumed_samples"], common["config"])


def saved_config(checkpoint_dir: Path, iteration: int) -> dict:
    """The run config stored in a checkpoint (read before building anything)."""
    return dist_checkpointing.load_common_state_dict(str(iteration_dir(checkpoint_dir, iteration)))["config"]
