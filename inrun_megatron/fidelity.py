"""``inrun-fidelity``: the library's values against exact Shapley values of one-step games.

The paper's Figure-1 check (Wang et al., ICLR 2025), runnable on any CPU: a tiny causal
LM in float64 trains a few steps with SGD or Adam; at each scored step the *one-step game* of
``docs/DESIGN.md`` §4 is solved exactly by enumerating every subset of the batch, and each value
the library offers is compared with the exact Shapley values.

**The game.** Step ``t`` trains on a batch ``B`` of ``n`` sequences with the mean per-token
cross-entropy over the batch, so sequence ``z``'s additive term is
``ℓ_z = Σ_{tokens of z} CE / (tokens in B)`` (``docs/DESIGN.md`` §1.1). A subset ``S`` steps on
``Σ_{z∈S} ℓ_z``: the same per-sample weights as the full step, *not* renormalised by ``|S|``, so
that ``S = B`` is the step training took and a sample's term is the same in every coalition. Its
utility is ``U(S) = L_val(w_t) − L_val(w_{t+1}(S))`` (positive = lowered the validation loss,
the library's sign), where ``w_{t+1}(S)`` is one step of the *real* torch optimizer on that loss
from the optimizer state as it was before the step. Under Adam ``U(∅) ≠ 0`` (momentum moves the
weights without data); Shapley values split ``U(B) − U(∅)``.

**The values** come from the library's definitions: the first-order SGD value
(:func:`inrun_megatron.scores.step_values` of ``⟨∇ℓ_z, G_t⟩``), the Adam-aware value (the same
formula against the preconditioned validation gradient ``P_t ⊙ G_t``, ``P_t`` from
:func:`inrun_megatron.optimizer_values.torch_adam_preconditioner`), the second-order value
(:func:`inrun_megatron.second_order.second_order_step_values`). Per-sample gradients here are
brute force, one backward per sample: the production paths are checked against brute force
elsewhere; this command checks the *definitions*.

**The numbers.** Per learning rate, one training run per seed; each run's scored steps are
pooled (``n`` values per step) and Pearson, Spearman and the relative RMSE
``‖value − φ‖ / ‖φ‖`` are computed against the exact values ``φ``, then averaged over seeds. The
worst single step's Pearson is printed beside them.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inrun_megatron.optimizer_values import is_adam, torch_adam_preconditioner
from inrun_megatron.scores import step_values
from inrun_megatron.second_order import second_order_step_values, validation_hessian_vector_product

#: The largest batch whose game is enumerated: 2^10 optimizer steps and validation losses per step.
MAX_PLAYERS = 10
OPTIMIZERS = ("sgd", "adam")
DEFAULT_LRS = {"sgd": (0.01, 0.1, 1.0), "adam": (1e-4, 3e-4, 1e-3)}
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# Exact Shapley values


def exact_shapley(utilities: np.ndarray) -> np.ndarray:
    """Shapley values of the game whose utility of coalition ``S`` is ``utilities[mask(S)]``.

    ``mask(S)`` has bit ``i`` set when player ``i`` is in ``S``; ``len(utilities)`` is ``2^n``.
    ``φ_i = Σ_{S ∌ i} |S|!(n−|S|−1)!/n! · (U(S ∪ {i}) − U(S))``, summed over all ``2^(n−1)``
    coalitions without ``i``.
    """
    utilities = np.asarray(utilities, dtype=np.float64)
    n = len(utilities).bit_length() - 1
    if n < 1 or len(utilities) != 2**n:
        raise ValueError(f"need 2^n utilities (n >= 1), got {len(utilities)}")
    masks = np.arange(2**n)
    sizes = np.array([bin(m).count("1") for m in masks])
    weight_by_size = np.array([math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)])
    values = np.empty(n)
    for i in range(n):
        without = masks[(masks >> i) & 1 == 0]
        values[i] = np.sum(weight_by_size[sizes[without]] * (utilities[without | (1 << i)] - utilities[without]))
    return values


# --------------------------------------------------------------------------------------------
# The model and data


class _Block(nn.Module):
    """Pre-norm transformer block with attention written out, so it is twice differentiable."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp_norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(h // self.heads)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        attention = scores.masked_fill(causal, float("-inf")).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))


