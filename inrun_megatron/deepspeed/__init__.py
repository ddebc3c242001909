"""DeepSpeed adapter: scores for models trained by a DeepSpeed engine (ZeRO 0-3, TP via megatron-core)."""

from inrun_megatron.deepspeed.scorer import DeepSpeedScorer


def __getattr__(name: str):
    if name == "MegatronMPU":  # needs megatron-core, imported only when asked for
        from inrun_megatron.deepspeed.megatron_tp import MegatronMPU

        return MegatronMPU
    raise AttributeError(name)


__all__ = ["DeepSpeedScorer", "MegatronMPU"]
