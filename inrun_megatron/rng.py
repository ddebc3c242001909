"""torch's random streams, captured and restored: a replay of training micro-steps draws the same
dropout masks as the micro-steps did (``docs/DESIGN.md`` §2.10)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class RngState:
    """torch's CPU generator and every CUDA generator (models of plain torch layers draw from
    nothing else; megatron's model-parallel RNG tracker is the Megatron adapter's to add)."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def capture(cls) -> RngState:
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Restore this state when the block exits, however it exits."""
        try:
            yield
        finally:
            self.restore()
