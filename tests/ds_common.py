"""DeepSpeed test cases, shared by the pytest process (the single-process reference) and the
multi-process workers: the same model, data and loop at every layout.

Step ``t`` trains on the ``gas * dp`` micro-batches ``make_data(..., seed + 100 + t)``; data-
parallel rank ``r`` takes micro-batches ``r, r + dp, ...``, so a single process with
``gas * dp`` accumulation steps trains on exactly the same global batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from inrun_megatron import cpu_shims
from inrun_megatron.deepspeed.model import TransformerLM, lm_token_losses
from inrun_megatron.deepspeed.scorer import masked_token_mean
from inrun_megatron.distributed import free_port
from inrun_megatron.model_shape import ModelShape

import oracle
from common import BACKEND, DEVICE, make_data, torch_adamw


def init_deepspeed() -> None:
    """DeepSpeed on the (possibly 1-rank) world, with the CPU shims on a CPU-only machine."""
    if DEVICE.type == "cpu":
        cpu_shims.install_deepspeed()
    import deepspeed

    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:  # the pytest process: a world of one
        dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="nccl" if DEVICE.type == "cuda" else "gloo")


def ds_config(
    *, stage: int, gas: int, mbs: int, clip: float, dtype: str = "fp32", fp16_scale_power: int = 8, persistence: int = 0
) -> dict:
    """``persistence``: ZeRO-3 keeps parameters of fewer elements gathered between forwards."""
    return {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": persistence},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "initial_scale_power": fp16_scale_power, "hysteresis": 1},
        "steps_per_print": 10**9,
    }


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's full value by name: the optimizer's fp32 master copy where there is one
    (half precision), ZeRO-3 partitions gathered."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(module.named_parameters())
    out = {}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            master = safe_get_full_fp32_param(p)
            out[name] = (p if master is None else master).detach().clone().double()
    return out


def batch_dot(scorer, grads: dict, target: int = 0) -> tuple[float, float]:
    """``(<a, G>, sum |a_i G_i|)`` of one target over every scored parameter once (tied weights
    once, tensor-parallel duplicates on one rank, shards summed over the model-parallel group) from
    full tensors ``grads[param]`` and fully gathered ``G``: the reference for the library's
    :func:`inrun_megatron.deepspeed.gradient_dot.optimizer_gradient_dot`, which reads only the
    shards each rank owns."""
    total = torch.zeros(2, dtype=torch.float64)
    for p in scorer.grads.params():
        if scorer.counts(p):
            products = grads[p].double() * scorer.grads[p][target].double()
            total += torch.stack([products.sum(), products.abs().sum()]).cpu()
    if scorer.engine.mpu is not None:
        dist.all_reduce(total, group=scorer.engine.mpu.get_model_parallel_group())
    return float(total[0]), float(total[1])


def adam_aware_reference(engine, shape: ModelShape, validation, train, *, steps_taken: int) -> tuple[dict, float]:
    """Brute force of the Adam-aware row (docs/DESIGN.md §1.5) of a step of the LM under DeepSpeed with
    :func:`common.torch_adamw` (eps 1e-8): per sample ``<grad l_z, P ⊙ G>``, ``P`` from the full second
    moment as DeepSpeed's own ``safe_get_full_optimizer_state`` gathers it (the client optimizer's state
    without ZeRO) and ``steps_taken``, and ``<g_t, P ⊙ G>`` from DeepSpeed's full gradient. Call between
    the step's ``forward_backward`` and ``engine.step()``."""
    from deepspeed.utils import safe_get_full_grad, safe_get_full_optimizer_state

    names = {p: n for n, p in engine.module.named_parameters()}
    model = TransformerLM(shape).to(DEVICE)
    weights = full_weights(engine.module)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    g_val = oracle.validation_gradient(model, validation, lm_token_losses)
    pg = {}
    for p in engine.module.parameters():
        if engine.zero_optimization_stage() == 0:
            v = engine.optimizer.state[p]["exp_avg_sq"]
        else:
            v = safe_get_full_optimizer_state(p, "exp_avg_sq")
        pg[names[p]] = oracle.adam_preconditioner_of(v, steps_taken, (0.9, 0.95), 1e-8) * g_val[names[p]].double()
    g_train = {names[p]: safe_get_full_grad(p) for p in engine.module.parameters()}
    return oracle.per_sample_raw(model, train, lm_token_losses, pg), oracle.dot(g_train, pg)


