"""Worker: score a list of DeepSpeed cases (ZeRO stages, validation splits) on the data-parallel
world started by torchrun; each case also runs unscored to check training equivalence."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ds_common import init_deepspeed, run_deepspeed_case, second_order_case, with_training_equivalence

from inrun_megatron.deepspeed.model import llama_shape


def rejection_on_one_rank() -> str:
    """Rank 1 passes micro-batches without sample ids: every rank must raise, none may hang."""
    import deepspeed
    from ds_common import ds_config

    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import TransformerLM, lm_token_losses

    from common import make_data

    shape = llama_shape()
    model = TransformerLM(shape)
    config = ds_config(stage=3, gas=1, mbs=2, clip=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    scorer = DeepSpeedScorer(engine, make_data(shape, 2, 2, 1, first_id=10**6), lm_token_losses)
    batches = make_data(shape, 2, 2, 2)[dist.get_rank() :: 2]
    if dist.get_rank() == 1:
        batches = [{k: v for k, v in b.items() if k != "sample_ids"} for b in batches]
    try:
        scorer.forward_backward(batches)
    except ValueError as e:
        return str(e)
    finally:
        scorer.detach()
        engine.destroy()
    return "accepted"


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    init_deepspeed()
    results = []
    for case in cases:
        shape = llama_shape(**case.pop("shape"))
        results.append(with_training_equivalence(run_deepspeed_case, shape=shape, keep_gradients=True, **case))
    # ZeRO-3 persistence 1100: the norms and attention projections stay gathered between forwards
    zero3 = dict(stage=3, split=True, persistence=1100)
    second_order = {
        (1, False): second_order_case(stage=1, split=False),
        (2, True): second_order_case(stage=2, split=True),
        (3, True): second_order_case(**zero3),
    }
    out = {
        "cases": results,
        "rejection": rejection_on_one_rank(),
        "second_order": second_order,
        "zero3_first_order": second_order_case(**zero3, second_order=False),
    }
    torch.save(out, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
