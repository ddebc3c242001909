"""Worker: run cases at several parallel layouts in one launch (torchrun, gloo).

Argument: JSON list of ``{"layout": {"tp": .., "pp": .., "vpp": ..}, "shape": .., "expect_error":
.., **run_case options}``. Model parallelism is re-initialised between layouts (DP is what the
world leaves). Each case runs scored and unscored; the result says whether scoring changed the
training run. A case with ``expect_error`` must fail when attaching: its result is the error.
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

from common import run_case, shape_from_json  # noqa: E402


def _attach_error(shape, case: dict) -> str | None:
    try:
        run_case(shape, **case)
    except (ValueError, NotImplementedError) as error:
        return str(error)
    return None


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    results = []
    for case in cases:
        layout = case.pop("layout")
        parallel_state.initialize_model_parallel(layout.get("tp", 1), layout.get("pp", 1), layout.get("vpp"))
        shape = shape_from_json(case.pop("shape"))
        if case.pop("expect_error") is not None:
            results.append({"error": _attach_error(shape, case)})
            parallel_state.destroy_model_parallel()
            continue
        scored = run_case(shape, **case)
        plain = run_case(shape, scored=False, **case)
        scored["unchanged_by_scoring"] = plain["losses"] == scored["losses"] and all(
            torch.equal(w, scored["weights"][n]) for n, w in plain["weights"].items()
        )
        scored["dp_rank"] = parallel_state.get_data_parallel_rank()
        scored["plain_dp_traffic"] = plain["dp_traffic"]
        del scored["weights"]
        results.append(scored)
        parallel_state.destroy_model_parallel()
    torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
