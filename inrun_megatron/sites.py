"""Sites: where in a model a score rule runs, and the capture machinery shared by adapters.

A *site* is one layer (or one use of a tied weight). Adapters register a *site builder* per
module type, Opacus-style: ``builder(scorer, name, module) -> [Site]``. The builder decides
how the layer's input and output gradient reach a rule from :mod:`inrun_megatron.rules`.

The generic mechanism is a *tap*: a forward hook routes the module's output through
:class:`_Tap`, an identity autograd function whose backward receives the output gradient
together with tensors saved at forward time. Taps are only inserted while a training pass is
being scored, so validation and evaluation forwards run unmodified, and they work under
activation recomputation (the recomputed forward inserts a fresh tap, whose backward runs
once).

The public registry of score rules for batch-first layers (:func:`register_rule`) lives here too:
a rule is a pure function of what one layer sees, and the built-in rules for plain PyTorch layers
(``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``) and for Hugging Face layers
(:mod:`inrun_megatron.hf_rules`) are registered through it. Megatron-Core layer builders live with
their adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from inrun_megatron import rules

if TYPE_CHECKING:
    from inrun_megatron.config import ScoringConfig
    from inrun_megatron.scores import StepScores
    from inrun_megatron.validation import GradientStore


class SiteScorer(Protocol):
    """What sites and their builders use of the scorer they belong to
    (:class:`inrun_megatron.scorer.Scorer` is one). Named here so that the modules below the
    scorer depend on this interface, not on the scorer's module, which imports them."""

    config: ScoringConfig
    scoring: str | None  # the path scoring the running training pass, if any
    step_scores: StepScores | None
    grads: GradientStore | None

    def counts(self, param: torch.nn.Parameter) -> bool: ...

    def tied_output_weight(self, name: str, module: torch.nn.Module) -> torch.nn.Parameter: ...

    def add_hook(self, handle) -> None: ...

    def on_detach(self, fn: Callable[[], None]) -> None: ...


SiteBuilder = Callable[[SiteScorer, str, torch.nn.Module], list["Site"]]


@dataclass(eq=False)
class Site:
    """One place in a model where a score rule runs.

    ``calls`` counts the site's backward passes in the current step; every pipeline schedule
    runs a layer's backwards in the order of its forwards, so the k-th backward is microbatch k.
    """

    name: str
    params: tuple[torch.nn.Parameter, ...]
    scorer: SiteScorer
    calls: int = 0


def site_registry(*parents: dict[type, SiteBuilder]) -> tuple[dict[type, SiteBuilder], Callable]:
    """A new builder registry (extending ``parents``) and its ``@builds_sites(*types)`` decorator."""
    registry: dict[type, SiteBuilder] = {}
    for parent in parents:
        registry.update(parent)

    def builds_sites(*module_types: type) -> Callable[[SiteBuilder], SiteBuilder]:
        def register(fn: SiteBuilder) -> SiteBuilder:
            for t in module_types:
                registry[t] = fn
            return fn

        return register

    return registry, builds_sites


#: Builders of batch-first layers: what :func:`register_rule` fills, and what the DeepSpeed adapter
#: uses for models without megatron-core layers (:func:`inrun_megatron.hf_rules.registered_builders`).
TORCH_SITE_BUILDERS: dict[type, SiteBuilder] = {}


