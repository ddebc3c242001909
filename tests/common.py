"""Shared by the pytest process and the multi-process workers: deterministic tiny GPTs and data.

Every layout builds the same *logical* model: each parameter's full (unsharded) value is
drawn from a generator seeded by its canonical name, then sliced to the local shard. So a
TP=4 run and the single-process reference train identical weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from inrun_megatron.distributed import free_port  # noqa: F401  (used by conftest and workers)
from inrun_megatron.megatron.model import GPTShape, make_batch

#: Single-process tests run on the GPU when the machine has one (megatron-core unpatched, NCCL for
#: CUDA tensors and gloo for CPU ones); otherwise, and in every multi-process worker (the launcher
#: hides GPUs), on the CPU with the CPU shims.
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
BACKEND = "cpu:gloo,cuda:nccl" if DEVICE.type == "cuda" else "gloo"

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

#: The exactness identity's tolerance (docs/DESIGN.md §1.3): a score's distance from its brute-force
#: value, relative to the largest brute-force score, in fp32 and float64.
EXACTNESS = {torch.float32: 1e-4, torch.float64: 1e-9}


def case_shape(case: str, dtype: torch.dtype = torch.float64) -> GPTShape:
    """The two-layer GPT of ``CASES[case]`` with parameters in ``dtype``."""
    return GPTShape(num_layers=2, params_dtype=dtype, **CASES[case])


#: Unit roundoff of megatron's half-precision compute dtypes: rounding moves x by at most u*|x|.
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}


def efficiency_error(
    efficiency: tuple[float, float, float], *, tol: float | None = None, precision: str | None = None
) -> float:
    """``|sum raw - <g, G>|`` in units of what the arithmetic allows (<= 1 passes).

    In fp32/fp64 (``precision`` None) ``tol * |<g, G>|``. In bf16/fp16 the optimizer's gradient ``g`` is a sum of
    gradients rounded to the compute dtype while the scores are exact products of the same
    activations, so the two sides may differ by rounding ``g``: ``u * sum |g_i G_i|``.
    """
    total, batch_dot, batch_abs = efficiency
    allowed = tol * abs(batch_dot) if precision is None else UNIT_ROUNDOFF[precision] * batch_abs
    return abs(total - batch_dot) / allowed


def verified_efficiency(run_dir, *, steps: int, rtol: float = 1e-5) -> dict[str, dict]:
    """``inrun-scores verify`` of a run directory: no problem found, and the efficiency identity
    checked on all ``steps`` steps of every target to ``rtol`` of the step's sum of |raw|; an
    Adam-aware row (``T:adam``) on every step but the optimizer's first, which has no second moment
    before it (docs/DESIGN.md §1.5). Returns the per-row efficiency check."""
    from inrun_megatron.analysis.commands import verify
    from inrun_megatron.optimizer_values import ADAM, split_row_name

    report = verify(run_dir)
    assert report.ok, report.data["problems"]
    checked = report.data["checked"]["efficiency"]
    for target, e in checked.items():
        expected = steps - 1 if split_row_name(target)[1] == ADAM else steps
        assert e["steps_measured"] == e["steps_applied"] == expected, f"{run_dir} {target}: {e}"
        assert e["max_rel_error"] <= rtol, f"{run_dir} {target}: efficiency residual {e['max_rel_error']:.2e}"
    return checked


def plant_wrong_row(run_dir, step: int, target: str = "validation") -> None:
    """Negate the largest score of ``step`` and ``target`` (a score row) in one part of the dump: its
    sum of raw no longer equals the recorded <g, G> by twice that score, a sizeable share of the
    step's sum of |raw|."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from inrun_megatron.records import part_steps

    part = next(
        p
        for p in sorted(Path(run_dir, "scores").rglob("part-*.parquet"))
        if part_steps(p)[0] <= step <= part_steps(p)[1]
    )
    table = original = pq.read_table(part)
    raw = table.column("raw").to_numpy().copy()
    in_step = (table.column("step").to_numpy() == step) & (
        table.column("target").to_numpy(zero_copy_only=False) == target
    )
    row = int(np.flatnonzero(in_step)[np.argmax(np.abs(raw[in_step]))])
    raw[row] = -raw[row]
    table = table.set_column(table.schema.get_field_index("raw"), "raw", pa.array(raw))
    value = pc.multiply(pc.multiply(table.column("lr"), table.column("clip_coef")), table.column("raw"))
    table = table.set_column(table.schema.get_field_index("value"), "value", value)
    pq.write_table(table.replace_schema_metadata(original.schema.metadata), part)  # the run id stays


