"""Megatron-Core adapter: scores inside megatron's own layers, schedules and DDP.

Names are imported lazily so that ``inrun_megatron.cpu_shims`` can patch megatron-core
on a CPU-only machine before megatron-core is first imported.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = ["MegatronScorer", "check_megatron_version", "clip_coefficient"]


def quiet_library_warnings() -> None:
    """megatron-core warns on import about missing Apex/Transformer Engine kernels and
    deprecations, and torch's checkpointing about deprecations, on every rank; none of it is
    actionable for a user of the entry points or ``inrun-bench``. Call before megatron-core is
    imported."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch\.distributed\.checkpoint)\.")


#: Where each public name lives (the version check belongs to the megatron-core layer support).
_HOMES = {
    "MegatronScorer": "inrun_megatron.megatron.scorer",
    "check_megatron_version": "inrun_megatron.megatron_core_layers",
    "clip_coefficient": "inrun_megatron.megatron.scorer",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
