"""Shared by the pytest process and the multi-process workers: deterministic tiny GPTs and data.

Every layout builds the same *logical* model: each parameter's full (unsharded) value is
drawn from a generator seeded by its canonical name, then sliced to the local shard. So a
TP=4 run and the single-process reference train identical weights.
"""

from __future__ import annotations

import zlib

import torch

from inrun_megatron.distributed import free_port  # noqa: F401  (used by conftest and workers)
from inrun_megatron.megatron.model import GPTShape, make_batch

# Every layer kind of the local spec appears in at least one fp32 and one float64 case:
# LayerNorm/RMSNorm, GELU MLP/SwiGLU, linear biases on/off (row-parallel biases go through
# skip_bias_add), learned/rotary positions, tied/untied output layer, recomputation on/off,
# one and several microbatches.
CASES = {
    "layernorm-gelu-bias-untied": dict(normalization="LayerNorm", swiglu=False, add_bias_linear=True),
    "rmsnorm-swiglu-nobias-tied-recompute": dict(
        normalization="RMSNorm",
        swiglu=True,
        add_bias_linear=False,
        share_embeddings_and_output_weights=True,
        recompute=True,
    ),
    "layernorm-swiglu-bias-tied-rope": dict(
        swiglu=True, share_embeddings_and_output_weights=True, position_embedding_type="rope"
    ),
    "rmsnorm-gelu-bias-untied-recompute": dict(normalization="RMSNorm", recompute=True),
}


def canonical_names(model: torch.nn.Module) -> dict[torch.nn.Parameter, str]:
    """Layout-independent parameter names: global layer numbers, and the tied output weight
    of a last pipeline stage named after the embedding it copies."""
    names = {}
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(layers[int(parts[2])].layer_number - 1)
        if name == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False):
            parts = ["embedding", "word_embeddings", "weight"]
        names[p] = ".".join(parts)
    return names


def _full_shape(p: torch.nn.Parameter, tp_size: int) -> list[int]:
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp_size
    return shape


def _draw(name: str, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1000 * seed)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    if "norm" in name and name.endswith("weight"):
        return 1.0 + 0.2 * noise
    if name.endswith("bias"):
        return 0.1 * noise
    return 0.08 * noise