def megatron_device_mode() -> contextlib.AbstractContextManager:
    """Keeps megatron code off ``cuda`` device strings, where the tests run on the CPU."""
    from inrun_megatron import cpu_shims

    return cpu_shims.CudaToCpuMode() if DEVICE.type == "cpu" else contextlib.nullcontext()


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


def make_data(
    shape: GPTShape,
    n_micro: int,
    mbs: int,
    seed: int,
    *,
    first_id: int = 0,
    masked: bool = True,
    eod: int | None = None,
    reset_documents: bool = False,
):
    """Microbatches with distinct sample ids, random tokens and (optionally) ragged loss masks.

    With ``eod``, every row also holds end-of-document tokens at random positions (packed documents,
    docs/DESIGN.md §2.9); ``reset_documents`` adds megatron's attention mask and position ids with
    ``reset_attention_mask`` and ``reset_position_ids`` (no token attends across a document boundary)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for m in range(n_micro):
        tokens = torch.randint(0, shape.vocab_size, (mbs, shape.seq_length + 1), generator=g)
        if eod is not None:
            for row in tokens:
                row[torch.randperm(shape.seq_length + 1, generator=g)[:3]] = eod
        mask = None
        if masked:
            mask = (torch.rand(mbs, shape.seq_length, generator=g) > 0.25).float()
            mask[:, -3:] = 0.0  # padding at the end of every row
        ids = torch.arange(first_id + m * mbs, first_id + (m + 1) * mbs)
        batch = make_batch(tokens, ids, mask)
        if reset_documents:
            batch.update(_reset_masks_and_positions(batch["tokens"], eod))
        batches.append({k: v.to(DEVICE) for k, v in batch.items()})
    return batches


def _reset_masks_and_positions(tokens: torch.Tensor, eod: int) -> dict[str, torch.Tensor]:
    """Attention mask ``[b, 1, s, s]`` (True: masked) and position ids as megatron's GPTDataset builds
    them with ``reset_attention_mask`` and ``reset_position_ids``, by megatron's own function."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    masks, positions = [], []
    for row in tokens:
        mask, _, position_ids = _get_ltor_masks_and_position_ids(row, eod, True, True, False, True)
        masks.append(mask)
        positions.append(position_ids)
    return {"attention_mask": torch.stack(masks), "position_ids": torch.stack(positions)}


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE of vocab-parallel logits ``[b, s, V/tp]`` in their own dtype.

    megatron's own vocab-parallel CE computes in float32; float64 tests need the loss itself
    in float64 to check scores to 1e-9 across layouts (docs/DESIGN.md §1.3).
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
    """Per-token losses ``[b, s]`` (hidden states on a stage without the output layer); float64
    models compute their cross-entropy in float64."""
    from megatron.core.utils import get_attr_wrapped_model

    attention_mask = batch.get("attention_mask")  # None: causal over the whole sequence
    if not get_attr_wrapped_model(model, "post_process"):
        return model(batch["tokens"], batch["position_ids"], attention_mask)
    if next(model.parameters()).dtype == torch.float64:
        logits = model(batch["tokens"], batch["position_ids"], attention_mask)
        return vocab_parallel_cross_entropy(logits, batch["labels"])
    return model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"])


def forward_step(data_iterator, model):
    """Megatron forward step over :func:`token_losses` with megatron's default loss. Pipeline
    stages that need no data (neither tokens nor labels) get ``data_iterator=None``."""
    import functools

    from inrun_megatron.megatron.model import masked_token_loss

    if data_iterator is None:
        return model(None, None, None), functools.partial(masked_token_loss, None)
    batch = next(data_iterator)
    return token_losses(model, batch), functools.partial(masked_token_loss, batch["loss_mask"])


