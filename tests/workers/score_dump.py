"""Worker: a data-parallel training run that dumps its scores as a pretraining run does (torchrun, gloo).

Arguments: the results directory, the run directory, and JSON ``run_case`` options (with
``shape``). Rank 0 writes the manifest; every data-parallel replica writes its own shard with a
:class:`~inrun_megatron.records.ScoreWriter` (replica 0 also the step table).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from inrun_megatron import cpu_shims

cpu_shims.install()

from megatron.core import parallel_state  # noqa: E402

from inrun_megatron.records import ScoreWriter, write_manifest  # noqa: E402

from common import manifest_for_tests, run_case, shape_from_json  # noqa: E402


def main() -> None:
    out_dir, run_dir, options = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 1)
    if dist.get_rank() == 0:
        write_manifest(run_dir, manifest_for_tests(dist.get_world_size(), config=options))
    dist.barrier()
    writer = ScoreWriter(run_dir, dp_rank=parallel_state.get_data_parallel_rank(), flush_every=2)
    result = run_case(shape_from_json(options.pop("shape")), writer=writer, **options)
    writer.close()
    keep = ("values", "efficiency", "clip_coef", "raw")
    torch.save({key: result[key] for key in keep}, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
