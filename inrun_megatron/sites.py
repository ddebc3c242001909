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

This module holds the builders for plain PyTorch layers (``nn.Linear``, ``nn.Embedding``,
``nn.LayerNorm``, ``nn.RMSNorm``); framework-specific ones live with their adapter.
"""

from __future__ import annotations

from collections.abc import Callable
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


TORCH_SITE_BUILDERS, builds_sites = site_registry()


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
            if partial.shape[1] != step.totals.shape[2]:
                raise RuntimeError(
                    f"layer {self.name} computed an output for {partial.shape[1]} sequences in a micro-batch of"
                    f" {step.totals.shape[2]}: an output broadcast over the batch (e.g. position embeddings looked"
                    " up without a batch dimension) has no per-sequence gradient; give its input a batch dimension"
                )
            step.add(microbatch, partial)

    def partial(self, grad: torch.Tensor, *saved: torch.Tensor) -> torch.Tensor:
        """The ``[K, B]`` partial scores of one microbatch."""
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


@builds_sites(torch.nn.LayerNorm, torch.nn.RMSNorm)
def torch_norm_sites(scorer: SiteScorer, name: str, module: torch.nn.Module) -> list[Site]:
    return norm_site(scorer, name, module, batch_dim=0)


@dataclass(eq=False)
class TorchLinearSite(TapSite):
    """``nn.Linear`` on ``[batch, ..., d_in]`` inputs."""

    linear: torch.nn.Linear | None = None

    def partial(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        bias = self.linear.bias
        return rules.linear_scores(
            x,
            grad,
            self.grads[self.linear.weight],
            self.grads[bias] if bias is not None else None,
            batch_dim=0,
            projection_dtype=self.projection_dtype,
        )


@builds_sites(torch.nn.Linear)
def torch_linear_sites(scorer: SiteScorer, name: str, module: torch.nn.Linear) -> list[Site]:
    params = tuple(p for p in (module.weight, module.bias) if p is not None)
    site = TorchLinearSite(name=name, params=params, scorer=scorer, linear=module)
    tap_module_output(scorer, site, module)
    return [site]


@dataclass(eq=False)
class TorchEmbeddingSite(TapSite):
    """``nn.Embedding`` on ``[batch, ...]`` token ids. A ``padding_idx`` row gets no gradient, so
    its validation gradient is zero and padding tokens contribute nothing, exactly as in training."""

    embedding: torch.nn.Embedding | None = None

    def partial(self, grad: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() < 2:
            raise RuntimeError(
                f"{self.name} was looked up with indices of shape {tuple(ids.shape)}, without a batch dimension;"
                " its output is broadcast over the batch and has no per-sequence gradient: look it up with"
                " [batch, seq] ids (e.g. position_ids expanded to the batch)"
            )
        return rules.embedding_scores(
            ids, grad, self.grads[self.embedding.weight], batch_dim=0, projection_dtype=self.projection_dtype
        )


@builds_sites(torch.nn.Embedding)
def torch_embedding_sites(scorer: SiteScorer, name: str, module: torch.nn.Embedding) -> list[Site]:
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise NotImplementedError(f"{name}: nn.Embedding with max_norm, scale_grad_by_freq or sparse is not supported")
    site = TorchEmbeddingSite(name=name, params=(module.weight,), scorer=scorer, embedding=module)
    tap_module_output(scorer, site, module)
    return [site]