def validation_pass_isolation(scorer) -> dict:
    """Run a validation pass alone and report what it did to DeepSpeed's state."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = list(scorer.engine.module.parameters())
    fired = []
    handles = [p.register_post_accumulate_grad_hook(lambda p: fired.append(p)) for p in params]
    grads = [p.grad for p in params]
    partitions = [p.ds_tensor.clone() for p in params if hasattr(p, "ds_tensor")]
    scorer.validation_pass()
    for h in handles:
        h.remove()
    zero3 = [p for p in params if hasattr(p, "ds_tensor")]
    return {
        "accumulate_grad_hooks_fired": len(fired),
        "grads_untouched": all(p.grad is g for p, g in zip(params, grads)),
        "partitions_unchanged": all(torch.equal(p.ds_tensor, t) for p, t in zip(zero3, partitions)),
        "parameters_released": all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in zero3),
        "zero3_parameters": len(zero3),
    }


def train(engine, scorer, batches_of_step, steps: int, loss_fn, *, keep_gradients: bool = False) -> dict:
    """``steps`` optimizer steps: scored, or (``scorer=None``) DeepSpeed's plain loop.

    Returns ``{"raw": [{row: {sample_id: raw}}], "efficiency": [(sum raw, the scorer's <g, G>, checked
    against the full gradients)], "sgd": [(sum
    of values, <G, w_t - w_t+1>)], "clip": [c_t], "skipped": [...], "losses": [...], "weights":
    {name: full tensor}}``; a row is a target, or under Adam also a target's Adam-aware row
    (``name:adam``, ``G`` replaced by ``P ⊙ G``, from the second step on: docs/DESIGN.md §1.5).
    efficiency and ``abs_raw`` (the sum of |raw|) have one entry per step and row, sgd one per step
    and target under plain SGD only (efficiency and ``abs_raw`` only for applied steps: a skipped
    step's raw is NaN), sums over the global batch; ``path``: the scoring path the scorer chose.
    ZeRO-3 adds the store's memory counts; ``keep_gradients`` adds step 0's ``G`` as
    ``{(target, parameter name): G}``. Plain SGD makes the SGD identity exact. With second-order
    values (docs/DESIGN.md §1.7) ``raw`` also holds the ``name:curvature`` and ``name:second-order``
    rows, and ``efficiency_curvature`` has per applied step and target (sum of curvatures over the
    global batch, the scorer's <g, H_val g>, sum of |curvature|).
    """
    from deepspeed.utils import safe_get_full_grad

    dp_group = engine.data_parallel_group
    names = {p: n for n, p in engine.module.named_parameters()}
    plain_sgd = type(getattr(engine.optimizer, "optimizer", engine.optimizer)) is torch.optim.SGD
    out = {"raw": [], "efficiency": [], "abs_raw": [], "sgd": [], "clip": [], "skipped": [], "losses": []}
    out["efficiency_curvature"] = []
    for step in range(steps):
        data = batches_of_step(step)
        if scorer is None:
            losses = []
            for batch in data:
                loss = loss_fn(engine, batch)
                engine.backward(loss)
                engine.step()
                losses.append(float(loss))
            out["losses"].append(losses)
            continue
        targets = [t.name for t in scorer.targets]
        if step == 0:
            out["isolation"] = validation_pass_isolation(scorer)
            out["path"] = scorer.path
        out["losses"].append(scorer.forward_backward(data, loss_fn))
        if keep_gradients and step == 0:
            if scorer.zero_stage == 3:
                store = scorer.grads
                out["G_memory"] = dict(peak=store.peak_full_numel, full=store.full_numel, local=store.local_numel)
            out["G"] = {}
            for p in scorer.grads.params():
                g = scorer.grads[p]
                out["G"].update({(t, names[p]): g[k].clone() for k, t in enumerate(targets)})
        loss_scale = float(engine.optimizer.loss_scale) if engine.fp16_enabled() else 1.0  # ZeRO keeps grads scaled
        g = {p: safe_get_full_grad(p).double() / loss_scale for p in scorer.grads.params()}
        rows = scorer.score_rows[: scorer.n_store_rows]  # row k of the store of G is score row k
        dots = [batch_dot(scorer, g, k) for k in range(len(rows))]
        before = full_weights(engine.module)
        engine.step()
        result = scorer.end_step()
        records = result.records
        recorded = result.batch_dots  # the library's <g, G>, from each rank's own gradient shards
        after = full_weights(engine.module)
        c = records.columns
        raw = {t: {} for t in dict.fromkeys(c["target"])}  # the first Adam step has no Adam rows
        values = dict.fromkeys(raw, 0.0)
        for t, sid, r, v in zip(c["target"], c["sample_id"].tolist(), c["raw"].tolist(), records.values):
            raw[t][sid] = r
            values[t] += float(v)
        everyone = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(everyone, (raw, values), group=dp_group)
        skipped = result.skipped
        out["raw"].append(raw)
        out["skipped"].append(skipped)
        out["clip"].append(result.clip_coef)
        moved = {p: before[names[p]] - after[names[p]] for p in scorer.grads.params()}
        for k, t in enumerate(rows):
            if t not in raw:
                continue
            if not skipped:
                reference, reference_abs = dots[k]
                assert abs(recorded[t] - reference) <= 1e-9 * reference_abs, (
                    f"step {step}, {t}: the scorer's <g, G> {recorded[t]} != {reference} from the full gradients"
                )
                out["efficiency"].append((sum(sum(r[t].values()) for r, _ in everyone), recorded[t]))
                out["abs_raw"].append(sum(sum(abs(x) for x in r[t].values()) for r, _ in everyone))
            if plain_sgd and t in targets:
                out["sgd"].append((sum(v[t] for _, v in everyone), batch_dot(scorer, moved, k)[0]))
        for t in (f"{target}:curvature" for target in targets):  # scored against H_val g_t, not a row of G
            if t in raw and not skipped:
                curvatures = [x for r, _ in everyone for x in r[t].values()]
                out["efficiency_curvature"].append((sum(curvatures), recorded[t], sum(map(abs, curvatures))))
    out["weights"] = full_weights(engine.module)
    if scorer is not None:
        out["values"] = scorer.values()
        scorer.detach()
    engine.destroy()
    return out


def run_deepspeed_case(
    shape: ModelShape,
    *,
    stage: int,
    gas: int,
    mbs: int,
    steps: int,
    lr: float,
    seed: int,
    clip: float = 1.0,
    split: bool = False,
    scored: bool = True,
    dtype: str = "fp32",
    n_val_batches: int = 3,
    n_targets: int = 1,
    keep_gradients: bool = False,
    fp16_scale_power: int = 8,
    path: str = "auto",
    optimizer: str = "sgd",
    adam_eps: float = 1e-8,
) -> dict:
    """:func:`train` of the plain-PyTorch LM under DeepSpeed (plain SGD, or ``optimizer="adam"``:
    :func:`common.torch_adamw` with ``adam_eps``; clipping at ``clip``); ``n_targets=2`` adds a second validation set,
    ``held-out``; ``path`` is the scoring path."""
    import deepspeed

    from inrun_megatron import ScoringConfig
    from inrun_megatron.deepspeed import DeepSpeedScorer

    dp, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(seed)
    model = TransformerLM(shape)
    config = ds_config(stage=stage, gas=gas, mbs=mbs, clip=clip, dtype=dtype, fp16_scale_power=fp16_scale_power)
    params = list(model.parameters())
    client = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch_adamw(params, lr, adam_eps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)
    validation = {"validation": make_data(shape, n_val_batches, 2, seed + 1, first_id=10**6)}
    if n_targets == 2:
        validation["held-out"] = make_data(shape, n_val_batches, 2, seed + 2, first_id=2 * 10**6)
    scoring = ScoringConfig(validation_split="split" if split else "replicate", path=path, accumulate_values=True)
    scorer = DeepSpeedScorer(engine, validation, lm_token_losses, scoring) if scored else None

    def batches_of_step(step: int) -> list:
        return make_data(shape, gas * dp, mbs, seed + 100 + step, first_id=1000 * step)[rank::dp]

    return train(
        engine, scorer, batches_of_step, steps, masked_token_mean(lm_token_losses), keep_gradients=keep_gradients
    )


def with_training_equivalence(run, **case) -> dict:
    """``run(scored=True, **case)``, plus ``changed_by_scoring``: what differs from the unscored run
    (weights by name, losses); the weights themselves are dropped."""
    scored, plain = run(scored=True, **case), run(scored=False, **case)
    changed = [n for n, w in plain["weights"].items() if not torch.equal(w, scored["weights"][n])]
    if plain["losses"] != scored["losses"]:
        changed.append(f"losses {plain['losses']} -> {scored['losses']}")
    scored["changed_by_scoring"] = changed
    del scored["weights"]
    return scored


def second_order_case(
    *, stage: int, split: bool, steps: int = 2, persistence: int = 0, second_order: bool = True
) -> dict:
    """A run with second-order values (docs/DESIGN.md §2.10; first-order only with ``second_order``
    False, the reference of training equivalence): the LM at ``stage`` with 4 micro-batches of 2 per
    step split over the world's data-parallel ranks (the same global batch at any DP size), plain
    SGD, no clipping; ``persistence``: ZeRO-3's persistence threshold. Returns ``{"steps": per step
    ({row: {sample_id: raw}} of every rank's samples, gathered over data parallelism; {row:
    batch_dot}), "losses": this rank's micro-batch losses, "weights": the final full weights}``."""
    import deepspeed

    from inrun_megatron import ScoringConfig
    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import llama_shape

    dp, rank = dist.get_world_size(), dist.get_rank()
    shape = llama_shape()
    torch.manual_seed(0)
    model = TransformerLM(shape)
    config = ds_config(stage=stage, gas=4 // dp, mbs=2, clip=0.0, persistence=persistence)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), config=config)
    scoring = ScoringConfig(second_order=second_order, validation_split="split" if split else "replicate")
    scorer = DeepSpeedScorer(engine, make_data(shape, 2, 2, seed=6, first_id=10**6), lm_token_losses, scoring)
    out = {"steps": [], "losses": []}
    for step in range(steps):
        out["losses"] += scorer.forward_backward(make_data(shape, 4, 2, seed=5 + step, first_id=100 * step)[rank::dp])
        engine.step()
        result = scorer.end_step()
        rows: dict[str, dict[int, float]] = {}
        c = result.records.columns
        for t, sid, r in zip(c["target"], c["sample_id"].tolist(), c["raw"].tolist()):
            rows.setdefault(t, {})[sid] = r
        everyone = [None] * dp
        dist.all_gather_object(everyone, rows)
        merged = {t: {sid: r for other in everyone for sid, r in other[t].items()} for t in rows}
        out["steps"].append((merged, dict(result.batch_dots)))
    scorer.detach()
    out["weights"] = full_weights(engine.module)
    engine.destroy()
    return out
