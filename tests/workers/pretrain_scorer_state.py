"""Worker: ``launch/pretrain_gpt.py``'s main, recording at every checkpoint what the scorer holds.

After each save every rank appends ``{"iteration", "state_dict_bytes", "retained_bytes"}`` (the
pickled ``scorer.state_dict()`` and everything the scorer object keeps besides the model) to
``$INRUN_STATE_OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import torch.distributed as dist

from inrun_megatron import cpu_shims

cpu_shims.install()

from inrun_megatron.pretrain import train  # noqa: E402

from common import retained_bytes  # noqa: E402


def record_after_saving() -> None:
    save = train.Pretraining.save

    def save_and_record(self) -> None:
        save(self)
        path = Path(os.environ["INRUN_STATE_OUT"]) / f"rank{dist.get_rank()}.json"
        seen = json.loads(path.read_text()) if path.exists() else []
        seen.append(
            {
                "iteration": self.iteration,
                "state_dict_bytes": len(pickle.dumps(self.scorer.state_dict())),
                "retained_bytes": retained_bytes(self.scorer),
            }
        )
        path.write_text(json.dumps(seen))

    train.Pretraining.save = save_and_record


if __name__ == "__main__":
    record_after_saving()
    train.main(sys.argv[1:])
