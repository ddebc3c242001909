"""The process groups the Megatron adapter scores with, passed explicitly.

A caller who runs megatron with its own groups passes its megatron-core ``ProcessGroupCollection``
(0.16 and 0.19 have it) to ``MegatronScorer(pg_collection=...)``, and to ``forward_backward_func``,
which the scorer calls with the caller's arguments; without one the scorer uses megatron's global
groups (``parallel_state``), as megatron's own schedules do. The scorer keeps only the groups it
reads, in a :class:`ScorerGroups`: a fixed set of fields, so what a scorer holds does not depend on
how megatron builds or extends its collection (``docs/DESIGN.md`` §2.7).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass(frozen=True, slots=True)
class ScorerGroups:
    """The groups the Megatron adapter reads (``ProcessGroupCollection`` field names)."""

    tp: dist.ProcessGroup  # tensor parallel
    pp: dist.ProcessGroup  # pipeline parallel
    mp: dist.ProcessGroup  # model parallel: tensor x pipeline
    cp: dist.ProcessGroup  # context parallel
    dp: dist.ProcessGroup  # data parallel
    dp_cp: dist.ProcessGroup  # data parallel with context parallel
    embd: dist.ProcessGroup | None  # stages holding a tied embedding/output weight; None elsewhere

    @property
    def embedding(self) -> dist.ProcessGroup:
        """The tied-embedding group, for a rank that holds a tied embedding/output weight."""
        if self.embd is None:
            raise ValueError("this rank holds a tied embedding/output weight, but pg_collection has no embd group")
        return self.embd


#: Field names of :class:`ScorerGroups`.
SCORER_GROUPS = tuple(f.name for f in fields(ScorerGroups))


def process_groups(pg_collection: ProcessGroupCollection | ScorerGroups | None = None) -> ScorerGroups:
    """The groups of ``pg_collection`` the adapter reads (checked complete), or megatron's global ones."""
    if isinstance(pg_collection, ScorerGroups):
        return pg_collection
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=list(SCORER_GROUPS))
    missing = [name for name in SCORER_GROUPS if name != "embd" and getattr(pg_collection, name, None) is None]
    if missing:
        raise ValueError(
            f"pg_collection has no {', '.join(missing)} group; the scorer needs {', '.join(SCORER_GROUPS)}"
            " (ProcessGroupCollection.use_mpu_process_groups() builds them from megatron's global state)"
        )
    return ScorerGroups(**{name: getattr(pg_collection, name, None) for name in SCORER_GROUPS})
