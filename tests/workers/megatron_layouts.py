"""Worker: score a list of cases at the tensor-parallel size of the world (torchrun)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from inrun_megatron.megatron import cpu_shims

cpu_shims.install()

from megatron.core import parallel_state  # noqa: E402

from common import run_case, shape_from_json  # noqa: E402


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tp, 1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    results = []
    for case in cases:
        shape = shape_from_json(case.pop("shape"))
        scored = run_case(shape, tp_rank=rank, tp_size=tp, **case)
        plain = run_case(shape, tp_rank=rank, tp_size=tp, scored=False, **case)
        scored["bit_identical_to_unscored"] = plain["losses"] == scored["losses"] and all(
            torch.equal(w, scored["weights"][n]) for n, w in plain["weights"].items()
        )
        del scored["weights"]
        results.append(scored)
    torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