@torch.no_grad()
def load_canonical_weights(model: torch.nn.Module, seed: int, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Set every parameter to its shard of the canonical full tensor."""
    glu = model.config.gated_linear_unit
    for p, name in canonical_names(model).items():
        full = _draw(name, _full_shape(p, tp_size), seed)
        if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
            dim = p.partition_dim
            if glu and ".linear_fc1." in name:  # [gate; up] are sharded separately
                full = torch.cat([half.chunk(tp_size, dim)[tp_rank] for half in full.chunk(2, dim)], dim)
            else:
                full = full.chunk(tp_size, dim)[tp_rank]
        p.copy_(full.to(p.dtype))


def make_data(shape: GPTShape, n_micro: int, mbs: int, seed: int, *, first_id: int = 0, masked: bool = True):
    """Microbatches with distinct sample ids, random tokens and (optionally) ragged loss masks."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for m in range(n_micro):
        tokens = torch.randint(0, shape.vocab_size, (mbs, shape.seq_length + 1), generator=g)
        mask = None
        if masked:
            mask = (torch.rand(mbs, shape.seq_length, generator=g) > 0.25).float()
            mask[:, -3:] = 0.0  # padding at the end of every row
        ids = torch.arange(first_id + m * mbs, first_id + (m + 1) * mbs)
        batches.append(make_batch(tokens, ids, mask))
    return batches


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE of vocab-parallel logits ``[b, s, V/tp]`` in their own dtype.

    megatron's own vocab-parallel CE computes in float32; float64 tests need the loss itself
    in float64 to check scores to 1e-9 across layouts (DESIGN §1.3).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    vocab_local = logits.shape[-1]
    shift = logits.detach().amax(-1, keepdim=True)
    torch.distributed.all_reduce(
        shift, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group()
    )
    shifted = logits - shift
    sum_exp = reduce_from_tensor_model_parallel_region(shifted.exp().sum(-1))
    local = labels - tp_rank * vocab_local
    in_range = (local >= 0) & (local < vocab_local)
    picked = shifted.gather(-1, local.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1) * in_range
    return sum_exp.log() - reduce_from_tensor_model_parallel_region(picked)


def token_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-token losses ``[b, s]``; float64 models compute their cross-entropy in float64."""
    if next(model.parameters()).dtype == torch.float64:
        logits = model(batch["tokens"], batch["position_ids"], None)
        return vocab_parallel_cross_entropy(logits, batch["labels"])
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


def forward_step(data_iterator, model):
    """Megatron forward step over :func:`token_losses` with megatron's default loss."""
    import functools

    from inrun_megatron.megatron.model import masked_token_loss

    batch = next(data_iterator)
    return token_losses(model, batch), functools.partial(masked_token_loss, batch["loss_mask"])


def model_dot(model: torch.nn.Module, a: dict, b: dict) -> float:
    """``<a, b>`` over every parameter of ``model``, each tensor-parallel duplicate counted once,
    summed over the model-parallel group (the right-hand sides of the DESIGN §1 identities)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if param_is_not_tensor_parallel_duplicate(p) and a.get(p) is not None:
            total += (a[p].double() * b[p].double()).sum()
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return float(total)


def optimizer_grads(model: torch.nn.Module) -> dict:
    """The gradient the optimizer sees: megatron DDP's ``main_grad``, else ``.grad``."""
    return {p: (p.main_grad if hasattr(p, "main_grad") else p.grad) for p in model.parameters()}


def run_case(
    shape: GPTShape,
    *,
    n_micro: int,
    mbs: int,
    steps: int,
    lr: float,
    seed: int,
    scored: bool = True,
    tp_rank: int = 0,
    tp_size: int = 1,
    n_val_batches: int = 2,
) -> dict:
    """Train ``steps`` plain-SGD steps of a canonical GPT; return per-step scores and checks.

    Returns ``{"raw": [{sample_id: raw}], "efficiency": [(sum raw, <g, G>)], "sgd": [(sum v,
    <G, w_t - w_t+1>)], "losses": [...], "weights": {canonical name: local tensor}}``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from inrun_megatron.megatron import MegatronScorer, cpu_shims
    from inrun_megatron.megatron.model import build_gpt

    cpu_shims.seed(seed)
    model = build_gpt(shape)
    load_canonical_weights(model, seed, tp_rank, tp_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    validation = make_data(shape, n_val_batches, 2, seed + 1, first_id=10**6)
    scorer = MegatronScorer(model, validation) if scored else None
    fb = get_forward_backward_func()
    out = {"raw": [], "efficiency": [], "sgd": [], "losses": []}
    for step in range(steps):
        data = make_data(shape, n_micro, mbs, seed + 100 + step, first_id=1000 * step)
        optimizer.zero_grad(set_to_none=True)
        kwargs = dict(
            forward_step_func=forward_step,
            data_iterator=iter(data),
            model=model,
            num_microbatches=n_micro,
            seq_length=shape.seq_length,
            micro_batch_size=mbs,
        )
        losses = scorer.forward_backward(fb, **kwargs) if scored else fb(**kwargs)
        out["losses"].append(torch.stack([x["lm loss"] for x in losses]).tolist())
        if scored:
            g_val = scorer.grads.target(0)
            before = {p: p.detach().clone() for p in model.parameters()}
            batch_dot = model_dot(model, optimizer_grads(model), g_val)
        optimizer.step()
        if scored:
            records = scorer.end_step(lr=lr)
            c = records.columns
            raw = dict(zip(c["sample_id"].tolist(), c["raw"].tolist()))
            out["raw"].append(raw)
            out["efficiency"].append((sum(raw.values()), batch_dot))
            moved = {p: before[p] - p.detach() for p in model.parameters()}
            out["sgd"].append((float(records.values.sum()), model_dot(model, moved, g_val)))
    out["weights"] = {name: p.detach().clone() for p, name in canonical_names(model).items()}
    if scored:
        out["values"] = scorer.values()
        scorer.detach()
    return out


def shape_to_json(shape: GPTShape) -> dict:
    """A GPTShape as JSON-able dict (dtype by name), to pass to worker processes."""
    d = dict(vars(shape))
    d["params_dtype"] = str(shape.params_dtype).removeprefix("torch.")
    return d


def shape_from_json(d: dict) -> GPTShape:
    return GPTShape(**dict(d, params_dtype=getattr(torch, d["params_dtype"])))