def scored_forward_backward(scorer, model: torch.nn.Module, shape: GPTShape, train: list[dict]) -> list:
    """``scorer.forward_backward`` over ``train`` for a single-process model."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return scorer.forward_backward(
        get_forward_backward_func(),
        forward_step_func=forward_step,
        data_iterator=iter(train),
        model=model,
        num_microbatches=len(train),
        seq_length=shape.seq_length,
        micro_batch_size=int(train[0]["tokens"].shape[0]),
    )


def score_one_step(model: torch.nn.Module, shape: GPTShape, train: list[dict], validation, path: str = "auto") -> tuple:
    """One scored forward/backward of a single-process model (no optimizer step) on scoring path
    ``path``, closed with ``lr=1``; returns the detached scorer (its ``grads`` hold ``G``) and the
    step's records."""
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.megatron import MegatronScorer

    scorer = MegatronScorer(model, validation, ScoringConfig(path=path))
    scored_forward_backward(scorer, model, shape, train)
    records = scorer.end_step(lr=1.0).records
    scorer.detach()
    return scorer, records


@contextlib.contextmanager
def data_parallel_traffic():
    """Count the elements all-reduced or reduce-scattered over the data-parallel group (megatron
    DDP's gradient reduction, the scorer's own reductions), and those the scorer all-gathers there
    (the output's size), while the context is open."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import param_and_grad_buffer

    dp_ranks = dist.get_process_group_ranks(parallel_state.get_data_parallel_group(with_context_parallel=True))
    count = [0]

    def counting(collective, input_position: int):
        def wrapper(*args, group=None, **kwargs):
            if group is not None and dist.get_process_group_ranks(group) == dp_ranks:
                count[0] += args[input_position].numel()
            return collective(*args, group=group, **kwargs)

        return wrapper

    all_reduce, all_gather = dist.all_reduce, dist.all_gather_into_tensor
    reduce_scatter = param_and_grad_buffer.dist_reduce_scatter_func
    dist.all_reduce, dist.all_gather_into_tensor = counting(all_reduce, 0), counting(all_gather, 0)
    param_and_grad_buffer.dist_reduce_scatter_func = counting(reduce_scatter, 1)
    try:
        yield count
    finally:
        dist.all_reduce, dist.all_gather_into_tensor = all_reduce, all_gather
        param_and_grad_buffer.dist_reduce_scatter_func = reduce_scatter


def _megatron_training(
    models: list[torch.nn.Module],
    ddp: dict,
    optimizer: str,
    lr: float,
    clip_grad: float,
    fp16_loss_scale: dict,
    adam_eps: float,
):
    """Wrap chunks in megatron's Float16Module (bf16/fp16 configs) and DDP and build megatron's
    optimizer, as megatron's training loop does."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    config = models[0].config
    ddp_config = DistributedDataParallelConfig(**ddp)
    if config.fp16 or config.bf16:
        models = [Float16Module(config, m) for m in models]
    chunks = [DistributedDataParallel(config, ddp_config, m) for m in models]
    if ddp_config.overlap_grad_reduce:
        config.no_sync_func = [c.no_sync for c in chunks]
        config.grad_sync_func = [c.start_grad_sync for c in chunks]
        if len(chunks) == 1:
            config.no_sync_func, config.grad_sync_func = config.no_sync_func[0], config.grad_sync_func[0]
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer=optimizer,
        lr=lr,
        weight_decay=0.0,
        adam_eps=adam_eps,
        sgd_momentum=0.0,
        clip_grad=clip_grad,
        use_distributed_optimizer=ddp_config.use_distributed_optimizer,
        fp16=config.fp16,
        bf16=config.bf16,
        params_dtype=torch.float16 if config.fp16 else torch.bfloat16 if config.bf16 else config.params_dtype,
        **fp16_loss_scale,
    )
    with megatron_device_mode():
        opt = get_megatron_optimizer(opt_config, chunks)
    config.grad_scale_func = opt.scale_loss
    return chunks, opt


