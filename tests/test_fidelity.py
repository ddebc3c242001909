"""``inrun-fidelity`` and the second-order values: the exact Shapley enumeration is right, the
Hessian-vector product is right, each step's game is the step training took, and the README's
``inrun-fidelity`` tables are what the command prints (with the fidelity they claim)."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inrun_megatron.fidelity import (
    MarkovCorpus,
    TinyCausalLM,
    exact_shapley,
    main,
    make_optimizer,
    mean_token_loss,
    score_step,
)
from inrun_megatron.second_order import second_order_step_values, validation_hessian_vector_product

REPO = Path(__file__).resolve().parents[1]


def _utilities(n: int, utility) -> np.ndarray:
    """``utility(frozenset of players)`` for every subset mask, bit ``i`` = player ``i``."""
    return np.array([utility(frozenset(i for i in range(n) if (mask >> i) & 1)) for mask in range(2**n)])


def test_exact_shapley_two_players_hand_formula():
    table = {frozenset(): 0.3, frozenset({0}): 1.0, frozenset({1}): -2.0, frozenset({0, 1}): 5.0}
    phi = exact_shapley(_utilities(2, table.__getitem__))
    assert phi[0] == pytest.approx(0.5 * (1.0 - 0.3) + 0.5 * (5.0 - -2.0), abs=1e-14)
    assert phi[1] == pytest.approx(0.5 * (-2.0 - 0.3) + 0.5 * (5.0 - 1.0), abs=1e-14)


def test_exact_shapley_three_players_hand_formula():
    rng = np.random.default_rng(0)
    table = {frozenset(s): rng.normal() for k in range(4) for s in itertools.combinations(range(3), k)}
    u = table.__getitem__
    phi = exact_shapley(_utilities(3, u))
    for i in range(3):
        j, k = (p for p in range(3) if p != i)
        hand = (
            (u(frozenset({i})) - u(frozenset())) / 3
            + (u(frozenset({i, j})) - u(frozenset({j}))) / 6
            + (u(frozenset({i, k})) - u(frozenset({k}))) / 6
            + (u(frozenset({i, j, k})) - u(frozenset({j, k}))) / 3
        )
        assert phi[i] == pytest.approx(hand, abs=1e-14)
    assert phi.sum() == pytest.approx(u(frozenset(range(3))) - u(frozenset()), abs=1e-14)


def test_quadratic_game_shapley_is_the_second_order_value():
    """Theorem 4's split of the interaction term: the Shapley value of
    ``U(S) = s·⟨G, g_S⟩ − (s²/2)·g_Sᵀ H g_S`` is the library's second-order value of every player."""
    rng = np.random.default_rng(1)
    n, dim, step = 6, 5, 0.7
    gradients = rng.normal(size=(n, dim))
    validation_gradient = rng.normal(size=dim)
    root = rng.normal(size=(dim, dim))
    hessian = root + root.T

    def utility(players: frozenset) -> float:
        g = gradients[sorted(players)].sum(0)
        return step * validation_gradient @ g - 0.5 * step**2 * g @ hessian @ g

    phi = exact_shapley(_utilities(n, utility))
    raw = gradients @ validation_gradient
    curvature = gradients @ hessian @ gradients.sum(0)
    values = second_order_step_values(raw, curvature, np.float64(step), np.float64(1.0), np.zeros(n, bool))
    np.testing.assert_allclose(values, phi, rtol=0, atol=1e-12 * np.abs(phi).max())
    # The pairwise split is not the naive one: giving each player only its own diagonal term is wrong.
    naive = step * raw - 0.5 * step**2 * np.einsum("zi,ij,zj->z", gradients, hessian, gradients)
    assert np.abs(naive - phi).max() > 1e-3 * np.abs(phi).max()


def test_second_order_value_is_zero_on_skipped_steps_and_scales_with_clipping():
    raw, curvature = np.array([2.0, np.nan]), np.array([3.0, np.nan])
    values = second_order_step_values(raw, curvature, np.float64(0.1), np.float64(0.5), np.array([False, True]))
    assert values[0] == pytest.approx(0.05 * 2.0 - 0.5 * 0.05**2 * 3.0, abs=1e-15)
    assert values[1] == 0.0


