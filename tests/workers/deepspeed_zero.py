"""Worker: score a list of DeepSpeed cases (ZeRO stages, validation splits) on the data-parallel
world started by torchrun; each case also runs unscored to check training equivalence."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ds_common import init_deepspeed, run_deepspeed_case

from inrun_megatron.deepspeed.model import LMShape


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    init_deepspeed()
    results = []
    for case in cases:
        shape = LMShape(**case.pop("shape"))
        scored = run_deepspeed_case(shape, keep_gradients=True, **case)
        plain = run_deepspeed_case(shape, scored=False, **case)
        scored["changed_by_scoring"] = [
            n for n, w in plain["weights"].items() if not torch.equal(w, scored["weights"][n])
        ]
        if plain["losses"] != scored["losses"]:
            scored["changed_by_scoring"].append(f"losses {plain['losses']} -> {scored['losses']}")
        del scored["weights"]
        results.append(scored)
    torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
