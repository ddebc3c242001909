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

from inrun_megatron.megatron import cpu_shims

cpu_shims.install()

from ds_common import ds_config, full_weights, init_deepspeed  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from common import load_canonical_weights, make_data, model_dot, shape_from_json, token_losses  # noqa: E402


def run(shape, *, stage: int, gas: int, mbs: int, steps: int, lr: float, seed: int, scored: bool) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from inrun_megatron.deepspeed import DeepSpeedScorer, MegatronMPU
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
    scorer = DeepSpeedScorer(engine, make_data(shape, 2, 2, seed + 1, first_id=10**6), token_losses) if scored else None
    out = {"raw": [], "efficiency": [], "losses": []}
    for step in range(steps):
        data = make_data(shape, gas * dp, mbs, seed + 100 + step, first_id=1000 * step)[dp_rank::dp]
        if not scored:
            losses = []
            for batch in data:
                loss = scorer_free_loss(engine, batch)
                engine.backward(loss)
                engine.step()
                losses.append(float(loss))
            out["losses"].append(losses)
            continue
        out["losses"].append(scorer.forward_backward(data))
        params = scorer.grads.params()
        dot = model_dot(
            engine.module, {p: safe_get_full_grad(p) for p in params}, {p: scorer.grads[p][0] for p in params}
        )
        engine.step()
        c = scorer.end_step().columns
        raw = dict(zip(c["sample_id"].tolist(), c["raw"].tolist()))
        everyone = [None] * dp
        dist.all_gather_object(everyone, raw, group=parallel_state.get_data_parallel_group())
        out["raw"].append(raw)
        out["efficiency"].append((sum(sum(r.values()) for r in everyone), dot))
    out["weights"] = full_weights(engine.module)
    if scored:
        scorer.detach()
    engine.destroy()
    return out


def scorer_free_loss(engine, batch):
    losses = token_losses(engine, batch)
    mask = batch["loss_mask"].to(losses)
    return (losses * mask).sum() / mask.sum()


def main() -> None:
    out_dir, payload = Path(sys.argv[1]), json.loads(sys.argv[2])
    init_deepspeed()
    parallel_state.initialize_model_parallel(payload["tp"], 1)
    results = []
    for case in payload["cases"]:
        shape = shape_from_json(case.pop("shape"))
        scored = run(shape, scored=True, **case)
        plain = run(shape, scored=False, **case)
        scored["changed_by_scoring"] = [
            n for n, w in plain["weights"].items() if not torch.equal(w, scored["weights"][n])
        ]
        if plain["losses"] != scored["losses"]:
            scored["changed_by_scoring"].append(f"losses {plain['losses']} -> {scored['losses']}")
        del scored["weights"]
        results.append(scored)
    torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
