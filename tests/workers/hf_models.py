"""Worker: Hugging Face causal LMs (tests/hf_common.py) under DeepSpeed on the data-parallel world
started by torchrun, each case scored and again unscored (training equivalence)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ds_common import init_deepspeed, with_training_equivalence
from hf_common import run_hf_case


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    init_deepspeed()
    results = []
    for case in cases:
        result = with_training_equivalence(run_hf_case, **case)
        del result["initial"]  # the test process builds the same model from the same seed
        results.append(result)
    torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