class _Tap(torch.autograd.Function):
    """Identity in forward; hands the output gradient and saved tensors to a site in backward."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, site: TapSite, *saved: torch.Tensor) -> torch.Tensor:
        ctx.site = site
        ctx.save_for_backward(*saved)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.site.scorer.scoring == "rules":
            ctx.site.score(grad, *ctx.saved_tensors)
        return (grad, None) + (None,) * len(ctx.saved_tensors)


@dataclass(eq=False)
class TapSite(Site):
    """A site scored from a module's output gradient and tensors saved at its forward.

    ``counted_here`` is False where an identical copy of the site is counted on another rank
    (tensor-parallel duplicates): the microbatch index still advances, no work is done.
    """

    counted_here: bool = True

    def tap(self, output: torch.Tensor, *saved: torch.Tensor) -> torch.Tensor:
        if not (self.scorer.scoring == "rules" and torch.is_grad_enabled()):
            return output
        return _Tap.apply(output, self, *saved)

    def score(self, grad: torch.Tensor, *saved: torch.Tensor) -> None:
        step = self.scorer.step_scores
        microbatch = step.next_microbatch(self)
        if self.counted_here:
            partial = self.partial(grad, *saved)
            if partial.shape[-1] != step.totals.shape[-1]:
                raise RuntimeError(
                    f"layer {self.name} computed an output for {partial.shape[-1]} sequences in a micro-batch of"
                    f" {step.totals.shape[-1]}: an output broadcast over the batch (e.g. position embeddings looked"
                    " up without a batch dimension) has no per-sequence gradient; give its input a batch dimension"
                )
            step.add(microbatch, partial, self)

    def partial(self, grad: torch.Tensor, *saved: torch.Tensor) -> torch.Tensor:
        """The partial scores of one microbatch: per token ``[K, T, B]`` (the rules of
        :mod:`inrun_megatron.rules`) or per sample ``[K, B]``."""
        raise NotImplementedError

    @property
    def grads(self):
        return self.scorer.grads

    @property
    def projection_dtype(self) -> torch.dtype | None:
        return self.scorer.config.projection_dtype


def tap_module_output(scorer: SiteScorer, site: TapSite, module: torch.nn.Module) -> None:
    """Tap ``module``'s output, saving its input (the first argument, or ``input=`` as torch names it)."""

    def hook(_module, args, kwargs, output):
        return site.tap(output, args[0] if args else kwargs["input"])

    scorer.add_hook(module.register_forward_hook(hook, with_kwargs=True))


