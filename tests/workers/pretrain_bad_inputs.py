"""Worker: run ``launch/pretrain_gpt.py``'s main once per bad input, in the same processes.

``argv``: out_dir, the config path, then a JSON list of override lists. Saves per case the exit
code and what rank 0 printed on stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

from inrun_megatron import cpu_shims

cpu_shims.install()

from megatron.core import parallel_state  # noqa: E402

from inrun_megatron.pretrain.train import main as pretrain  # noqa: E402


def main() -> None:
    out_dir, config, cases = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    results = []
    for overrides in cases:
        stderr = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(stderr):
            try:
                pretrain(["--config", config, *overrides])
            except SystemExit as stop:
                code = stop.code
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        results.append({"code": code, "stderr": stderr.getvalue()})
    torch.save(results, out_dir / f"rank{os.environ['RANK']}.pt")  # srun: set by the entry point


if __name__ == "__main__":
    main()
