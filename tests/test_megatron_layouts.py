"""Parallel layouts: every layout gives the single-process scores per sample id (docs/DESIGN.md §1.3, identity 4).

Tensor, pipeline (1F1B and interleaved), sequence and data parallelism, megatron DDP with and
without overlapped, bucketed gradient reduction, the distributed optimizer (with its Adam state
sharded: the Adam-aware scores, docs/DESIGN.md §1.5, must match too), gradient
accumulation fusion, replicated and split validation sets, gradient clipping and bf16. Each
layout trains a few steps of a tiny GPTModel scored and unscored, at micro-batch size 2 (the
per-layer rules) and again at micro-batch size 1 (the microbatch-gradient path, chosen by
``path="auto"``); the test compares the scores with the single-process run of the same options
on the rules path (in this process) and checks, on every layout:

* the efficiency identity ``sum_z raw = <g, G>`` over the global batch;
* the SGD identity ``sum_z lr * c * raw = <G, w_t - w_t+1>`` (plain SGD, clipping included);
* training equivalence: scoring changes no loss and no weight (bitwise);
* the clipping coefficient megatron applied, step by step;
* the validation pass goes once through megatron's schedule and adds no data-parallel
  gradient traffic when the validation set is replicated (exactly one all-reduce of ``G``
  when it is split).
* with second-order values (docs/DESIGN.md §1.7), the per-sample curvature equal to the single
  process's and its efficiency identity ``sum_z curvature = <g, H_val g>`` (under the distributed
  optimizer too, ``g`` gathered from its shards); bf16 weights are refused at attach.

Layouts marked ``pertoken`` train with megatron's ``calculate_per_token_loss=True`` (docs/DESIGN.md
§1.1: each sample's loss term is divided by the token count of the whole global batch, known only
when ``finalize_model_grads`` has reduced it at the end of the step): tensor, pipeline with
accumulation, interleaved, sequence and data parallelism, the distributed optimizer and gradient
accumulation fusion, each on both paths. Their scores are also checked per sample against brute
force (tests/oracle.py, with the global token count the oracle counts itself) at every step, a
brute force with megatron's default per-microbatch normalisation must be far off (a wrong divisor
fails), and the replicas' recorded token counts must sum to the divisor.

The microbatch-gradient path in bf16 scores the weight gradient training computed, rounded to
bf16 by megatron's weight-gradient GEMM, where the rules multiply the same bf16 activations
without rounding: there it is compared with the single-process run of its own path to the fp32
tolerance, and with the rules path to the bf16 unit roundoff.

All layouts of one world size run in one launch (model parallelism re-initialised between
them), so the whole matrix costs two process launches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

import pytest
import torch

from common import CASES, UNIT_ROUNDOFF, brute_force_scores, efficiency_error, make_data, run_case, shape_to_json
from launcher import launch

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
#: How close the curvature of second-order values is to the exact one, relative to its step's largest
#: (docs/DESIGN.md §1.7: a central difference, not exact).
CURVATURE_ACCURACY = {torch.float32: 1e-3, torch.float64: 1e-8}
STEPS = 3
MBS1_STEPS = 2  # the microbatch-gradient runs at micro-batch size 1 (smaller, fewer steps: every layout once more)
SEED = 21


@dataclass(frozen=True)
class Layout:
    name: str
    world: int
    case: str
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    num_layers: int = 4
    dtype: torch.dtype = torch.float32
    config: dict = field(default_factory=dict, hash=False)  # further TransformerConfig options
    options: dict = field(default_factory=dict, hash=False)  # run_case options
    refused: str | None = None  # attaching must fail on every rank with this message

    @property
    def precision(self) -> str | None:
        return "bf16" if self.config.get("bf16") else "fp16" if self.config.get("fp16") else None

    @property
    def per_token_loss(self) -> bool:
        return bool(self.config.get("calculate_per_token_loss"))

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def shape(self, *, parallel: bool):
        """The model; sequence parallelism only where it applies (TP > 1)."""
        from inrun_megatron.megatron.model import GPTShape

        extra = dict(self.config, sequence_parallel=True) if parallel and self.sequence_parallel else self.config
        return GPTShape(num_layers=self.num_layers, params_dtype=self.dtype, extra_config=extra, **CASES[self.case])

    def run_options(self, *, parallel: bool, reference_path: str = "rules") -> dict:
        """run_case options; the single-process reference trains all DP ranks' microbatches, scored
        on ``reference_path`` (the layout itself picks its path automatically)."""
        options = {"n_micro": 2, "mbs": 2, "steps": STEPS, "lr": 0.5, "seed": SEED, **self.options}
        if not parallel:
            options["n_micro"] *= self.dp
            options["path"] = reference_path
        return options

    @property
    def path(self) -> str:
        """The scoring path ``path="auto"`` must choose: document values take the rules at any micro-batch size."""
        options = self.run_options(parallel=True)
        return "microbatch" if options["mbs"] == 1 and options.get("document_eod") is None else "rules"


def at_micro_batch_size_1(layout: Layout) -> Layout:
    """The layout once more at micro-batch size 1, where the microbatch-gradient path scores it."""
    options = {**layout.options, "mbs": 1, "steps": MBS1_STEPS}
    return dataclasses.replace(layout, name=f"{layout.name}-mbs1", options=options)


MEGATRON_DDP = {}  # megatron DDP, gradient reduction after the last microbatch
OVERLAPPED_DDP = {"overlap_grad_reduce": True, "bucket_size": 5000}  # several buckets, reduced during backward
# megatron's distributed optimizer only takes Adam: scores and efficiency are checked, not the SGD identity. Adam's
# P = c / (sqrt(v_hat) + eps) reaches c / eps on coordinates whose gradient so far is fp32 rounding noise, which the
# layouts' summation orders set differently (docs/DESIGN.md §1.5, conditioning): at eps 1e-3 (P at most 530) the
# Adam-aware comparison measures the layouts; test_adam_values checks them against brute force at eps 1e-8.
ADAM_EPS = 1e-3
DISTRIBUTED_ADAM = {"ddp": {"use_distributed_optimizer": True}, "optimizer": "adam", "lr": 1e-3, "adam_eps": ADAM_EPS}
DISTRIBUTED_ADAM_OVERLAPPED = dict(
    DISTRIBUTED_ADAM, ddp={"use_distributed_optimizer": True, "overlap_param_gather": True, **OVERLAPPED_DDP}
)
# megatron's linear backward adds weight gradients to main_grad itself (a CPU stand-in for its CUDA kernel).
FUSION = {"gradient_accumulation_fusion": True}
# megatron's per-token loss: sum of mask * CE per microbatch, gradients divided by the global batch's token count
PER_TOKEN = {"calculate_per_token_loss": True}

LAYOUTS = [
    # Tensor parallelism alone, plain module and torch SGD (fp32 and float64 to 1e-9).
    Layout("tp2-fp32", 2, "layernorm-gelu-bias-untied", tp=2, num_layers=2, options={"n_micro": 3}),
    Layout("tp2-fp64-tied", 2, "rmsnorm-swiglu-nobias-tied-recompute", tp=2, num_layers=2, dtype=torch.float64),
    Layout("tp2-fp64-rope", 2, "layernorm-swiglu-bias-tied-rope", tp=2, num_layers=2, dtype=torch.float64,
           options={"n_micro": 1}),
    Layout("tp4-fp32", 4, "layernorm-gelu-bias-untied", tp=4, num_layers=2, options={"n_micro": 3}),
    Layout("tp4-fp64-tied", 4, "rmsnorm-swiglu-nobias-tied-recompute", tp=4, num_layers=2, dtype=torch.float64),
    Layout("tp4-fp64-rope", 4, "layernorm-swiglu-bias-tied-rope", tp=4, num_layers=2, dtype=torch.float64,
           options={"n_micro": 1}),
    # Megatron DDP and optimizer from here on.
    Layout("1x2x1-accum4-clip", 2, "rmsnorm-swiglu-nobias-tied-recompute", pp=2,
           options={"ddp": MEGATRON_DDP, "n_micro": 4, "clip_grad": 0.05}),
    Layout("1x2x1-vpp2-overlap-pertoken", 2, "layernorm-swiglu-bias-tied-rope", pp=2, vpp=2, config=PER_TOKEN,
           options={"ddp": OVERLAPPED_DDP, "n_micro": 4}),
    Layout("2x1x1-sp-rope-pertoken", 2, "layernorm-swiglu-bias-tied-rope", tp=2, sequence_parallel=True,
           config=PER_TOKEN, options={"ddp": MEGATRON_DDP}),
    Layout("1x1x2-distopt-pertoken", 2, "layernorm-gelu-bias-untied", config=PER_TOKEN, options=DISTRIBUTED_ADAM),
    # Adam with bf16 weights: megatron's mixed-precision optimizer keeps the state on fp32 main copies.
    Layout("1x1x2-bf16-adam", 2, "rmsnorm-swiglu-nobias-tied-recompute", config={"bf16": True},
           options={"ddp": {"grad_reduce_in_fp32": True}, "optimizer": "adam", "lr": 1e-3, "adam_eps": ADAM_EPS}),
    Layout("1x2x1-bf16", 2, "layernorm-gelu-bias-untied", pp=2, config={"bf16": True},
           options={"ddp": {"grad_reduce_in_fp32": True}}),
    Layout("2x2x1-pertoken", 4, "layernorm-swiglu-bias-tied-rope", tp=2, pp=2, config=PER_TOKEN,
           options={"ddp": MEGATRON_DDP, "n_micro": 3}),
    Layout("1x2x2-overlap-split", 4, "rmsnorm-swiglu-nobias-tied-recompute", pp=2,
           options={"ddp": OVERLAPPED_DDP, "validation_split": "split"}),
    # ... with per-token loss and document values (docs/DESIGN.md §2.9): per-token partials of sequence-parallel norms.
    Layout("2x1x2-sp-clip-pertoken-documents", 4, "layernorm-gelu-bias-untied", tp=2, sequence_parallel=True,
           config=PER_TOKEN, options={"ddp": MEGATRON_DDP, "clip_grad": 0.05, "document_eod": 0}),
    Layout("1x1x4-overlap-split", 4, "rmsnorm-gelu-bias-untied-recompute",
           options={"ddp": OVERLAPPED_DDP, "n_micro": 1, "validation_split": "split", "n_val_batches": 4}),
    Layout("2x2x1-vpp2-sp-documents", 4, "rmsnorm-swiglu-nobias-tied-recompute", tp=2, pp=2, vpp=2,
           sequence_parallel=True, options={"ddp": MEGATRON_DDP, "n_micro": 4, "document_eod": 0}),
    Layout("2x1x2-distopt-overlap", 4, "layernorm-swiglu-bias-tied-rope", tp=2, options=DISTRIBUTED_ADAM_OVERLAPPED),
    # Gradient accumulation fusion: tied weights across stages, and on one stage (zero_out_wgrad) under SP.
    Layout("1x2x1-fusion-tied-pertoken", 2, "rmsnorm-swiglu-nobias-tied-recompute", pp=2,
           config=FUSION | PER_TOKEN, options={"ddp": MEGATRON_DDP, "n_micro": 3}),
    Layout("2x1x2-sp-fusion-overlap", 4, "layernorm-swiglu-bias-tied-rope", tp=2, sequence_parallel=True,
           config=FUSION, options={"ddp": OVERLAPPED_DDP}),
    # Second-order values (docs/DESIGN.md §1.7): the curvature pass at TP=2, at DP=2 under overlapped DDP and at
    # PP=2 with the output weight tied across stages, in float64 (the central difference divides layout rounding
    # by 2ε, ε·‖g‖ = 1.5e-8·‖w‖, docs/DESIGN.md §1.7).
    Layout("tp2-fp64-second-order", 2, "rmsnorm-swiglu-nobias-tied-recompute", tp=2, num_layers=2,
           dtype=torch.float64, options={"second_order": True}),
    Layout("1x1x2-fp64-second-order-overlap", 2, "layernorm-gelu-bias-untied", num_layers=2, dtype=torch.float64,
           options={"ddp": OVERLAPPED_DDP, "second_order": True}),
    Layout("1x2x1-fp64-second-order-tied", 2, "rmsnorm-swiglu-nobias-tied-recompute", pp=2, dtype=torch.float64,
           options={"ddp": MEGATRON_DDP, "n_micro": 3, "second_order": True}),
    # ... under the distributed optimizer (fp32, Adam): g_t gathered from its shards (docs/DESIGN.md §2.10).
    Layout("1x1x2-distopt-second-order", 2, "layernorm-gelu-bias-untied", num_layers=2,
           options=dict(DISTRIBUTED_ADAM, second_order=True)),
    Layout("1x1x2-distopt-second-order-overlap", 2, "layernorm-gelu-bias-untied", num_layers=2,
           options=dict(DISTRIBUTED_ADAM_OVERLAPPED, second_order=True)),
    # ... with TP x PP on the interleaved schedule, sequence parallelism and per-token loss (docs/DESIGN.md §2.10:
    # the replay's per-token divisor is the training pass's), the output weight tied across the first and last chunk.
    Layout("2x2x1-vpp2-sp-fp64-second-order-pertoken", 4, "layernorm-swiglu-bias-tied-rope", tp=2, pp=2, vpp=2,
           sequence_parallel=True, dtype=torch.float64, config=PER_TOKEN,
           options={"ddp": MEGATRON_DDP, "n_micro": 4, "second_order": True}),
    Layout("1x1x2-bf16-second-order", 2, "layernorm-gelu-bias-untied", num_layers=2, config={"bf16": True},
           options={"ddp": {"grad_reduce_in_fp32": True}, "second_order": True},
           refused="do not support fp16/bf16 weights"),
    # The interleaved schedule cannot run one validation batch on two stages: refused at attach, on every rank.
    Layout("1x2x1-vpp2-too-few-validation-batches", 2, "layernorm-gelu-bias-untied", pp=2, vpp=2,
           options={"ddp": MEGATRON_DDP, "n_micro": 4, "n_val_batches": 1},
           refused="the interleaved pipeline schedule runs microbatches in groups of 2"),
]  # fmt: skip
LAYOUTS += [at_micro_batch_size_1(x) for x in LAYOUTS if x.refused is None]
SCORED = [x for x in LAYOUTS if x.refused is None]
REFUSED = [x for x in LAYOUTS if x.refused is not None]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``launched(world)``: every rank's results of the layouts of that world size, by name."""
    cache: dict[int, dict[str, list]] = {}

    def get(world: int) -> dict[str, list]:
        if world not in cache:
            layouts = [x for x in LAYOUTS if x.world == world]
            payload = [
                dict(
                    layout={"tp": x.tp, "pp": x.pp, "vpp": x.vpp},
                    shape=shape_to_json(x.shape(parallel=True)),
                    expect_error=x.refused,
                    **x.run_options(parallel=True),
                )
                for x in layouts
            ]
            ranks = launch("megatron_layouts.py", world, tmp_path_factory.mktemp(f"world{world}"), json.dumps(payload))
            cache[world] = {x.name: [results[i] for results in ranks] for i, x in enumerate(layouts)}
        return cache[world]

    return get


