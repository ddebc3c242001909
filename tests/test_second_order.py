"""Second-order values in the Megatron and DeepSpeed adapters (docs/DESIGN.md §1.7, §2.10).

* The central difference that gives ``H_val g_t`` against the exact double-backward product on a
  float64 model, to the error its remainder formula predicts.
* Each sample's curvature ``<grad l_z, H_val g_t>`` recorded by the Megatron adapter against brute
  force (one backward per sample, dotted with an independently computed ``H_val g_t``), its
  efficiency identity ``Σ_z curvature = <g_t, H_val g_t>``, the value formula of the rows, and
  bitwise-identical training with the curvature pass on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle
from common import (
    CASES,
    dumped_run_case,
    load_canonical_weights,
    make_data,
    manifest_for_tests,
    raw_by_sample,
    run_case,
    scored_forward_backward,
    token_losses,
    top_answer,
    torch_adamw,
)

LR = 0.5


def _gpt_shape(**options):
    """A float64 GPT (megatron-core layers); RMSNorm unless ``options`` say otherwise."""
    from inrun_megatron.megatron.model import GPTShape

    return GPTShape(**{"num_layers": 2, "params_dtype": torch.float64, "normalization": "RMSNorm", **options})


class _TinyLM(torch.nn.Module):
    """A float64 next-token model of ops whose derivatives up to the fourth torch computes correctly.

    Not :class:`inrun_megatron.fidelity.TinyCausalLM`: torch's ``layer_norm`` has a correct double
    backward (Hessian-vector products) but not a correct fourth derivative (13 % off a central
    difference of its third), which the remainder below needs.
    """

    def __init__(self, vocab: int = 11, hidden: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(2 * hidden, hidden)
        self.mlp = torch.nn.Linear(hidden, hidden)
        self.output_layer = torch.nn.Linear(hidden, vocab)
        self.to(torch.float64)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens[:, :-1])
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        h = torch.tanh(self.mix(torch.cat([x, previous], -1)))
        h = h + torch.nn.functional.gelu(self.mlp(h))
        logits = self.output_layer(h)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _fourth_derivative(params, loss_fn, g):
    """``D⁴L[g, g, g, ·] = ∇_w D³L[g, g, g]``: the third derivative of the gradient along ``g``, by
    four nested backward passes (plain torch ops throughout)."""

    def along_g(tensors, create_graph=True):
        return torch.autograd.grad(sum((a * b).sum() for a, b in zip(tensors, g)), params, create_graph=create_graph)

    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    return along_g(along_g(along_g(grads)), create_graph=False)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize("relative_step", [1e-2, 1e-3])
def test_central_difference_error_is_its_remainder(relative_step):
    """With ``f(τ) = ∇L(w + τg)``, Taylor's theorem with integral remainder on both sides gives
    ``u_fd − H g = (1/2ε) ∫₀^ε (ε−τ)²/2 · (f⁽³⁾(τ) + f⁽³⁾(−τ)) dτ``, ``f⁽³⁾ = D⁴L[g, g, g, ·]``, so
    ``‖u_fd − H g‖ ≤ (ε²/6)·sup‖D⁴L[g, g, g, ·]‖`` over the segment. The integral is evaluated by
    8-node Gauss-Legendre quadrature of the exact fourth derivative; what is left is the rounding
    of the two float64 gradients divided by ``2ε``."""
    from inrun_megatron.second_order import central_difference_hvp, validation_hessian_vector_product

    model = _TinyLM()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    validation = torch.randint(0, 11, (3, 6), generator=gen)
    train = torch.randint(0, 11, (4, 6), generator=gen)

    def val_loss():
        return model.loss(validation)

    g = [t.detach() for t in torch.autograd.grad(model.loss(train), params)]
    w0 = [p.detach().clone() for p in params]
    eps = relative_step * float(_flat(w0).norm()) / float(_flat(g).norm())
    exact = _flat(validation_hessian_vector_product(params, val_loss, g))

    def gradient_at():
        return [t.detach() for t in torch.autograd.grad(val_loss(), params)]

    out = [torch.empty_like(p) for p in params]
    central_difference_hvp(params, g, eps, gradient_at, out)
    assert all(torch.equal(p, w) for p, w in zip(params, w0))  # restored bitwise
    error = _flat(out) - exact

    nodes, weights = np.polynomial.legendre.leggauss(8)
    predicted = torch.zeros_like(exact)
    sup_d4 = 0.0
    for x, wq in zip(nodes, weights):
        tau = 0.5 * eps * (x + 1.0)  # [0, ε]
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, w, v in zip(params, w0, g):
                    p.copy_(w + sign * tau * v)
            t = _flat(_fourth_derivative(params, val_loss, g))
            sup_d4 = max(sup_d4, float(t.norm()))
            predicted += (0.5 * eps * wq) * (eps - tau) ** 2 / 2 * t / (2 * eps)
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)
    # rounding: each gradient is a few hundred float64 operations deep per entry on this model
    rounding = 1e3 * torch.finfo(torch.float64).eps * float(_flat(gradient_at()).norm()) / eps
    print(f"ε·‖g‖/‖w‖ {relative_step}: ‖u_fd − Hg‖ {float(error.norm()):.3e}, predicted {float(predicted.norm()):.3e}")
    assert float((error - predicted).norm()) <= 1e-6 * float(predicted.norm()) + rounding
    assert float(error.norm()) <= eps**2 / 6 * sup_d4 + rounding
    assert float(error.norm()) >= 0.5 * float(predicted.norm())  # the remainder is what the difference errs by


@pytest.mark.megatron
@pytest.mark.parametrize("mbs", [3, 1], ids=["rules", "microbatch"])
def test_curvature_matches_brute_force_and_efficiency(megatron_world, mbs):
    """Per sample: the recorded curvature against the oracle's per-sample gradient dotted with
    ``H_val g_t`` by exact double backward (megatron-core at TP=1 in float64 with the tests' own
    float64 cross-entropy is twice differentiable; at TP>1 its collectives are not), within the
    central difference's bound; and against the same central difference computed by the oracle."""
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.megatron.model import build_gpt
    from inrun_megatron.second_order import second_order_step_values, validation_hessian_vector_product

    # RMSNorm: the bound below needs the fourth derivative, which torch gets wrong through layer_norm
    shape = _gpt_shape()
    model = build_gpt(shape)
    load_canonical_weights(model, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    scorer = MegatronScorer(model, validation, ScoringConfig(second_order=True))
    assert scorer.score_rows == ["validation", "validation:curvature", "validation:second-order"]
    n_val = sum(float(b["loss_mask"].sum()) for b in validation)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def val_loss():
        return sum((token_losses(model, b) * b["loss_mask"]).sum() for b in validation) / n_val

    rounding_units = 1e3 * torch.finfo(torch.float64).eps  # as in test_central_difference_error_is_its_remainder
    for step in range(2):
        train = make_data(shape, 6 // mbs, mbs, seed=5 + step, first_id=100 * step)
        optimizer.zero_grad(set_to_none=True)
        scored_forward_backward(scorer, model, shape, train)
        g_train = {n: p.grad.clone() for n, p in zip(names, params)}
        g_list = [g_train[n] for n in names]
        hvp = dict(zip(names, validation_hessian_vector_product(params, val_loss, g_list)))
        reference = oracle.per_sample_raw(model, train, token_losses, hvp)
        gradient_norms = oracle.per_sample_raw(
            model, train, token_losses, hvp, combine=lambda a, _: _flat(a.values()).norm()
        )
        # ‖u_fd − Hg‖ ≤ (ε²/6)·sup‖D⁴L[g, g, g, ·]‖ + rounding/ε (test_central_difference_error_is_its_remainder); over
        # [w − εg, w + εg], ε·‖g‖ = 1.5e-8·‖w‖, that norm moves by far less than the factor 2 allowed here.
        eps = scorer.finite_difference_step
        t_norm = float(_flat(_fourth_derivative(params, val_loss, g_list)).norm())
        g_val_norm = float(_flat(torch.autograd.grad(val_loss(), params)).norm())
        hvp_error = eps**2 / 6 * 2 * t_norm + rounding_units * g_val_norm / eps
        optimizer.step()
        result = scorer.end_step(lr=LR)
        ours = raw_by_sample(result.records, "validation:curvature")
        assert sorted(ours) == sorted(reference)
        errors = {sid: abs(ours[sid] - reference[sid]) for sid in reference}
        worst = max(errors[sid] / (float(gradient_norms[sid]) * hvp_error) for sid in reference)
        scale = max(abs(v) for v in reference.values())
        print(
            f"mbs{mbs} step {step}: ε {eps:.2e}, curvature max error {max(errors.values()) / scale:.1e} relative,"
            f" {worst:.2f} of the central difference's bound"
        )
        assert worst <= 1.0
        # and within the accuracy docs/DESIGN.md §1.7 states for float64 (the bound above is dominated by its
        # allowance for rounding at this small ε)
        assert max(errors.values()) <= 1e-8 * scale
        # efficiency: Σ_z curvature = <g_t, u>, u the scorer's central difference (recorded) and within the
        # bound of the exact one
        batch_bound = float(_flat(g_list).norm()) * hvp_error
        assert abs(sum(ours.values()) - oracle.dot(g_train, hvp)) <= batch_bound + 1e-12 * scale
        assert sum(ours.values()) == pytest.approx(result.batch_dots["validation:curvature"], rel=1e-10)
        # the values: the curvature row's is the second-order term, the second-order row's the whole value
        c, values = result.records.columns, result.records.values
        row = {name: c["target"] == name for name in scorer.score_rows}
        curvature, raw = c["raw"][row["validation:curvature"]], c["raw"][row["validation"]]
        assert np.array_equal(values[row["validation:curvature"]], -0.5 * LR * LR * curvature)
        second = second_order_step_values(raw, curvature, LR, 1.0, False)
        assert values[row["validation:second-order"]] == pytest.approx(second, rel=1e-12, abs=1e-15)
        assert second == pytest.approx(values[row["validation"]] + values[row["validation:curvature"]], rel=1e-12)
        dots = result.batch_dots
        expected = dots["validation"] - LR / 2 * dots["validation:curvature"]
        assert dots["validation:second-order"] == pytest.approx(expected, rel=1e-12)
        assert c["raw"][row["validation:second-order"]].sum() == pytest.approx(expected, rel=1e-9)
    scorer.detach()


@pytest.mark.megatron
@pytest.mark.parametrize(
    "ddp", [None, {}, {"overlap_grad_reduce": True, "bucket_size": 5000}], ids=["bare", "ddp", "overlap"]
)
def test_training_is_unchanged_by_the_curvature_pass(megatron_world, ddp):
    """Identity 5 of docs/DESIGN.md §1.3 with the curvature pass on: bitwise the same losses and
    weights, with dropout (the replay draws the training pass's masks and leaves the RNG where
    training left it) and under megatron DDP (its gradient buffers hold g_t across the pass)."""
    shape = _gpt_shape(params_dtype=torch.float32, dropout=0.2, **CASES["rmsnorm-swiglu-nobias-tied-recompute"])
    kwargs = dict(n_micro=3, mbs=2, steps=2, lr=LR, seed=11, ddp=ddp)
    plain = run_case(shape, scored=False, **kwargs)
    scored = run_case(shape, second_order=True, **kwargs)
    assert scored["losses"] == plain["losses"]
    for name, w in plain["weights"].items():
        assert torch.equal(scored["weights"][name], w), name
    assert len(scored["efficiency_curvature"]) == 2
    for total, batch_dot in scored["efficiency_curvature"]:
        assert total == pytest.approx(batch_dot, rel=1e-4)  # fp32


@pytest.mark.megatron
def test_dump_holds_the_second_order_rows_and_the_analysis_reads_them(megatron_world, tmp_path, capsys):
    """A dumped run with second-order values: ``inrun-scores verify`` checks the efficiency identity of
    every row (``Σ κ = <g, H_val g>``), and ``--value second-order`` reads the accumulated
    second-order value, the sum of each sample's SGD and curvature-term values."""
    from inrun_megatron.analysis.cli import main
    from inrun_megatron.analysis.commands import verify
    from inrun_megatron.optimizer_values import CURVATURE, SECOND_ORDER, SGD, values_manifest

    run = tmp_path / "run"
    manifest = manifest_for_tests(values=values_manifest(["validation"], [SGD, CURVATURE, SECOND_ORDER]))
    result = dumped_run_case(run, _gpt_shape(), manifest, n_micro=2, mbs=2, steps=3, lr=LR, seed=4, second_order=True)
    report = verify(run)
    assert report.ok, report.data["problems"]
    checked = report.data["checked"]["efficiency"]
    assert sorted(checked) == ["validation", "validation:curvature", "validation:second-order"]
    for row in checked.values():
        assert row["steps_measured"] == 3 and row["max_rel_error"] <= 1e-9

    answer = top_answer(capsys, run, "--value", "second-order")
    assert answer["target"] == "validation:second-order"
    reference = {
        sid: LR * raw[sid] - LR * LR / 2 * curvature[sid]
        for raw, curvature in zip(result["raw"], result["raw_curvature"])
        for sid in raw
    }
    assert {s["sample_id"]: s["value"] for s in answer["samples"]} == pytest.approx(reference, rel=1e-12)
    # the curvature row, named in full: the merge sums its second-order terms -(lr²/2)·κ
    answer = top_answer(capsys, run, "--target", "validation:curvature")
    assert answer["target"] == "validation:curvature"
    terms = {sid: -LR * LR / 2 * curvature[sid] for curvature in result["raw_curvature"] for sid in curvature}
    assert {s["sample_id"]: s["value"] for s in answer["samples"]} == pytest.approx(terms, rel=1e-12)
    assert top_answer(capsys, run)["target"] == "validation"  # the default stays the SGD value under SGD
    assert main(["top", str(run), "--value", "adam", "--quiet"]) == 2
    assert "second-order values with ScoringConfig(second_order=True)" in capsys.readouterr().err


@pytest.mark.megatron
@pytest.mark.parametrize("ddp", [{}, {"overlap_grad_reduce": True, "bucket_size": 5000}], ids=["ddp", "overlap"])
def test_curvature_under_megatron_ddp_equals_the_bare_model(megatron_world, ddp):
    """Under megatron DDP the gradient buffers hold g_t when the curvature pass starts; its validation
    passes must start from zero, as the bare model's (checked against brute force above) do."""
    shape = _gpt_shape(**CASES["rmsnorm-swiglu-nobias-tied-recompute"])
    kwargs = dict(n_micro=3, mbs=2, steps=2, lr=LR, seed=11, second_order=True)
    bare = run_case(shape, **kwargs)
    wrapped = run_case(shape, ddp=ddp, **kwargs)
    for ours, reference in zip(wrapped["raw_curvature"], bare["raw_curvature"]):
        assert sorted(ours) == sorted(reference)
        scale = max(abs(v) for v in reference.values())
        # float64, the same central difference: what differs is the rounding of the two G, ~1e-10 of the
        # curvature at ε·‖g‖/‖w‖ = 1.5e-8 (docs/DESIGN.md §1.7)
        assert max(abs(ours[sid] - reference[sid]) for sid in reference) <= 1e-9 * scale


@pytest.mark.megatron
def test_second_order_rows_beside_adam_rows(megatron_world):
    """With Adam and second-order values both on, the optimizer's first step (no Adam rows,
    docs/DESIGN.md §1.5) still records its curvature and second-order rows, and later steps all four."""
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.megatron import MegatronScorer
    from inrun_megatron.megatron.model import build_gpt

    shape = _gpt_shape()
    model = build_gpt(shape)
    load_canonical_weights(model, seed=3)
    optimizer = torch_adamw(list(model.parameters()), 1e-3)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    scorer = MegatronScorer(model, validation, ScoringConfig(second_order=True), optimizer=optimizer)
    rows = ["validation", "validation:adam", "validation:curvature", "validation:second-order"]
    assert scorer.score_rows == rows
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        scored_forward_backward(scorer, model, shape, make_data(shape, 3, 2, seed=5 + step, first_id=100 * step))
        optimizer.step()
        result = scorer.end_step(lr=1e-3)
        expected = [r for r in rows if step > 0 or r != "validation:adam"]
        assert result.score_rows == expected
        assert list(dict.fromkeys(result.records.columns["target"])) == expected
    scorer.detach()


def _deepspeed_engine(
    shape,
    *,
    stage: int,
    gas: int,
    mbs: int,
    dtype: str = "fp32",
    seed: int = 0,
    persistence: int = 0,
    adam_lr: float | None = None,
):
    """The LM under DeepSpeed, stepped by plain SGD at ``LR`` or (``adam_lr``) torch's AdamW."""
    import deepspeed
    from ds_common import ds_config

    from inrun_megatron.deepspeed.model import TransformerLM

    torch.manual_seed(seed)
    model = TransformerLM(shape)
    config = ds_config(stage=stage, gas=gas, mbs=mbs, clip=0.0, dtype=dtype, persistence=persistence)
    params = list(model.parameters())
    client = torch.optim.SGD(params, lr=LR) if adam_lr is None else torch_adamw(params, adam_lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)
    return engine


def _deepspeed_curvature_reference(engine, shape, validation, train) -> tuple[torch.nn.Module, dict, float]:
    """Brute force of the curvature rows at the engine's current weights, in float64 (fp32: DeepSpeed
    reduces no float64 gradients): a float64 copy of the model, ``g_t`` by plain autograd of the
    step's loss (the mean over the micro-batches of their masked token means), ``H_val g_t`` by
    exact double backward, one backward per sample dotted with it. Returns the float64 model,
    ``{sample_id: curvature}`` and ``<g_t, H_val g_t>``."""
    from ds_common import full_weights

    from inrun_megatron.deepspeed.model import TransformerLM, lm_token_losses
    from inrun_megatron.second_order import validation_hessian_vector_product

    model = TransformerLM(shape).double()
    weights = full_weights(engine.module)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(weights[name])
    params = list(named.values())
    n_val = sum(float(b["loss_mask"].sum()) for b in validation)

    def val_loss():
        return sum((lm_token_losses(model, b) * b["loss_mask"]).sum() for b in validation) / n_val

    step_loss = sum(
        (lm_token_losses(model, b) * b["loss_mask"]).sum() / b["loss_mask"].sum() / len(train) for b in train
    )
    g_list = [t.detach() for t in torch.autograd.grad(step_loss, params)]
    # torch's fused CPU attention kernel has no double backward; its math kernel computes the same product
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        hvp = dict(zip(named, validation_hessian_vector_product(params, val_loss, g_list)))
    reference = oracle.per_sample_raw(model, train, lm_token_losses, hvp)
    return model, reference, oracle.dot(dict(zip(named, g_list)), hvp)


def _deepspeed_central_difference_reference(engine, shape, validation, train, model64, step: float) -> tuple:
    """Each sample's gradient (``model64``, float64) dotted with the fp32 central difference the curvature
    pass takes (docs/DESIGN.md §1.7), written out here on an fp32 copy of the model at the engine's
    weights, with the engine's reduced ``g_t`` and the scorer's ``ε``: the pass's arithmetic without
    DeepSpeed, so the rows are held to it far more tightly than to the exact product, which they
    miss by the central difference's own error. Returns ``{sample_id: curvature}`` and ``<g_t, u>``.
    Call between ``forward_backward`` and ``engine.step()``."""
    from deepspeed.utils import safe_get_full_grad
    from ds_common import full_weights

    from inrun_megatron.deepspeed.model import TransformerLM, lm_token_losses

    weights = full_weights(engine.module)
    g = {n: safe_get_full_grad(p).detach().float() for n, p in engine.module.named_parameters()}
    model = TransformerLM(shape).eval()
    named = dict(model.named_parameters())
    n_val = sum(float(b["loss_mask"].sum()) for b in validation)
    gradients = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(weights[name].float() + (sign * step) * g[name])
        loss = sum((lm_token_losses(model, b) * b["loss_mask"]).sum() for b in validation) / n_val
        gradients.append(dict(zip(named, torch.autograd.grad(loss, list(named.values())))))
    u = {n: ((gradients[0][n] - gradients[1][n]) / (2.0 * step)).double() for n in named}
    return oracle.per_sample_raw(model64, train, lm_token_losses, u), oracle.dot(g, u)


def _check_curvature_rows(result, reference: dict, batch_dot: float, lr: float, accuracy: float) -> float:
    """The recorded curvature rows against their brute force, per sample within ``accuracy`` of the
    largest, and their sum against the brute force's ``<g_t, u>`` within ``accuracy``; their efficiency
    identities and values. Returns the largest error relative to the largest curvature."""
    ours = raw_by_sample(result.records, "validation:curvature")
    assert sorted(ours) == sorted(reference)
    scale = max(abs(v) for v in reference.values())
    error = max(abs(ours[sid] - reference[sid]) for sid in reference) / scale
    assert error <= accuracy
    assert sum(ours.values()) == pytest.approx(batch_dot, rel=accuracy)
    dots = result.batch_dots
    assert sum(ours.values()) == pytest.approx(dots["validation:curvature"], rel=1e-4)
    assert dots["validation:second-order"] == pytest.approx(
        dots["validation"] - lr / 2 * dots["validation:curvature"], rel=1e-12
    )
    c, values = result.records.columns, result.records.values
    curvature_row = c["target"] == "validation:curvature"
    assert np.array_equal(values[curvature_row], -0.5 * lr * lr * c["raw"][curvature_row])
    return error


# ZeRO-3 persistence 1100: the norms and attention projections stay gathered between forwards, the rest is
# gathered from the moved partitions (docs/DESIGN.md §2.10)
@pytest.mark.parametrize(
    "stage,mbs,persistence",
    [(0, 2, 0), (1, 2, 0), (2, 2, 0), (1, 1, 0), (3, 2, 0), (3, 1, 1100)],
    ids=["zero0", "zero1", "zero2", "zero1-mb1", "zero3", "zero3-mb1-persistent"],
)
def test_deepspeed_curvature_matches_brute_force_and_efficiency(deepspeed_world, stage, mbs, persistence):
    """The DeepSpeed adapter's curvature pass per sample against the oracle in float64
    (:func:`_deepspeed_curvature_reference`), within the fp32 accuracy docs/DESIGN.md §1.7 states;
    the SGD rows still equal their brute force; efficiency ``Σ_z κ = <g_t, H_val g_t>``."""
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import llama_shape, lm_token_losses

    shape = llama_shape()
    gas = 6 // mbs
    engine = _deepspeed_engine(shape, stage=stage, gas=gas, mbs=mbs, persistence=persistence)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    scorer = DeepSpeedScorer(engine, validation, lm_token_losses, ScoringConfig(second_order=True))
    assert scorer.score_rows == ["validation", "validation:curvature", "validation:second-order"]
    assert any(getattr(p, "ds_persist", False) for p in engine.module.parameters()) == (persistence > 0)
    train = make_data(shape, gas, mbs, seed=5)
    reference_model, reference, exact_batch = _deepspeed_curvature_reference(engine, shape, validation, train)
    reference_raw = oracle.per_sample_raw(
        reference_model,
        train,
        lm_token_losses,
        oracle.validation_gradient(reference_model, validation, lm_token_losses),
    )
    scorer.forward_backward(train)
    engine.step()
    result = scorer.end_step()
    error = _check_curvature_rows(result, reference, exact_batch, LR, accuracy=1e-3)  # fp32, docs/DESIGN.md §1.7
    raw = raw_by_sample(result.records, "validation")
    raw_error = max(abs(raw[sid] - reference_raw[sid]) for sid in reference_raw) / max(map(abs, reference_raw.values()))
    print(f"ZeRO-{stage} mbs {mbs}: curvature max error {error:.1e}, raw {raw_error:.1e} relative")
    assert raw_error <= 1e-4  # the fp32 accuracy of raw scores (tests/test_deepspeed.py)
    scorer.detach()
    engine.destroy()


@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_second_order_rows_beside_adam_rows(deepspeed_world, stage):
    """DeepSpeed stepping torch's AdamW with second-order values on: the optimizer's first step records
    the curvature and second-order rows without Adam rows (docs/DESIGN.md §1.5), the second all four;
    at each, the curvature rows equal the brute force of the fp32 central difference at the step's
    weights (:func:`_deepspeed_central_difference_reference`; their distance from the exact product is
    printed) and are efficient, and the Adam-aware row its brute force with ``P`` from DeepSpeed's
    partitioned second moment and ``Σ_z = <g_t, P ⊙ G>`` (:func:`ds_common.adam_aware_reference`)."""
    from ds_common import adam_aware_reference

    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import llama_shape, lm_token_losses

    adam_lr = 1e-3
    shape = llama_shape()
    engine = _deepspeed_engine(shape, stage=stage, gas=2, mbs=2, adam_lr=adam_lr)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    scorer = DeepSpeedScorer(engine, validation, lm_token_losses, ScoringConfig(second_order=True))
    rows = ["validation", "validation:adam", "validation:curvature", "validation:second-order"]
    assert scorer.score_rows == rows
    for step in range(2):
        train = make_data(shape, 2, 2, seed=5 + step, first_id=100 * step)
        model64, exact, _ = _deepspeed_curvature_reference(engine, shape, validation, train)
        scorer.forward_backward(train)
        curvature, curvature_dot = _deepspeed_central_difference_reference(
            engine, shape, validation, train, model64, scorer.finite_difference_step
        )
        adam = adam_aware_reference(engine, shape, validation, train, steps_taken=step) if step > 0 else None
        engine.step()
        result = scorer.end_step()
        expected = [r for r in rows if step > 0 or r != "validation:adam"]
        assert result.score_rows == expected
        assert list(dict.fromkeys(result.records.columns["target"])) == expected
        # fp32: the layouts' rounding of G divided by 2ε (test_zero_stages_equal_single_process)
        curvature_error = _check_curvature_rows(result, curvature, curvature_dot, adam_lr, accuracy=1e-4)
        ours = raw_by_sample(result.records, "validation:curvature")
        exact_error = max(abs(ours[sid] - exact[sid]) for sid in exact) / max(map(abs, exact.values()))
        message = (
            f"ZeRO-{stage} Adam step {step}: curvature max error {curvature_error:.1e} from the fp32 central"
            f" difference, {exact_error:.1e} from the exact product"
        )
        if adam is not None:
            reference, batch_dot = adam
            ours = raw_by_sample(result.records, "validation:adam")
            assert sorted(ours) == sorted(reference)
            adam_error = max(abs(ours[sid] - reference[sid]) for sid in reference) / max(map(abs, reference.values()))
            message += f", Adam-aware max error {adam_error:.1e}"
            assert adam_error <= 1e-4
            assert result.batch_dots["validation:adam"] == pytest.approx(batch_dot, rel=1e-5)
            assert sum(ours.values()) == pytest.approx(batch_dot, rel=1e-5)
        print(message)
    scorer.detach()
    engine.destroy()


def _deepspeed_training(stage: int, second_order: bool | None) -> dict:
    """Two steps of a dropout LM at ``stage`` (gas 2): unscored (``second_order`` None) or scored;
    the losses, final weights and, scored, each step's curvature efficiency (sum, batch dot)."""
    from ds_common import full_weights

    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import llama_shape, lm_token_losses
    from inrun_megatron.deepspeed.scorer import masked_token_mean

    shape = llama_shape(dropout=0.2)
    engine = _deepspeed_engine(shape, stage=stage, gas=2, mbs=2, seed=3)
    validation = make_data(shape, 2, 2, seed=6, first_id=10**6)
    scorer = None
    if second_order is not None:
        scorer = DeepSpeedScorer(engine, validation, lm_token_losses, ScoringConfig(second_order=second_order))
    loss_fn = masked_token_mean(lm_token_losses)
    out = {"losses": [], "efficiency": []}
    torch.manual_seed(17)  # the dropout masks
    for step in range(2):
        train = make_data(shape, 2, 2, seed=5 + step, first_id=100 * step)
        if scorer is None:
            for batch in train:
                loss = loss_fn(engine, batch)
                engine.backward(loss)
                engine.step()
                out["losses"].append(float(loss))
            continue
        out["losses"] += scorer.forward_backward(train)
        engine.step()
        result = scorer.end_step()
        if second_order:
            rows = raw_by_sample(result.records, "validation:curvature")
            out["efficiency"].append((sum(rows.values()), result.batch_dots["validation:curvature"]))
    out["weights"] = full_weights(engine.module)
    if scorer is not None:
        scorer.detach()
    engine.destroy()
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_training_is_unchanged_by_the_curvature_pass(deepspeed_world, stage):
    """Identity 5 of docs/DESIGN.md §1.3 with the DeepSpeed curvature pass on, with dropout: bitwise the
    same losses and weights as the unscored loop and as first-order scoring (the replay draws the
    training pass's masks and leaves the RNG where training left it; ZeRO's buffers and gradient
    partitions are never touched, ZeRO-3's weight partitions are restored bitwise)."""
    plain = _deepspeed_training(stage, None)
    for second_order in (False, True):
        scored = _deepspeed_training(stage, second_order)
        assert scored["losses"] == plain["losses"]
        for name, w in plain["weights"].items():
            assert torch.equal(scored["weights"][name], w), name
    assert len(scored["efficiency"]) == 2
    for total, batch_dot in scored["efficiency"]:
        assert total == pytest.approx(batch_dot, rel=1e-4)  # fp32


@pytest.mark.parametrize("stage,dtype,what", [(1, "bf16", "fp16/bf16")])
def test_deepspeed_adapter_refuses_what_its_curvature_pass_cannot_serve(deepspeed_world, stage, dtype, what):
    """Half precision is refused at attach, named."""
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.deepspeed import DeepSpeedScorer
    from inrun_megatron.deepspeed.model import llama_shape, lm_token_losses

    shape = llama_shape()
    engine = _deepspeed_engine(shape, stage=stage, gas=1, mbs=2, dtype=dtype)
    validation = make_data(shape, 2, 2, seed=1, first_id=10**6)
    with pytest.raises(NotImplementedError, match=f"do not support {what}"):
        DeepSpeedScorer(engine, validation, lm_token_losses, ScoringConfig(second_order=True))
    engine.destroy()