@dataclass(eq=False)
class NormSite(TapSite):
    """LayerNorm or RMSNorm over the last dimension; tokens along every other dim but ``batch_dim``."""

    norm: torch.nn.Module | None = None
    rms: bool = False
    batch_dim: int = 0

    def partial(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.norm.weight, getattr(self.norm, "bias", None)
        g_weight = self.grads[weight] if weight is not None else None
        eps = self.norm.eps
        eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
        kw = dict(eps=eps, batch_dim=self.batch_dim, projection_dtype=self.projection_dtype)
        if self.rms:
            return rules.rms_norm_scores(x, grad, g_weight, **kw)
        return rules.layer_norm_scores(x, grad, g_weight, self.grads[bias] if bias is not None else None, **kw)


def norm_site(scorer: SiteScorer, name: str, module: torch.nn.Module, *, batch_dim: int) -> list[Site]:
    """Site of a torch LayerNorm/RMSNorm. Under sequence parallelism (weights tagged
    ``sequence_parallel``) each tensor-parallel rank normalises its own tokens and counts them;
    otherwise an identical copy is counted once (``scorer.counts``)."""
    params = tuple(p for p in (module.weight, getattr(module, "bias", None)) if p is not None)
    if not params:
        return []
    weight_shape = tuple(getattr(params[0], "ds_shape", params[0].shape))  # ZeRO-3 partitions hide the shape
    if tuple(module.normalized_shape) != weight_shape:
        raise NotImplementedError(f"{name}: only norms over the last dimension are supported")
    sequence_parallel = any(getattr(p, "sequence_parallel", False) for p in params)
    site = NormSite(
        name=name,
        params=params,
        scorer=scorer,
        counted_here=sequence_parallel or scorer.counts(params[0]),
        norm=module,
        rms=isinstance(module, torch.nn.RMSNorm),
        batch_dim=batch_dim,
    )
    tap_module_output(scorer, site, module)
    return [site]


# --------------------------------------------------------------------------------------
# The public rule registry (batch-first layers).

#: ``rule(layer, x, grad_output, G, *, projection_dtype) -> [K, T, B] or [K, B]``: the scores of one microbatch
#: from what ``layer`` saw: its input ``x`` (the first argument of its forward), the gradient of its
#: output, and ``G``, the validation gradient ``[K, *shape]`` of each of its trainable parameters by
#: name (as in ``layer.named_parameters()``). See :func:`register_rule`.
ScoreRule = Callable[..., torch.Tensor]

#: ``unsupported(layer) -> reason or None``: why this instance of a registered type cannot be scored.
Unsupported = Callable[[torch.nn.Module], "str | None"]


@dataclass(eq=False)
class RuleSite(TapSite):
    """A layer scored by a registered :data:`ScoreRule` from its output gradient and saved input."""

    layer: torch.nn.Module | None = None
    rule: ScoreRule | None = None
    param_names: tuple[str, ...] = ()

    def partial(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Gathered here, one parameter at a time in a fixed order, so that under ZeRO-3 every rank
        # runs the same all-gathers (docs/DESIGN.md §2.5) whatever the rule reads.
        g_val = {name: self.grads[p] for name, p in zip(self.param_names, self.params)}
        try:
            return self.rule(self.layer, x, grad, g_val, projection_dtype=self.projection_dtype)
        except Exception as e:  # a rule knows its layer, not where in the model it sits
            raise RuntimeError(f"the score rule of {self.name} ({type(self.layer).__name__}) failed: {e}") from e


def _first_input(name: str, args: tuple, kwargs: Mapping) -> torch.Tensor:
    """The layer input a rule gets: the first positional argument, or the only keyword argument."""
    if args:
        return args[0]
    if len(kwargs) == 1:
        return next(iter(kwargs.values()))
    raise RuntimeError(
        f"{name} was called with keyword arguments {sorted(kwargs)} only: its score rule needs the layer input"
        " as its first (or only) argument"
    )


def _rule_builder(rule: ScoreRule, unsupported: Unsupported | None) -> SiteBuilder:
    def build(scorer: SiteScorer, name: str, module: torch.nn.Module) -> list[Site]:
        reason = unsupported(module) if unsupported is not None else None
        if reason:
            raise NotImplementedError(f"{name}: {reason}")
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            return []
        site = RuleSite(
            name=name,
            params=tuple(p for _, p in named),
            scorer=scorer,
            layer=module,
            rule=rule,
            param_names=tuple(n for n, _ in named),
        )

        def hook(_module, args, kwargs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"{name} ({type(module).__name__}) returned {type(output).__name__}: a score rule is"
                    " registered for layers whose forward returns one tensor"
                )
            return site.tap(output, _first_input(name, args, kwargs))

        scorer.add_hook(module.register_forward_hook(hook, with_kwargs=True))
        return [site]

    return build


def register_rule(
    *module_types: type[torch.nn.Module], unsupported: Unsupported | None = None
) -> Callable[[ScoreRule], ScoreRule]:
    """Register ``rule`` as the score rule of ``module_types`` (a decorator), Opacus ``grad_sample`` style.

    ``rule(layer, x, grad_output, G, *, projection_dtype) -> [K, B]`` returns, for each validation
    target ``k`` and each sequence ``j`` of the microbatch, ``<gradient of sequence j's loss with respect
    to the layer's trainable parameters, G_k>``, or ``[K, T, B]``: each of the ``T`` sequence positions'
    part of it, as the helpers of :mod:`inrun_megatron.rules` return (document values,
    ``docs/DESIGN.md`` §2.9, need these), from the layer's input ``x`` (the first argument of its
    forward), the gradient ``grad_output`` of its (single tensor) output and ``G``: ``{parameter name:
    validation gradient [K, *parameter shape]}`` for every trainable parameter of the layer, by its name
    in ``layer.named_parameters()`` (a frozen parameter has none). Tensors are batch-first, as the layer
    sees them. Because other sequences' losses do not depend on sequence j's activations, the slice of
    ``grad_output`` belonging to sequence j *is* its own output gradient (``docs/DESIGN.md`` §2.2); a rule
    is pure tensor math and must not read the parameters' values (under ZeRO-3 they are partitioned
    while it runs) or communicate. ``projection_dtype`` is ``ScoringConfig.projection_dtype`` (None: the
    activations' dtype, half precision promoted to float32); the helpers of :mod:`inrun_megatron.rules`
    take it. ``unsupported(layer)`` may name why one instance cannot be scored; attaching then fails.

    Types match exactly (a subclass is not scored by its parent's rule: it may compute something else),
    and a registered layer's submodules are not visited: its rule covers every parameter under it. A
    rule registered later for the same type replaces the earlier one. The rules path
    (``docs/DESIGN.md`` §2.2) uses these rules for models trained by
    :class:`inrun_megatron.deepspeed.DeepSpeedScorer` without megatron-core layers.
    """
    for t in module_types:
        if not (isinstance(t, type) and issubclass(t, torch.nn.Module)):
            raise TypeError(f"register_rule takes torch.nn.Module subclasses, got {t!r}")

    def register(rule: ScoreRule) -> ScoreRule:
        for t in module_types:
            TORCH_SITE_BUILDERS[t] = _rule_builder(rule, unsupported)
        return rule

    return register


# --------------------------------------------------------------------------------------
# Built-in rules of plain PyTorch layers.


@register_rule(torch.nn.Linear)
def linear_rule(layer: torch.nn.Linear, x, grad_output, G, *, projection_dtype):
    """``y = x W^T (+ bias)``."""
    kw = dict(batch_dim=0, projection_dtype=projection_dtype)
    if "weight" in G:
        return rules.linear_scores(x, grad_output, G["weight"], G.get("bias"), **kw)
    return rules.bias_scores(grad_output, G["bias"], **kw)


def unsupported_embedding(layer: torch.nn.Embedding) -> str | None:
    if layer.max_norm is not None or layer.scale_grad_by_freq or layer.sparse:
        return "nn.Embedding with max_norm, scale_grad_by_freq or sparse is not supported"
    return None


def lookup_gradient(layer: torch.nn.Embedding, ids: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The output gradient of the tokens whose row receives it: a ``padding_idx`` row gets no gradient
    from the lookup, while its validation gradient need not be zero (a tied output layer uses the row)."""
    if ids.dim() < 2:
        raise RuntimeError(
            f"it was looked up with indices of shape {tuple(ids.shape)}, without a batch dimension; its output"
            " is broadcast over the batch and has no per-sequence gradient: look it up with [batch, seq] ids"
            " (e.g. position_ids expanded to the batch)"
        )
    if layer.padding_idx is None:
        return grad_output
    return grad_output.masked_fill((ids == layer.padding_idx).unsqueeze(-1), 0)


@register_rule(torch.nn.Embedding, unsupported=unsupported_embedding)
def embedding_rule(layer: torch.nn.Embedding, ids, grad_output, G, *, projection_dtype):
    """``y = E[ids]``; tokens of the ``padding_idx`` row contribute nothing, as in training."""
    b = lookup_gradient(layer, ids, grad_output)
    return rules.embedding_scores(ids, b, G["weight"], batch_dim=0, projection_dtype=projection_dtype)


def _unsupported_norm(layer: torch.nn.Module) -> str | None:
    if len(layer.normalized_shape) != 1:
        return "only norms over the last dimension are supported"
    return None


@register_rule(torch.nn.LayerNorm, torch.nn.RMSNorm, unsupported=_unsupported_norm)
def norm_rule(layer: torch.nn.Module, x, grad_output, G, *, projection_dtype):
    """``nn.LayerNorm`` / ``nn.RMSNorm`` over the last dimension."""
    eps = torch.finfo(x.dtype).eps if layer.eps is None else float(layer.eps)
    kw = dict(eps=eps, batch_dim=0, projection_dtype=projection_dtype)
    if isinstance(layer, torch.nn.RMSNorm):
        return rules.rms_norm_scores(x, grad_output, G["weight"], **kw)
    return rules.layer_norm_scores(x, grad_output, G.get("weight"), G.get("bias"), **kw)