class TinyCausalLM(nn.Module):
    """A GPT-2 style decoder (learned positions, pre-norm blocks, untied output) in float64."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, seq_length: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.position_embedding = nn.Embedding(seq_length, hidden)
        self.layers = nn.ModuleList(_Block(hidden, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(hidden)
        self.output_layer = nn.Linear(hidden, vocab, bias=False)
        self.to(torch.float64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens) + self.position_embedding(torch.arange(tokens.shape[1], device=tokens.device))
        for layer in self.layers:
            x = layer(x)
        return self.output_layer(self.final_norm(x))


def token_losses(model: Callable[[torch.Tensor], torch.Tensor], sequences: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy ``[b, s−1]`` of ``sequences [b, s]``; twice differentiable
    (``F.cross_entropy``, not megatron's vocab-parallel one, ``docs/DESIGN.md`` §4)."""
    logits = model(sequences[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), sequences[:, 1:].reshape(-1), reduction="none").view(
        sequences.shape[0], -1
    )


def mean_token_loss(model: Callable[[torch.Tensor], torch.Tensor], sequences: torch.Tensor) -> torch.Tensor:
    """Mean per-token cross-entropy over every token of ``sequences``: the training and the
    validation loss (``docs/DESIGN.md`` §1.1)."""
    return token_losses(model, sequences).mean()


class MarkovCorpus:
    """Sequences from a random, peaked Markov chain over the vocabulary, a share of them replaced by
    uniform noise: learnable structure, and training sequences that help and that hurt."""

    def __init__(self, generator: torch.Generator, vocab: int, seq_length: int, noise: float):
        self.generator, self.vocab, self.seq_length, self.noise = generator, vocab, seq_length, noise
        self.transitions = (3.0 * torch.randn(vocab, vocab, generator=generator, dtype=torch.float64)).softmax(-1)

    def sample(self, n: int, noise: float | None = None) -> torch.Tensor:
        tokens = torch.empty(n, self.seq_length, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.vocab, (n,), generator=self.generator)
        for i in range(1, self.seq_length):
            tokens[:, i] = torch.multinomial(self.transitions[tokens[:, i - 1]], 1, generator=self.generator)[:, 0]
        share = self.noise if noise is None else noise
        noisy = torch.rand(n, generator=self.generator) < share
        tokens[noisy] = torch.randint(self.vocab, (int(noisy.sum()), self.seq_length), generator=self.generator)
        return tokens


# --------------------------------------------------------------------------------------------
# One step's game and values


def _flat_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params))])