@functools.cache
def _reference(name: str, path: str = "rules") -> dict:
    layout = next(x for x in LAYOUTS if x.name == name)
    options = layout.run_options(parallel=False, reference_path=path)
    return run_case(layout.shape(parallel=False), record_weights=layout.per_token_loss, **options)


def _per_token_brute_force(layout: Layout, ranks: list[dict], report: dict) -> None:
    """A per-token-loss layout's scores against brute force at every step (docs/DESIGN.md §1.3,
    identity 3), with the global batch's token count as the divisor: the recorded token counts of
    every replica sum to it, and the default per-microbatch normalisation would be far off."""
    reference, options = _reference(layout.name), layout.run_options(parallel=False)
    shape = layout.shape(parallel=False)
    data = dict(n_micro=options["n_micro"], mbs=options["mbs"], seed=options["seed"])
    extra = dict(n_val_batches=options.get("n_val_batches", 2), document_eod=options.get("document_eod"))
    brute_force = brute_force_scores(shape, reference, **data, **extra)
    default_shape = dataclasses.replace(shape, extra_config={**shape.extra_config, "calculate_per_token_loss": False})
    wrong_divisor = brute_force_scores(default_shape, reference, **data, **extra)
    tol = TOLERANCE[layout.dtype]
    report["max rel error vs brute force"] = _max_error(ranks, {"raw": brute_force})
    assert report["max rel error vs brute force"] <= tol, "scores differ from brute force"
    report["rel error of a per-microbatch divisor"] = _max_error(ranks, {"raw": wrong_divisor})
    assert report["rel error of a per-microbatch divisor"] > 100 * tol, "the test cannot tell the divisors apart"
    for step in range(options["steps"]):
        batch = make_data(
            shape,
            data["n_micro"],
            data["mbs"],
            data["seed"] + 100 + step,
            first_id=1000 * step,
            eod=extra["document_eod"],
        )
        divisor = sum(float(b["loss_mask"].sum()) for b in batch)
        recorded = {sid: n for got in ranks for sid, n in got["n_tokens"][step].items()}
        assert sum(recorded.values()) == divisor, f"step {step}: the replicas' token counts do not sum to the divisor"


