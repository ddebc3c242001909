"""The process groups the Megatron adapter scores with, passed explicitly.

megatron-core's ``ProcessGroupCollection`` (0.16 and 0.19 have it) names every group; the adapter
reads only the ones in :data:`SCORER_GROUPS`. A caller who runs megatron with its own groups passes
its collection to ``MegatronScorer(pg_collection=...)`` (and to ``forward_backward_func``, which the
scorer calls with the caller's arguments); without one the scorer uses megatron's global groups
(``parallel_state``), as megatron's own schedules do.
"""

from __future__ import annotations

from megatron.core.process_groups_config import ProcessGroupCollection

#: ``ProcessGroupCollection`` fields the adapter uses: tensor, pipeline, model (TP x PP) and context
#: parallel, data parallel without and with context parallelism, and the tied-embedding group
#: (absent, or None, on ranks that hold no tied embedding).
SCORER_GROUPS = ("tp", "pp", "mp", "cp", "dp", "dp_cp", "embd")


def process_groups(pg_collection: ProcessGroupCollection | None = None) -> ProcessGroupCollection:
    """``pg_collection`` checked to hold every group the adapter needs, or megatron's global groups."""
    if pg_collection is None:
        return ProcessGroupCollection.use_mpu_process_groups(required_pgs=list(SCORER_GROUPS))
    missing = [name for name in SCORER_GROUPS if name != "embd" and getattr(pg_collection, name, None) is None]
    if missing:
        raise ValueError(
            f"pg_collection has no {', '.join(missing)} group; the scorer needs {', '.join(SCORER_GROUPS)}"
            " (ProcessGroupCollection.use_mpu_process_groups() builds them from megatron's global state)"
        )
    return pg_collection


def embedding_group(groups: ProcessGroupCollection):
    """The group of the stages that hold a tied embedding/output weight (this rank holds one)."""
    group = getattr(groups, "embd", None)
    if group is None:
        raise ValueError("this rank holds a tied embedding/output weight, but pg_collection has no embd group")
    return group