def test_exact_shapley_rejects_a_table_that_is_not_2_to_the_n():
    with pytest.raises(ValueError, match="need 2\\^n utilities"):
        exact_shapley(np.zeros(6))


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    corpus = MarkovCorpus(torch.Generator().manual_seed(seed), vocab=16, seq_length=9, noise=0.25)
    return TinyCausalLM(vocab=16, hidden=16, layers=2, heads=2, seq_length=8), corpus


def test_validation_hvp_matches_finite_differences_of_gradients():
    model, corpus = _tiny()
    validation = corpus.sample(4)
    params = list(model.parameters())
    direction = [torch.randn_like(p) for p in params]
    hvp = validation_hessian_vector_product(params, lambda: mean_token_loss(model, validation), direction)

    def gradient_at(shift: float) -> torch.Tensor:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(shift * d)
        grads = torch.autograd.grad(mean_token_loss(model, validation), params)
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(shift * d)
        return torch.cat([g.reshape(-1) for g in grads])

    h = 1e-4
    finite = (gradient_at(h) - gradient_at(-h)) / (2 * h)
    exact = torch.cat([x.reshape(-1) for x in hvp])
    assert torch.linalg.norm(exact - finite) <= 1e-6 * torch.linalg.norm(exact)
    assert torch.linalg.norm(exact) > 0


def test_validation_hvp_of_unused_parameters_and_linear_losses_is_zero():
    used, unused = torch.randn(3, dtype=torch.float64, requires_grad=True), torch.randn(2, requires_grad=True)
    x = torch.randn(3, dtype=torch.float64)
    vector = [torch.ones(3, dtype=torch.float64), torch.ones(2)]
    quadratic = validation_hessian_vector_product([used, unused], lambda: (used * x).sum() ** 2, vector)
    torch.testing.assert_close(quadratic[0], 2 * x * (x @ vector[0]), rtol=1e-14, atol=0)
    assert torch.equal(quadratic[1], torch.zeros(2))
    linear = validation_hessian_vector_product([used, unused], lambda: (used * x).sum(), vector)
    assert torch.equal(linear[0], torch.zeros(3, dtype=torch.float64)) and torch.equal(linear[1], torch.zeros(2))


def test_validation_hvp_rejects_a_mismatched_vector():
    model, corpus = _tiny()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="shape"):
        validation_hessian_vector_product(params, lambda: mean_token_loss(model, corpus.sample(2)), params[::-1])
    with pytest.raises(ValueError, match="tensors for"):
        validation_hessian_vector_product(params, lambda: mean_token_loss(model, corpus.sample(2)), params[:1])


@pytest.mark.parametrize("kind,lr", [("sgd", 0.05), ("adam", 1e-3)])
def test_step_game_is_the_step_training_takes(kind, lr):
    """Efficiency (Shapley values sum to ``U(B) − U(∅)``), the full coalition's utility is the real
    training step's validation-loss drop, and the game's values are consistent with its expansion."""
    model, corpus = _tiny()
    validation = corpus.sample(6, noise=0.0)
    optimizer = make_optimizer(kind, list(model.parameters()), lr)
    for _ in range(2):  # Adam state to start from
        optimizer.zero_grad()
        mean_token_loss(model, corpus.sample(5)).backward()
        optimizer.step()
    batch = corpus.sample(5)
    game = score_step(model, optimizer, batch, validation)
    full, empty = game.utilities[-1], game.utilities[0]
    assert game.exact.sum() == pytest.approx(full - empty, rel=1e-9, abs=1e-15)

    with torch.no_grad():
        before = float(mean_token_loss(model, validation))
    optimizer.zero_grad()
    mean_token_loss(model, batch).backward()
    optimizer.step()
    with torch.no_grad():
        after = float(mean_token_loss(model, validation))
    assert full == pytest.approx(before - after, rel=1e-9)
    if kind == "sgd":
        assert empty == 0.0
        # Second order closes the first-order gap of the whole step's loss drop (error O(lr³) vs O(lr²)).
        first_gap = abs(game.values["sgd"].sum() - full)
        second_gap = abs(game.values["second-order"].sum() - full)
        assert second_gap < 0.1 * first_gap
    else:
        assert empty != 0.0  # momentum moves the weights without data
        assert set(game.values) == {"sgd", "adam", "second-order"}