def _max_error(ranks: list[dict], reference: dict, key: str = "raw") -> float:
    """Largest ``|raw - raw_ref|`` over every DP rank's samples, relative to the step's largest
    reference score; checks that the DP ranks together report exactly the global batch.
    ``key="raw_adam"``: the Adam-aware scores, of the steps that have them (docs/DESIGN.md §1.5)."""
    worst = 0.0
    for step, ref in enumerate(reference[key]):
        if ref is None:  # no Adam-aware value at the first step: on no rank either
            assert all(got[key][step] is None for got in ranks), f"step {step}: {key} where the reference has none"
            continue
        scale = max(abs(v) for v in ref.values())
        seen: dict[int, float] = {}
        for got in ranks:
            ours = got[key][step]
            assert set(ours) <= set(ref), f"step {step}: sample ids {set(ours) - set(ref)} not in the global batch"
            seen.update(ours)
            worst = max(worst, max(abs(ours[sid] - ref[sid]) for sid in ours) / scale)
        assert sorted(seen) == sorted(ref), f"step {step}: the DP ranks together did not report the global batch"
    return worst


@pytest.mark.parametrize("layout", REFUSED, ids=lambda x: x.name)
def test_unrunnable_layout_is_refused_on_every_rank(launched, layout):
    errors = [got["error"] for got in launched(layout.world)[layout.name]]
    assert all(error is not None and layout.refused in error for error in errors), errors


