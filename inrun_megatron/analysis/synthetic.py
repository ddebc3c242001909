"""Synthetic score dumps of any size, written through the real :class:`~inrun_megatron.records.ScoreWriter`.

For the analysis benchmark and for corner cases that a tiny training run does not produce
(many replicas and parts, repeated epochs, skipped steps, clipping). Every sample has a hidden
"quality" so that values have structure (a heavy-tailed mix of helpful and harmful samples),
and each step records ``batch_dot`` = the sum of its raw scores over all replicas, so the
efficiency identity holds as it does in a real run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inrun_megatron.optimizer_values import SGD, values_manifest
from inrun_megatron.records import Manifest, RunLayout, ScoreWriter, write_manifest
from inrun_megatron.step_result import make_step_result


@dataclass
class SyntheticRun:
    """Shape of a synthetic run: ``steps * replicas * micro_batches * micro_batch_size * len(targets)`` rows."""

    steps: int = 20
    replicas: int = 2
    micro_batches: int = 2
    micro_batch_size: int = 4
    targets: tuple[str, ...] = ("validation",)
    epochs: int = 2
    flush_every: int = 10
    skipped_steps: tuple[int, ...] = ()
    seed: int = 0

    @property
    def rows(self) -> int:
        return self.steps * self.replicas * self.micro_batches * self.micro_batch_size * len(self.targets)

    @property
    def global_batch(self) -> int:
        return self.replicas * self.micro_batches * self.micro_batch_size

    @property
    def samples(self) -> int:
        """Distinct sample ids: each is seen once per epoch."""
        return math.ceil(self.steps * self.global_batch / self.epochs)


def write_synthetic_dump(run_dir: str | Path, run: SyntheticRun) -> Path:
    """Write ``run`` as a score dump in ``run_dir`` (which must not hold score parts yet)."""
    run_dir = Path(run_dir)
    manifest = Manifest(
        entry_point="synthetic",
        config={"synthetic": vars(run) | {"targets": list(run.targets)}},
        layout=RunLayout(
            world_size=run.replicas,
            data_parallel=run.replicas,
            micro_batch_size=run.micro_batch_size,
            num_microbatches=run.micro_batches,
            global_batch_size=run.global_batch,
        ),
        targets=[{"name": t} for t in run.targets],
        values=values_manifest(list(run.targets), [SGD]),
    )
    write_manifest(run_dir, manifest)
    rng = np.random.default_rng(run.seed)
    quality = rng.standard_t(df=3, size=run.samples) * 0.5 + 0.1
    target_scale = 1.0 + 0.5 * np.arange(len(run.targets))
    writers = [ScoreWriter(run_dir, dp_rank=r, flush_every=run.flush_every) for r in range(run.replicas)]
    per_replica = run.micro_batches * run.micro_batch_size
    for step in range(run.steps):
        ids = (np.arange(run.global_batch) + step * run.global_batch) % run.samples
        noise = rng.standard_normal((len(run.targets), run.global_batch))
        decay = 1.0 / (1.0 + step / max(run.steps, 1))
        raw = (quality[ids][None, :] * target_scale[:, None] + 0.3 * noise) * decay
        lr = 1e-3 * (0.5 + 0.5 * math.cos(math.pi * step / max(run.steps, 1)))
        clip = 1.0 if step % 7 else 0.8
        skipped = step in run.skipped_steps
        validation_losses = {t: 3.0 - 0.001 * step for t in run.targets}
        batch_dots = {t: float(raw[k].sum()) for k, t in enumerate(run.targets)}
        for r, writer in enumerate(writers):
            mine = slice(r * per_replica, (r + 1) * per_replica)
            result = make_step_result(
                step=step,
                raw=torch.from_numpy(raw[:, mine]).reshape(len(run.targets), run.micro_batches, -1),
                sample_ids=torch.from_numpy(ids[mine]).reshape(run.micro_batches, -1),
                n_tokens=torch.from_numpy(100 + ids[mine] % 28).reshape(run.micro_batches, -1),
                lr=lr,
                clip_coef=clip,
                skipped=skipped,
                dp_rank=r,
                validation_losses=validation_losses,
                batch_dots=batch_dots,
            )
            writer.write(result)
    for writer in writers:
        writer.close()
    return run_dir
