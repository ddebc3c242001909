"""Worker: megatron-core tensor-parallel GPTs trained by DeepSpeed engines at TP x DP (torchrun).

Step ``t`` trains on the micro-batches of ``common.run_case``'s step ``t`` (DP rank ``r`` takes
``r, r + dp, ...``), so the single-process megatron run is the reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from inrun_megatron import cpu_shims

cpu_shims.install()

from ds_common import ds_config, init_deepspeed, train, with_training_equivalence  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from common import load_canonical_weights, make_data, shape_from_json, token_losses  # noqa: E402


def run(
    shape, *, stage: int, gas: int, mbs: int, steps: int, lr: float, seed: int, scored: bool, second_order: bool = False
) -> dict:
    """Train the case; ``second_order`` also scores the curvature rows (docs/DESIGN.md §2.10)."""
    import deepspeed

    from inrun_megatron import ScoringConfig
    from inrun_megatron.deepspeed import DeepSpeedScorer, MegatronMPU
    from inrun_megatron.deepspeed.scorer import masked_token_mean
    from inrun_megatron.megatron.model import build_gpt

    tp_rank, tp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    cpu_shims.seed(seed)
    model = build_gpt(shape)
    load_canonical_weights(model, seed, tp_rank, tp)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        config=ds_config(stage=stage, gas=gas, mbs=mbs, clip=0.0),
        mpu=MegatronMPU(),
    )
    in_memory = ScoringConfig(accumulate_values=True, second_order=second_order)  # train() reads scorer.values()
    validation = make_data(shape, 2, 2, seed + 1, first_id=10**6)
    scorer = DeepSpeedScorer(engine, validation, token_losses, in_memory) if scored else None

    def batches_of_step(step: int) -> list:
        return make_data(shape, gas * dp, mbs, seed + 100 + step, first_id=1000 * step)[dp_rank::dp]

    return train(engine, scorer, batches_of_step, steps, masked_token_mean(token_losses))


def main() -> None:
    out_dir, payload = Path(sys.argv[1]), json.loads(sys.argv[2])
    init_deepspeed()
    parallel_state.initialize_model_parallel(payload["tp"], 1)
    results = []
    for case in payload["cases"]:
        results.append(with_training_equivalence(run, shape=shape_from_json(case.pop("shape")), **case))
    torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