def test_value_errors_shrink_with_the_order_of_the_expansion():
    """One SGD game at ten times the learning rate (same weights, batch and validation set): the
    first-order value's error grows about tenfold (O(lr²) against O(lr) values), the second-order
    value's about a hundredfold (O(lr³))."""
    model, corpus = _tiny()
    validation, batch = corpus.sample(6, noise=0.0), corpus.sample(6)
    errors = {}
    for lr in (0.01, 0.1):
        game = score_step(model, make_optimizer("sgd", list(model.parameters()), lr), batch, validation)
        errors[lr] = {
            name: np.linalg.norm(v - game.exact) / np.linalg.norm(game.exact) for name, v in game.values.items()
        }
    first = errors[0.1]["sgd"] / errors[0.01]["sgd"]
    second = errors[0.1]["second-order"] / errors[0.01]["second-order"]
    assert 7 < first < 13 and 70 < second < 130, (first, second)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "11"], "batch_size must be 2..10"),
        (["--optimizer", "adam", "--warmup-steps", "0"], "warmup_steps >= 1"),
        (["--lrs", "0"], "learning rates must be positive"),
    ],
)
def test_cli_rejects_bad_input_before_running(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and message in out.err
    assert "inrun-fidelity:" not in out.out  # nothing ran


# ------------------------------------------------------------------------------------------
# The README's tables


def _parse_table(text: str) -> dict[tuple[float, str], dict[str, float]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"\d[\d.e+-]*", cells[0]):
            pearson, spearman, rel_rmse, worst = map(float, cells[2:])
            rows[float(cells[0]), cells[1]] = dict(pearson=pearson, spearman=spearman, rel_rmse=rel_rmse, worst=worst)
    return rows


def _readme_runs() -> list[tuple[list[str], dict]]:
    """Each ``inrun-fidelity`` command of the README's section, with the table that follows it."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Fidelity: `inrun-fidelity`", 1)[1].split("\n## ", 1)[0]
    runs = re.findall(r"```\n(inrun-fidelity[^\n]*)\n```\n\n(\|.*?)\n\n", section + "\n\n", re.S)
    assert len(runs) == 3, runs
    return [(command.split()[1:], _parse_table(table)) for command, table in runs]


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2], ids=["adam", "adam-first-steps", "sgd"])
def test_readme_fidelity_table(index):
    args, readme_rows = _readme_runs()[index]
    out = subprocess.run(
        [sys.executable, "-m", "inrun_megatron.fidelity", *args], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-4000:]
    rows = _parse_table(out.stdout)
    assert rows.keys() == readme_rows.keys()
    for key, measured in rows.items():
        for column, number in measured.items():
            assert readme_rows[key][column] == pytest.approx(number, rel=1e-3, abs=2e-4), (key, column)
    lrs = sorted({lr for lr, _ in rows})
    if "adam" in args:
        assert lrs == [1e-4, 3e-4, 1e-3]
        # The SGD proxy is printed beside the Adam-aware value, which tracks the game better.
        assert all(rows[lr, "adam"]["pearson"] > rows[lr, "sgd"]["pearson"] for lr in lrs)
        if "--warmup-steps" not in args:  # the default: steps past the second moment's first steps
            assert all(rows[lr, "adam"]["pearson"] >= 0.99 for lr in lrs), rows
    else:
        small = [lr for lr in lrs if lr <= 0.1]
        assert small and all(rows[lr, "second-order"]["spearman"] >= 0.999 for lr in small)
        assert all(rows[lr, "second-order"]["rel_rmse"] < rows[lr, "sgd"]["rel_rmse"] for lr in lrs)
