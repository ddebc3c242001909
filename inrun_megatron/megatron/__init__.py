"""Megatron-Core adapter: scores inside megatron's own layers, schedules and DDP."""

from inrun_megatron.megatron.scorer import MegatronScorer, check_megatron_version
from inrun_megatron.scorer import clip_coefficient

__all__ = ["MegatronScorer", "check_megatron_version", "clip_coefficient"]
