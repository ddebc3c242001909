"""Worker: ``launch/pretrain_gpt.py``'s main with one SIGKILL point armed (fault-injection tests).

``INRUN_KILL=<point>:<step>`` (unset: no fault):

* ``step:s`` — rank 0 dies right after the optimizer step of step ``s``, before its rows exist;
* ``flush:s`` — the first score writer to flush the part ending at step ``s`` dies halfway through
  writing it: a genuinely torn Parquet file (rows, no footer) is left where the writer writes;
* ``checkpoint:i`` — rank 0 dies after every rank wrote the checkpoint of iteration ``i`` and
  before ``latest`` names it.

Before dying it prints ``KILLED <point> <step>``. The whole process group dies: the rank and the
helper processes megatron's checkpoint writer started (as when a node fails or the OOM killer
strikes); orphaned helpers would otherwise outlive the run.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch.distributed as dist

from inrun_megatron import cpu_shims

cpu_shims.install()

from megatron.core import dist_checkpointing  # noqa: E402

from inrun_megatron import records  # noqa: E402
from inrun_megatron.megatron.scorer import MegatronScorer  # noqa: E402
from inrun_megatron.pretrain.train import main  # noqa: E402


def die(point: str, step: int) -> None:
    print(f"KILLED {point} {step}", flush=True)
    os.killpg(os.getpgid(0), signal.SIGKILL)  # torchrun starts every rank in its own session


def arm(point: str, step: int) -> None:
    if point == "step":
        end_optimizer_step = MegatronScorer.end_optimizer_step

        def end_then_maybe_die(self, *args, **kwargs):
            if self.step == step and dist.get_rank() == 0:
                die(point, step)
            return end_optimizer_step(self, *args, **kwargs)

        MegatronScorer.end_optimizer_step = end_then_maybe_die
    elif point == "flush":
        write = records.atomic_write_table

        def torn_write(path: Path, table):
            span = records.part_steps(path)
            if path.parent.parent.name == "scores" and span and span[1] == step:
                with open(records.temporary_path(path), "wb") as f:
                    writer = pq.ParquetWriter(f, table.schema)
                    writer.write_table(table.slice(0, table.num_rows // 2))
                    f.flush()
                    os.fsync(f.fileno())
                    die(point, step)  # the footer is never written
            return write(path, table)

        records.atomic_write_table = torn_write
    elif point == "checkpoint":
        save = dist_checkpointing.save

        def save_then_maybe_die(state_dict, directory, *args, **kwargs):
            result = save(state_dict, directory, *args, **kwargs)
            dist.barrier()  # every rank has written its part
            if Path(directory).name == f"iter_{step:07d}" and dist.get_rank() == 0:
                die(point, step)
            return result

        dist_checkpointing.save = save_then_maybe_die
    else:
        raise ValueError(f"unknown kill point {point!r}")


if __name__ == "__main__":
    kill = os.environ.get("INRUN_KILL")
    if kill:
        point, _, at = kill.partition(":")
        arm(point, int(at))
    main(sys.argv[1:])