@pytest.mark.parametrize("layout", SCORED, ids=lambda x: x.name)
def test_layout_gives_single_process_scores(megatron_world, launched, layout):
    ranks = launched(layout.world)[layout.name]
    reference = _reference(layout.name)
    tol = TOLERANCE[layout.dtype]
    options = layout.run_options(parallel=True)
    # The SGD identity needs plain SGD on the model's own weights (not bf16 copies of fp32 ones).
    scored_sgd = options.get("optimizer", "sgd") == "sgd" and layout.precision is None
    efficiency_key = "efficiency residual" + ("" if layout.precision is None else " / (u sum|g G|)")
    report = {"max rel error": _max_error(ranks, reference), efficiency_key: 0.0}
    rules_tol = tol
    if layout.precision is not None and layout.path == "microbatch":
        report["max rel error, same path"] = _max_error(ranks, _reference(layout.name, "microbatch"))
        assert report["max rel error, same path"] <= tol, "the single-process microbatch path scores differently"
        rules_tol = UNIT_ROUNDOFF[layout.precision]
    assert report["max rel error"] <= rules_tol, f"{report['max rel error']:.2e} from the single-process run"
    adam = options.get("optimizer") == "adam"  # Adam-aware scores from the second step on (docs/DESIGN.md §1.5)
    assert [r is not None for r in reference["raw_adam"]] == [adam and step > 0 for step in range(options["steps"])]
    if adam:
        report["Adam max rel error"] = _max_error(ranks, reference, "raw_adam")
        assert report["Adam max rel error"] <= rules_tol, "Adam-aware scores differ from the single-process run"
        report["Adam " + efficiency_key] = 0.0
    if scored_sgd:
        report["SGD residual"] = 0.0
    second_order = options.get("second_order", False)
    if second_order:
        # Each layout's curvature is within the central difference's accuracy A of the exact one (float64:
        # 1e-8 of its scale, docs/DESIGN.md §1.7), so two layouts agree to 2A; the layouts' rounding of G,
        # divided by 2ε, is what differs (measured up to 1.8e-9 at TP=2).
        report["curvature max rel error"] = _max_error(ranks, reference, "raw_curvature")
        assert report["curvature max rel error"] <= 2 * CURVATURE_ACCURACY[layout.dtype], "curvatures differ"
        report["curvature efficiency residual"] = 0.0
    for got in ranks:
        assert got["unchanged_by_scoring"], "scoring changed a loss or weight of the run"
        assert got["clip_coef"] == pytest.approx(reference["clip_coef"], rel=1e-5)
        for total, batch_dot, batch_abs in got["efficiency"]:
            error = efficiency_error((total, batch_dot, batch_abs), tol=tol, precision=layout.precision)
            residual = error * tol if layout.precision is None else error  # relative, or in units of u*sum|gG|
            report[efficiency_key] = max(report[efficiency_key], residual)
            assert error <= 1, f"efficiency: sum of scores {total} != <g, G> {batch_dot}"
        for total, batch_dot, batch_abs in got["efficiency_adam"]:
            error = efficiency_error((total, batch_dot, batch_abs), tol=tol, precision=layout.precision)
            residual = error * tol if layout.precision is None else error
            report["Adam " + efficiency_key] = max(report["Adam " + efficiency_key], residual)
            assert error <= 1, f"Adam efficiency: sum of Adam-aware scores {total} != <g, P G> {batch_dot}"
        assert len(got["efficiency_adam"]) == (options["steps"] - 1 if adam else 0)
        if scored_sgd:
            for total, change in got["sgd"]:
                residual = abs(total - change) / abs(change)
                report["SGD residual"] = max(report["SGD residual"], residual)
                assert residual <= 10 * tol, f"SGD identity: sum of values {total} != <G, w_t - w_t+1> {change}"
        n_targets, steps = 1, options["steps"]
        if second_order:  # the curvature pass: two validation passes and the training microbatches once more
            assert got["paths"] == [layout.path] * 2 * steps, f"path='auto' scored on {got['paths']}"
            assert got["fb_calls"] == [3 * n_targets + 2] * steps
            for total, batch_dot in got["efficiency_curvature"]:
                residual = abs(total - batch_dot) / abs(batch_dot)
                report["curvature efficiency residual"] = max(report["curvature efficiency residual"], residual)
                assert residual <= tol, f"curvature efficiency: sum {total} != <g, H_val g> {batch_dot}"
            assert len(got["efficiency_curvature"]) == steps
        else:
            assert got["paths"] == [layout.path] * steps, f"path='auto' scored on {got['paths']}"
            assert got["fb_calls"] == [n_targets + 1] * steps, "the validation pass is one schedule call per target"
        if layout.dp > 1:
            extra = [s - p for s, p in zip(got["dp_traffic"], got["plain_dp_traffic"])]
            # <g, G> of each score row (G, and P ⊙ G under Adam) is summed over the distributed optimizer's
            # gradient shards, and P is assembled from its shards of the second moment: one all-reduce of
            # every parameter and a flag (docs/DESIGN.md §1.5)
            distributed = options.get("ddp", {}).get("use_distributed_optimizer")
            rows = n_targets * (2 if adam else 1)
            shards = (rows + (got["n_params"] + 1 if adam else 0)) if distributed else 0
            if distributed and second_order:  # g gathered from the shards, <g, H_val g> summed over them
                shards += got["n_grad_buffer"] + n_targets
            if options.get("validation_split") == "split":  # G once, plus the loss sums
                assert extra == [got["n_params"] + n_targets + shards] * steps
            else:
                assert extra == [shards] * steps, "a replicated validation set costs no other data-parallel traffic"
    if layout.per_token_loss:
        _per_token_brute_force(layout, ranks, report)
    if options.get("document_eod") is not None:  # document values, docs/DESIGN.md §2.9
        report["documents max rel error"] = _max_error(ranks, reference, "documents")
        assert report["documents max rel error"] <= tol, "document partials differ from the single-process run"
        report["document sums"] = max(max(got["document_sums"]) for got in [*ranks, reference])
        assert report["document sums"] <= 1e-12, "a sample's document partials do not sum to its score"
        assert max(span for step in reference["documents"] for _, span in step) >= 2
    if options.get("clip_grad"):
        assert max(reference["clip_coef"]) < 1.0, "the clipping layout must actually clip"
    print(f"{layout.name}: " + ", ".join(f"{k} {v:.1e}" for k, v in report.items()))
