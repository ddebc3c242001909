"""Megatron-Core adapter: scores inside megatron's own layers, schedules and DDP.

Names are imported lazily so that ``inrun_megatron.cpu_shims`` can patch megatron-core
on a CPU-only machine before megatron-core is first imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MegatronScorer", "check_megatron_version", "clip_coefficient"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("inrun_megatron.megatron.scorer"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