def torch_adamw(params: list[torch.nn.Parameter], lr: float, eps: float = 1e-8) -> torch.optim.AdamW:
    """torch's AdamW with GPT pretraining's betas and decoupled weight decay (the megatron CPU fallback)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=eps, weight_decay=0.1)


def run_case(
    shape: GPTShape,
    *,
    n_micro: int,
    mbs: int,
    steps: int,
    lr: float,
    seed: int,
    scored: bool = True,
    n_val_batches: int = 2,
    ddp: dict | None = None,
    optimizer: str = "sgd",
    clip_grad: float = 0.0,
    validation_split: str = "replicate",
    path: str = "auto",
    fp16_loss_scale: dict | None = None,
    adam_eps: float = 1e-8,
    validation: list[dict] | None = None,
    epoch_steps: int | None = None,
    writer=None,
    record_weights: bool = False,
    document_eod: int | None = None,
    second_order: bool = False,
) -> dict:
    """Train ``steps`` steps of a canonical GPT at the initialised parallel layout; return
    per-step scores and the docs/DESIGN.md §1.3 identities.

    Each DP rank trains ``n_micro`` microbatches of the step's ``n_micro * DP`` (so a DP=1 run
    with ``n_micro * DP`` microbatches is its single-process reference). ``ddp=None`` trains the
    bare model with torch SGD (``optimizer="adam"``: :func:`torch_adamw`); otherwise the chunks are
    wrapped in megatron DDP with these
    ``DistributedDataParallelConfig`` options and trained by megatron's ``optimizer`` ("sgd" or
    "adam", with ``adam_eps``), clipping at ``clip_grad`` (0: off); bf16/fp16 configs (``shape.extra_config``) add
    megatron's ``Float16Module`` and mixed-precision optimizer (``fp16_loss_scale``: its loss-scale
    options). ``validation`` replaces the default validation batches. ``path`` is the scoring path
    (``ScoringConfig.path``), resolved at attach for micro-batch size ``mbs``.

    Returns per step: ``raw`` ``{sample_id: raw}`` of this DP rank's samples, ``efficiency``
    ``(sum raw, <g, G>, sum |g_i G_i|)`` and ``sgd`` ``(sum v, <G, w_t - w_t+1>)`` over the global batch,
    ``raw_adam`` ``{sample_id: raw}`` of the Adam-aware rows (None for a step without them: an SGD run, the
    first Adam step) and ``efficiency_adam`` ``(sum raw_adam, <g, P G>, sum |g_i (P G)_i|)`` of the steps with them,
    ``clip_coef``, ``skipped``, ``losses``, ``dp_traffic`` (elements reduced over the DP group
    during the forward/backward call), ``fb_calls`` (calls of megatron's forward_backward_func) and
    ``paths`` (the scoring path of each call that was scored);
    and the final ``weights`` by canonical name.
    With ``epoch_steps``, the data (and sample ids) repeat every ``epoch_steps`` steps. With a
    ``ScoreWriter`` (on one rank per DP replica) as the scorer's sink, every step's result is
    dumped too (its ``<g, G>`` as the step's batch_dot). ``n_tokens`` holds each step's
    ``{sample_id: n_tokens}`` of the records; with ``record_weights``, ``step_weights`` the weights by
    canonical name before each step (for :func:`brute_force_scores`). With ``document_eod`` the data packs documents
    (:func:`make_data`) and the scorer records document values (docs/DESIGN.md §2.9): ``documents`` per step
    ``{(sample_id, span): raw}`` and ``document_sums`` per step the largest ``|sum of a sample's spans - raw|``
    relative to the step's largest ``|raw|``. ``second_order``: also record the curvature
    rows (docs/DESIGN.md §1.7): ``raw_curvature`` ``{sample_id: curvature}`` per step and
    ``efficiency_curvature`` ``(sum curvature over the global batch, recorded <g, H_val g>)``.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_attr_wrapped_model

    from inrun_megatron import cpu_shims
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.megatron import MegatronScorer, clip_coefficient
    from inrun_megatron.megatron.gradient_dot import model_dot, optimizer_gradient_dot
    from inrun_megatron.megatron.model import build_gpt_chunks

    tp_rank, tp_size = (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    cpu_shims.seed(seed)
    models = build_gpt_chunks(shape)
    for model in models:
        load_canonical_weights(model, seed, tp_rank, tp_size)
    if ddp is None:
        params = [p for m in models for p in m.parameters()]
        chunks, opt = (
            models,
            (torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch_adamw(params, lr, adam_eps)),
        )
    else:
        chunks, opt = _megatron_training(models, ddp, optimizer, lr, clip_grad, fp16_loss_scale or {}, adam_eps)
    if validation is None:
        validation = make_data(shape, n_val_batches, 2, seed + 1, first_id=10**6)
    config = ScoringConfig(  # accumulate_values: out['values']
        validation_split=validation_split,
        path=path,
        accumulate_values=True,
        document_eod=document_eod,
        second_order=second_order,
    )
    scorer = (
        MegatronScorer(chunks, validation, config, micro_batch_size=mbs, optimizer=opt, sink=writer) if scored else None
    )
    fb_calls = [0]
    keys = ("raw", "efficiency", "sgd", "clip_coef", "skipped", "losses", "dp_traffic", "fb_calls", "paths")
    keys += ("raw_adam", "efficiency_adam", "n_tokens", "step_weights", "documents", "document_sums")
    keys += ("raw_curvature", "efficiency_curvature")
    out = {key: [] for key in keys}

    def fb(**kwargs):
        fb_calls[0] += 1
        if scored and scorer.scoring is not None:
            out["paths"].append(scorer.scoring)
        return get_forward_backward_func()(**kwargs)

    for step in range(steps):
        batch_index = step % epoch_steps if epoch_steps else step
        data = make_data(
            shape, n_micro * dp_size, mbs, seed + 100 + batch_index, first_id=1000 * batch_index, eod=document_eod
        )
        local = data[dp_rank * n_micro : (dp_rank + 1) * n_micro]
        has_data = [
            get_attr_wrapped_model(c, "pre_process") or get_attr_wrapped_model(c, "post_process") for c in chunks
        ]
        iterators = [iter(local) if needed else None for needed in has_data]
        if record_weights:
            out["step_weights"].append(canonical_weights(models))
        if ddp is not None:
            for chunk in chunks:
                chunk.zero_grad_buffer()
        opt.zero_grad()
        kwargs = dict(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=n_micro,
            seq_length=shape.seq_length,
            micro_batch_size=mbs,
        )
        fb_calls[0] = 0
        with data_parallel_traffic() as traffic:
            losses = scorer.forward_backward(fb, **kwargs) if scored else fb(**kwargs)
        out["dp_traffic"].append(traffic[0])
        out["fb_calls"].append(fb_calls[0])
        out["losses"].append([x["lm loss"].tolist() for x in losses])
        if scored:
            g_val = scorer.grads.target(0)
            before = {p: p.detach().clone() for c in chunks for p in c.parameters()}
            loss_scale = 1.0 if ddp is None else float(opt.get_loss_scale())
            gradient_dot = optimizer_gradient_dot(chunks, g_val, with_abs=True)
            batch_dot, batch_abs = float(gradient_dot.dot[0]) / loss_scale, float(gradient_dot.abs_sum[0]) / loss_scale
            if "validation:adam" in scorer.score_rows:  # the Adam rows: P_t ⊙ G (docs/DESIGN.md §1.5)
                adam_dot = optimizer_gradient_dot(chunks, scorer.grads.target(1), with_abs=True)
                adam_dot = (float(adam_dot.dot[0]) / loss_scale, float(adam_dot.abs_sum[0]) / loss_scale)
        if ddp is None:
            opt.step()
            result = (True, None, None)
        else:
            with megatron_device_mode():
                result = opt.step()
        out["clip_coef"].append(clip_coefficient(result[1], clip_grad))
        out["skipped"].append(not result[0])
        if scored:
            step_result = scorer.end_step(lr=lr) if ddp is None else scorer.end_optimizer_step(opt, result)
            assert (step_result.clip_coef, step_result.skipped) == (out["clip_coef"][-1], out["skipped"][-1])
            records = step_result.records
            c = records.columns
            rows = {name: c["target"] == name for name in scorer.score_rows}
            raw = dict(zip(c["sample_id"][rows["validation"]].tolist(), c["raw"][rows["validation"]].tolist()))
            out["raw"].append(raw)
            n_tokens = c["n_tokens"][rows["validation"]].tolist()
            out["n_tokens"].append(dict(zip(c["sample_id"][rows["validation"]].tolist(), n_tokens)))
            if document_eod is not None:
                d = step_result.documents.columns
                mine = d["target"] == "validation"
                spans = dict(zip(zip(d["sample_id"][mine].tolist(), d["span"][mine].tolist()), d["raw"][mine].tolist()))
                out["documents"].append(spans)
                sums = {sid: math.fsum(v for (s, _), v in spans.items() if s == sid) for sid in raw}
                scale = max(abs(v) for v in raw.values())
                out["document_sums"].append(max(abs(sums[sid] - raw[sid]) for sid in raw) / scale)
            adam = rows.get("validation:adam")
            out["raw_adam"].append(
                dict(zip(c["sample_id"][adam].tolist(), c["raw"][adam].tolist()))
                if adam is not None and adam.any()
                else None
            )
            if out["raw_adam"][-1] is not None:
                adam_sum = torch.tensor(sum(out["raw_adam"][-1].values()), dtype=torch.float64)
                dist.all_reduce(adam_sum, group=parallel_state.get_data_parallel_group())
                assert step_result.batch_dots["validation:adam"] == adam_dot[0]  # what the scorer stores
                out["efficiency_adam"].append((float(adam_sum), *adam_dot))
            curvature = rows.get("validation:curvature")
            if curvature is not None:
                out["raw_curvature"].append(dict(zip(c["sample_id"][curvature].tolist(), c["raw"][curvature].tolist())))
                curvature_sum = torch.tensor(sum(out["raw_curvature"][-1].values()), dtype=torch.float64)
                dist.all_reduce(curvature_sum, group=parallel_state.get_data_parallel_group())
                recorded_dot = step_result.batch_dots["validation:curvature"]
                out["efficiency_curvature"].append((float(curvature_sum), recorded_dot))
            sums = torch.tensor(
                [sum(raw.values()), float(records.values[rows["validation"]].sum())], dtype=torch.float64
            )
            dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
            out["efficiency"].append((float(sums[0]), batch_dot, batch_abs))
            moved = {p: before[p] - p.detach() for p in before}
            out["sgd"].append((float(sums[1]), float(model_dot(chunks, moved, g_val).dot[0])))
            recorded = step_result.batch_dots[scorer.targets[0].name]  # what the scorer stores for the step
            assert recorded == batch_dot or not math.isfinite(batch_dot), (recorded, batch_dot)
    out["weights"] = canonical_weights(models)
    out["n_params"] = sum(p.numel() for c in chunks for p in c.parameters())
    # megatron DDP's gradient buffers, each bucket padded to a multiple of the DP size
    out["n_grad_buffer"] = sum(b.grad_data.numel() for c in chunks if hasattr(c, "ddp_config") for b in c.buffers)
    if scored:
        out["values"] = scorer.values()
        scorer.detach()
    return out


def dumped_run_case(run_dir: Path, shape: GPTShape, manifest, **options) -> dict:
    """:func:`run_case` (single replica, ``options``) with a ``ScoreWriter`` as the scorer's sink, into a new
    dump at ``run_dir`` with ``manifest`` (parts of two steps); returns the run's result."""
    from inrun_megatron.records import ScoreWriter, write_manifest

    write_manifest(run_dir, manifest)
    writer = ScoreWriter(run_dir, dp_rank=0, flush_every=2)
    result = run_case(shape, writer=writer, **options)
    writer.close()
    return result


def top_answer(capsys, run_dir: Path, *options: str) -> dict:
    """``inrun-scores top RUN --json`` of up to 100 samples with ``options``, as its JSON answer (``capsys``:
    pytest's fixture, which the command's output is read from)."""
    import json

    from inrun_megatron.analysis.cli import main

    assert main(["top", str(run_dir), "--json", "--quiet", "-k", "100", *options]) == 0
    return json.loads(capsys.readouterr().out)


def raw_by_sample(records, row: str) -> dict[int, float]:
    """``{sample_id: raw}`` of one score row (``target`` column) of a step's records."""
    c = records.columns
    mine = c["target"] == row
    return dict(zip(c["sample_id"][mine].tolist(), c["raw"][mine].tolist()))


def canonical_weights(models: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """This rank's weights by canonical name (copies)."""
    return {name: p.detach().clone() for m in models for p, name in canonical_names(m).items()}


def brute_force_scores(shape: GPTShape, reference: dict, *, n_micro: int, mbs: int, seed: int, **options) -> list:
    """Per step, ``{sample_id: raw}`` by brute force (tests/oracle.py) for the global batch of a
    single-process :func:`run_case` run with ``record_weights`` (``reference``, its ``n_micro``,
    ``mbs``, ``seed`` and further options): a separate plain model loaded with the run's weights
    before each step, the run's data and validation batches, and the loss normalisation of
    ``shape``'s config (``calculate_per_token_loss``: the global batch's token count, counted by the
    oracle from the data)."""
    from inrun_megatron.megatron.model import build_gpt

    import oracle

    per_token_loss = bool(shape.extra_config.get("calculate_per_token_loss"))
    # plain autograd into .grad: no megatron DDP buffers for gradient accumulation fusion to write into
    model = build_gpt(
        dataclasses.replace(shape, extra_config={**shape.extra_config, "gradient_accumulation_fusion": False})
    )
    validation = make_data(shape, options.get("n_val_batches", 2), 2, seed + 1, first_id=10**6)
    epoch_steps = options.get("epoch_steps")
    out = []
    for step, weights in enumerate(reference["step_weights"]):
        with torch.no_grad():
            for p, name in canonical_names(model).items():
                p.copy_(weights[name])
        batch_index = step % epoch_steps if epoch_steps else step
        data = make_data(
            shape, n_micro, mbs, seed + 100 + batch_index, first_id=1000 * batch_index, eod=options.get("document_eod")
        )
        g_val = oracle.validation_gradient(model, validation, token_losses)
        out.append(oracle.per_sample_raw(model, data, token_losses, g_val, per_token_loss=per_token_loss))
    return out


def shape_to_json(shape: GPTShape) -> dict:
    """A GPTShape as JSON-able dict (dtype by name), to pass to worker processes."""
    d = dict(vars(shape))
    d["params_dtype"] = str(shape.params_dtype).removeprefix("torch.")
    return d


def shape_from_json(d: dict) -> GPTShape:
    return GPTShape(**dict(d, params_dtype=getattr(torch, d["params_dtype"])))


def retained_bytes(root: object) -> int:
    """Bytes of the Python objects, arrays and tensors reachable from ``root``, not counting modules
    (the model it is attached to) or code: what an object like a scorer keeps of its own. Scalars
    are counted at every reference: whether two equal ones are one object is up to the interpreter
    (small ints are), which would make the count depend on their values."""
    import sys
    import types

    import numpy as np

    skipped = (torch.nn.Module, type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)
    seen: set[int] = set()
    total, stack = 0, [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, (int, float, complex, str, bytes)):
            total += sys.getsizeof(obj)
            continue
        if id(obj) in seen or isinstance(obj, skipped):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
            continue
        total += obj.nbytes if isinstance(obj, np.ndarray) else sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        if hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return total


def manifest_for_tests(data_parallel: int = 1, **fields):
    """The manifest of a dump a test writes itself: ``data_parallel`` replicas, one target named
    ``validation`` with its SGD value only, unless ``fields`` say otherwise."""
    from inrun_megatron.optimizer_values import SGD, values_manifest
    from inrun_megatron.records import Manifest, RunLayout

    defaults = dict(
        entry_point="tests",
        config={},
        layout=RunLayout(world_size=data_parallel, data_parallel=data_parallel),
        targets=[{"name": "validation"}],
    )
    fields = defaults | fields
    fields.setdefault("values", values_manifest([t["name"] for t in fields["targets"]], [SGD]))
    return Manifest(**fields)