def _unflatten(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [chunk.view_as(p) for chunk, p in zip(torch.split(flat, [p.numel() for p in params]), params)]


def per_sample_gradients(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``[n, P]``: row ``z`` is the flat gradient of ``ℓ_z`` (sum of z's token losses / tokens in the
    batch), one backward per sample; the rows sum to the gradient of the batch's mean token loss."""
    params = list(model.parameters())
    batch_tokens = batch.shape[0] * (batch.shape[1] - 1)
    return torch.stack(
        [_flat_gradient(token_losses(model, batch[z : z + 1]).sum() / batch_tokens, params) for z in range(len(batch))]
    )


def _flat_optimizer_copy(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """The same optimizer (class, hyperparameters, state before the step) over one flat parameter.

    Adam and SGD update every element independently, so one step of the flat copy moves each
    weight exactly as the optimizer would, with one tensor operation per step instead of one per
    parameter tensor (the subset enumeration takes ``2^n`` steps).
    """
    if len(optimizer.param_groups) != 1:
        raise ValueError("the one-step game is enumerated for an optimizer with one parameter group")
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    probe = type(optimizer)([flat], **optimizer.defaults)
    states = [optimizer.state.get(p, {}) for p in params]
    flat_state = {}
    for key, first in states[0].items():
        if not isinstance(first, torch.Tensor):
            continue  # SGD without momentum keeps momentum_buffer = None
        if first.shape == params[0].shape:
            flat_state[key] = torch.cat([s[key].reshape(-1) for s in states]).clone()
        elif all(torch.equal(s[key], first) for s in states):  # Adam's step count
            flat_state[key] = first.clone()
        else:
            raise ValueError(f"optimizer state {key!r} differs between parameters: cannot flatten it")
    probe.state[flat] = flat_state
    return probe


def subset_utilities(
    model: nn.Module, optimizer: torch.optim.Optimizer, sample_gradients: torch.Tensor, validation: torch.Tensor
) -> np.ndarray:
    """``U(S) = L_val(w_t) − L_val(w_{t+1}(S))`` for every subset mask of the batch.

    ``w_{t+1}(S)`` is one ``optimizer.step()`` of a copy of ``optimizer`` (same class,
    hyperparameters and state as now, before the step) with gradient ``Σ_{z∈S} ∇ℓ_z``; ``model``
    and ``optimizer`` are left untouched. The validation losses of all ``2^n`` weights are
    evaluated in batches with ``torch.func.vmap``.
    """
    n = sample_gradients.shape[0]
    named = dict(model.named_parameters())
    params = list(named.values())
    probe = _flat_optimizer_copy(optimizer, params)
    (flat,) = probe.param_groups[0]["params"]
    start = flat.detach().clone()
    saved_state = {key: value.clone() for key, value in probe.state[flat].items()}
    # Row 0 holds w_t, so that L_val(w_t) is computed exactly as every stepped loss is.
    stepped = torch.empty(1 + 2**n, start.numel(), dtype=start.dtype)
    stepped[0] = start
    for mask in range(2**n):
        members = [z for z in range(n) if (mask >> z) & 1]
        with torch.no_grad():
            flat.copy_(start)
            flat.grad = sample_gradients[members].sum(0) if members else torch.zeros_like(start)
            for key, value in saved_state.items():
                probe.state[flat][key].copy_(value)
        probe.step()
        stepped[1 + mask] = flat.detach()

    def validation_loss(weights: torch.Tensor) -> torch.Tensor:
        tensors = dict(zip(named, _unflatten(weights, params)))
        return mean_token_loss(lambda tokens: torch.func.functional_call(model, tensors, (tokens,)), validation)

    with torch.no_grad():
        losses = torch.cat([torch.func.vmap(validation_loss)(chunk) for chunk in stepped.split(64)]).numpy()
    return losses[0] - losses[1:]


def _adam_preconditioner(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    preconditioner = torch_adam_preconditioner(optimizer, param)
    if preconditioner is None:
        raise ValueError("the Adam-aware value needs the optimizer state of a step before: score after warmup steps")
    return preconditioner


@dataclass
class StepGame:
    """One scored step: the utility of every subset, exact Shapley values and the library's values."""

    utilities: np.ndarray
    exact: np.ndarray
    values: dict[str, np.ndarray]


def score_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, validation: torch.Tensor
) -> StepGame:
    """Solve this step's game exactly and compute every value the library offers, before the step."""
    params = list(model.parameters())
    lr = optimizer.param_groups[0]["lr"]
    sample_gradients = per_sample_gradients(model, batch)
    validation_gradient = _flat_gradient(mean_token_loss(model, validation), params)
    no_skip, no_clip = np.zeros(len(batch), dtype=bool), 1.0
    raw = (sample_gradients @ validation_gradient).numpy()
    batch_gradient = sample_gradients.sum(0)
    hvp = validation_hessian_vector_product(
        params, lambda: mean_token_loss(model, validation), _unflatten(batch_gradient, params)
    )
    curvature = (sample_gradients @ torch.cat([h.reshape(-1) for h in hvp])).numpy()
    values = {
        "sgd": step_values(raw, lr, no_clip, no_skip),
        "second-order": second_order_step_values(raw, curvature, lr, no_clip, no_skip),
    }
    if is_adam(optimizer):
        preconditioner = torch.cat([_adam_preconditioner(optimizer, p).reshape(-1) for p in params])
        adam_raw = (sample_gradients @ (preconditioner * validation_gradient)).numpy()
        values["adam"] = step_values(adam_raw, lr, no_clip, no_skip)
    utilities = subset_utilities(model, optimizer, sample_gradients, validation)
    return StepGame(utilities=utilities, exact=exact_shapley(utilities), values=values)


# --------------------------------------------------------------------------------------------
# Runs and the table


@dataclass
class FidelityConfig:
    optimizer: str = "adam"
    lrs: tuple[float, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    #: 1 / (1 − β₂), the second moment's time constant: the Adam-aware value holds the second
    #: moment fixed, closer to what the step does once it averages many steps' gradients; in the
    #: first steps of a run it tracks the game less well (README, "Fidelity", ``--warmup-steps 3``).
    warmup_steps: int = 20
    steps: int = 4
    batch_size: int = 8
    validation_size: int = 8
    vocab: int = 16
    hidden: int = 16
    layers: int = 2
    heads: int = 2
    seq_length: int = 9
    noise: float = 0.25

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        self.lrs = tuple(self.lrs) or DEFAULT_LRS[self.optimizer]
        if not 2 <= self.batch_size <= MAX_PLAYERS:
            raise ValueError(
                f"batch_size must be 2..{MAX_PLAYERS} (2^batch_size subsets per step), got {self.batch_size}"
            )
        if self.optimizer == "adam" and self.warmup_steps < 1:
            raise ValueError("Adam needs warmup_steps >= 1: the Adam-aware value uses the state before the step")
        for name in ("steps", "validation_size", "vocab", "hidden", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be >= 2 (next-token targets), got {self.seq_length}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} must be a multiple of heads {self.heads}")
        if not self.seeds:
            raise ValueError("need at least one seed")
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"learning rates must be positive, got {self.lrs}")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")


def make_optimizer(kind: str, params: Sequence[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Plain SGD (no momentum, no weight decay) or Adam with β = (0.9, 0.95), no weight decay."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def train_and_score(config: FidelityConfig, lr: float, seed: int) -> list[StepGame]:
    """One seeded run at ``lr``: ``warmup_steps`` plain steps, then ``steps`` scored steps."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    corpus = MarkovCorpus(generator, config.vocab, config.seq_length, config.noise)
    validation = corpus.sample(config.validation_size, noise=0.0)
    model = TinyCausalLM(config.vocab, config.hidden, config.layers, config.heads, config.seq_length - 1)
    optimizer = make_optimizer(config.optimizer, list(model.parameters()), lr)
    games = []
    for step in range(config.warmup_steps + config.steps):
        batch = corpus.sample(config.batch_size)
        if step >= config.warmup_steps:
            games.append(score_step(model, optimizer, batch, validation))
        optimizer.zero_grad()
        mean_token_loss(model, batch).backward()
        optimizer.step()
    return games


def agreement(value: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman and relative RMSE ``‖value − exact‖ / ‖exact‖``."""
    from scipy import stats

    return {
        "pearson": float(stats.pearsonr(value, exact).statistic),
        "spearman": float(stats.spearmanr(value, exact).statistic),
        "rel_rmse": float(np.linalg.norm(value - exact) / np.linalg.norm(exact)),
    }


@dataclass
class FidelityRow:
    lr: float
    value: str
    pearson: float
    spearman: float
    rel_rmse: float
    worst_step_pearson: float


def run_fidelity(config: FidelityConfig, progress: Callable[[str], None] | None = None) -> list[FidelityRow]:
    """Every (learning rate, value) row: agreement pooled over each run's scored steps, mean over seeds."""
    rows = []
    for lr in config.lrs:
        per_seed: dict[str, list[dict[str, float]]] = {}
        worst: dict[str, float] = {}
        for seed in config.seeds:
            if progress:
                progress(f"lr {lr:g} seed {seed}")
            games = train_and_score(config, lr, seed)
            exact = np.concatenate([g.exact for g in games])
            for name in games[0].values:
                pooled = np.concatenate([g.values[name] for g in games])
                per_seed.setdefault(name, []).append(agreement(pooled, exact))
                steps = [agreement(g.values[name], g.exact)["pearson"] for g in games]
                worst[name] = min(worst.get(name, math.inf), *steps)
        for name, results in per_seed.items():
            mean = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
            rows.append(FidelityRow(lr=lr, value=name, worst_step_pearson=worst[name], **mean))
    return rows


VALUE_ORDER = ("sgd", "adam", "second-order")


def format_table(rows: Sequence[FidelityRow]) -> str:
    """A Markdown table, one row per learning rate and value."""
    lines = [
        "| lr | value | Pearson | Spearman | relative RMSE | worst step's Pearson |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r.lr, VALUE_ORDER.index(r.value))):
        lines.append(
            f"| {row.lr:g} | {row.value} | {row.pearson:.4f} | {row.spearman:.4f} | {row.rel_rmse:.3g} |"
            f" {row.worst_step_pearson:.4f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    defaults = FidelityConfig()
    parser = argparse.ArgumentParser(
        prog="inrun-fidelity",
        description="Compare the library's In-Run values with exact Shapley values of one-step games "
        "(every subset of a small batch) on a tiny float64 GPT.",
    )
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        help="learning rates, one run per seed each (default: "
        + "; ".join(f"{k}: {' '.join(f'{lr:g}' for lr in v)}" for k, v in DEFAULT_LRS.items())
        + ")",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="unscored steps first")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="scored steps per run")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"players, at most {MAX_PLAYERS}")
    parser.add_argument("--validation-size", type=int, default=defaults.validation_size)
    parser.add_argument("--noise", type=float, default=defaults.noise, help="share of noise training sequences")
    args = parser.parse_args(argv)
    try:
        config = FidelityConfig(
            optimizer=args.optimizer,
            lrs=tuple(args.lrs or ()),
            seeds=tuple(args.seeds),
            warmup_steps=args.warmup_steps,
            steps=args.steps,
            batch_size=args.batch_size,
            validation_size=args.validation_size,
            noise=args.noise,
        )
    except ValueError as error:
        parser.error(str(error))
    print(
        f"inrun-fidelity: {config.optimizer}, {len(config.seeds)} seeds, {config.warmup_steps} warmup + "
        f"{config.steps} scored steps, {config.batch_size} players (2^{config.batch_size} subsets per step)",
        flush=True,
    )
    print(format_table(run_fidelity(config, progress=lambda message: print(message, file=sys.stderr, flush=True))))


if __name__ == "__main__":
    main()
