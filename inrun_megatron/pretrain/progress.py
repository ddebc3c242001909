"""The progress line and optional TensorBoard / W&B scalars of a pretraining run.

Per logging interval one line::

    step   40/200 | 3.1e+03 tok/s | loss 5.214 | val prose 5.402 code 4.981 | scoring 41% | rows 5120

``scoring`` is the share of step time spent outside the training pass itself: the validation
pass and the score bookkeeping (the per-layer projections run inside the training backward and
are measured side by side by ``inrun-bench``). ``rows`` counts score rows durably written so far
(all data-parallel shards).

Scalars (off by default): loss, validation loss per target, learning rate, throughput, and per
target the sum, mean, spread, extremes and positive fraction of the step's values over the
global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from inrun_megatron.distributed import collective_device
from inrun_megatron.scores import StepRecords


@dataclass
class StepTimes:
    """Wall time of one step, and of the training forward/backward pass inside it."""

    step: float = 0.0
    training_pass: float = 0.0


@dataclass
class IntervalStats:
    steps: int = 0
    time: float = 0.0
    training_pass: float = 0.0
    loss_sum: float = 0.0
    loss_tokens: float = 0.0
    validation_losses: dict[str, float] = field(default_factory=dict)

    def add(self, times: StepTimes, loss_sum: float, loss_tokens: float, validation_losses: dict[str, float]) -> None:
        self.steps += 1
        self.time += times.step
        self.training_pass += times.training_pass
        self.loss_sum += loss_sum
        self.loss_tokens += loss_tokens
        self.validation_losses = dict(validation_losses)


def value_statistics(records: StepRecords, group: dist.ProcessGroup | None) -> dict[str, dict[str, float]]:
    """Per target: statistics of the step's values over the global batch (all DP replicas).

    Call on one rank of every data-parallel replica (``group`` is the data-parallel group)."""
    c = records.columns
    values = records.values
    out = {}
    for target in sorted(set(c["target"].tolist())):
        v = values[(c["target"] == target) & ~c["skipped"]]
        device = collective_device(group)
        sums = torch.tensor([v.size, v.sum(), (v * v).sum(), (v > 0).sum()], dtype=torch.float64, device=device)
        extremes = torch.tensor(
            [v.max() if v.size else -math.inf, -v.min() if v.size else -math.inf], dtype=torch.float64, device=device
        )
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
        n, total, squares, positive = sums.tolist()
        mean = total / n if n else math.nan
        out[target] = {
            "sum": total,
            "mean": mean,
            "std": math.sqrt(max(squares / n - mean * mean, 0.0)) if n else math.nan,
            "max": float(extremes[0]),
            "min": -float(extremes[1]),
            "positive_fraction": positive / n if n else math.nan,
        }
    return out


class ScalarSink:
    """TensorBoard and/or W&B; nothing when both are off."""

    def __init__(self, run_dir: Path, tensorboard: bool, wandb_project: str | None, config: dict):
        self.writers = []
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(("tb", SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
        if wandb_project:
            import wandb

            self.writers.append(("wandb", wandb.init(project=wandb_project, dir=str(run_dir), config=config)))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for kind, writer in self.writers:
            if kind == "tb":
                for name, value in scalars.items():
                    writer.add_scalar(name, value, step)
                writer.flush()
            else:
                writer.log(scalars, step=step)

    def close(self) -> None:
        for kind, writer in self.writers:
            if kind == "tb":
                writer.close()
            else:
                writer.finish()


def check_scalar_backends(tensorboard: bool, wandb_project: str | None) -> None:
    """Refuse a requested backend that is not installed, before any work."""
    import importlib.util

    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("logging.tensorboard is on but tensorboard is not installed (pip install tensorboard)")
    if wandb_project and importlib.util.find_spec("wandb") is None:
        raise ValueError("logging.wandb_project is set but wandb is not installed (pip install wandb)")


def progress_line(
    step: int, total: int, stats: IntervalStats, tokens_per_step: int, rows_written: int, scoring: bool
) -> str:
    tok_s = tokens_per_step * stats.steps / stats.time if stats.time else math.nan
    loss = stats.loss_sum / stats.loss_tokens if stats.loss_tokens else math.nan
    parts = [f"step {step:>{len(str(total))}}/{total}", f"{tok_s:.3g} tok/s", f"loss {loss:.4f}"]
    if scoring:
        val = " ".join(f"{name} {v:.4f}" for name, v in stats.validation_losses.items())
        overhead = 1.0 - stats.training_pass / stats.time if stats.time else math.nan
        parts += [f"val {val}", f"scoring {100 * overhead:.0f}%", f"rows {rows_written}"]
    return " | ".join(parts)


def mean_loss(losses: list[dict], group: dist.ProcessGroup | None) -> tuple[float, float]:
    """(masked loss sum, loss tokens) of a step over the data-parallel group (last stage only)."""
    if not losses:
        return 0.0, 0.0
    total = torch.stack([x["lm loss"].double() for x in losses]).sum(0).to(collective_device(group))
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return float(total[0]), float(total[1])
