"""Where each Megatron-Core layer kind gets its score: one small site builder per module type.

A builder turns one module into :class:`~inrun_megatron.scores.Site` objects that call a rule
from :mod:`inrun_megatron.rules` in the layer's backward. Two capture mechanisms:

* Linear layers (Column/RowParallelLinear, the output layer): megatron's linear autograd
  function ``LinearWithGradAccumulationAndAsyncCommunication`` gets a wrapped ``backward``
  that scores first, then runs megatron's own backward untouched. It sees the layer input as
  saved for the weight gradient and the full-sequence output gradient, and runs exactly once
  per microbatch, also under activation recomputation.
* Embeddings and norms: a forward hook routes the module output through :class:`_Tap`, an
  identity autograd function whose backward receives the output gradient. Taps are only
  inserted while a training pass is being scored, so validation and evaluation forwards run
  unmodified.

Counting (DESIGN §2.3): tensor-parallel shards are summed over TP ranks; a parameter whose
identical copy lives on every TP rank (row-parallel biases, position embeddings, norms
without sequence parallelism) is counted on TP rank 0 only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.tensor_parallel import layers as tp_layers
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    param_is_not_tensor_parallel_duplicate,
)

from inrun_megatron import rules
from inrun_megatron.scores import Site

if TYPE_CHECKING:
    from inrun_megatron.megatron.scorer import MegatronScorer

SiteBuilder = Callable[["MegatronScorer", str, torch.nn.Module], list[Site]]
SITE_BUILDERS: dict[type, SiteBuilder] = {}


def builds_sites(*module_types: type) -> Callable[[SiteBuilder], SiteBuilder]:
    """Register a site builder for the given module types (exact type match)."""

    def register(fn: SiteBuilder) -> SiteBuilder:
        for t in module_types:
            SITE_BUILDERS[t] = fn
        return fn

    return register


def _counted(param: torch.nn.Parameter | None) -> bool:
    return param is not None and param_is_not_tensor_parallel_duplicate(param)


def _gather_sequence(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather a sequence-parallel shard ``[s/tp, ...]`` into ``[s, ...]``."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


# --------------------------------------------------------------------------------------
# Linear layers: wrap the backward of megatron's linear autograd function.

_LINEAR_FN = tp_layers.LinearWithGradAccumulationAndAsyncCommunication
_original_linear_backward = None
_linear_patch_users = 0


def _scored_linear_backward(ctx, grad_output):
    weight = ctx.saved_tensors[1]
    site = getattr(weight, "_inrun_linear_site", None)
    if site is not None and site.scorer.scoring:
        site.score(ctx, grad_output)
    return _original_linear_backward(ctx, grad_output)


def install_linear_patch() -> None:
    """Route megatron's linear backward through the scorer (reference counted, global)."""
    global _original_linear_backward, _linear_patch_users
    if _linear_patch_users == 0:
        _original_linear_backward = _LINEAR_FN.backward
        _LINEAR_FN.backward = staticmethod(_scored_linear_backward)
    _linear_patch_users += 1


def remove_linear_patch() -> None:
    global _linear_patch_users
    _linear_patch_users -= 1
    if _linear_patch_users == 0:
        _LINEAR_FN.backward = staticmethod(_original_linear_backward)


@dataclass(eq=False)
class LinearSite(Site):
    """``y = a W^T (+ bias)``; the bias may be added inside the function or by the caller."""

    scorer: MegatronScorer | None = None
    weight: torch.nn.Parameter | None = None
    bias: torch.nn.Parameter | None = None

    def score(self, ctx, grad_output: torch.Tensor) -> None:
        step = self.scorer.step_scores
        microbatch = step.next_microbatch(self)
        a = ctx.saved_tensors[0]
        if ctx.sequence_parallel:  # the function saved only this rank's sequence shard
            a = _gather_sequence(a, ctx.tp_group)
        grads = self.scorer.grads
        g_bias = grads[self.bias] if _counted(self.bias) else None
        partial = rules.linear_scores(
            a,
            grad_output,
            grads[self.weight],
            g_bias,
            batch_dim=1,
            projection_dtype=self.scorer.config.projection_dtype,
        )
        step.add(microbatch, partial)


@builds_sites(ColumnParallelLinear, RowParallelLinear)
def linear_sites(scorer: MegatronScorer, name: str, module: torch.nn.Module) -> list[Site]:
    weight = module.weight
    if weight is None:
        # The tied output layer of a GPTModel gets the embedding weight at call time.
        weight = scorer.tied_output_weight(name, module)
    bias = module.bias if isinstance(module.bias, torch.nn.Parameter) else None
    if not _counted(weight):
        raise NotImplementedError(f"{name}: a linear weight replicated over tensor-parallel ranks is not supported")
    params = (weight,) if bias is None else (weight, bias)
    site = LinearSite(name=name, params=params, scorer=scorer, weight=weight, bias=bias)
    weight._inrun_linear_site = site
    scorer.on_detach(lambda: delattr(weight, "_inrun_linear_site"))
    return [site]


# --------------------------------------------------------------------------------------
# Embeddings and norms: an identity autograd function on the module output.


class _Tap(torch.autograd.Function):
    """Identity in forward; hands the output gradient and saved tensors to a site in backward."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, site: TapSite, *saved: torch.Tensor) -> torch.Tensor:
        ctx.site = site
        ctx.save_for_backward(*saved)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.site.scorer.scoring:
            ctx.site.score(grad, *ctx.saved_tensors)
        return (grad, None) + (None,) * len(ctx.saved_tensors)


@dataclass(eq=False)
class TapSite(Site):
    """A site scored from a module's output gradient and tensors saved at its forward."""

    scorer: MegatronScorer | None = None
    hooks: list = field(default_factory=list)

    def tap(self, output: torch.Tensor, *saved: torch.Tensor) -> torch.Tensor:
        if not (self.scorer.scoring and torch.is_grad_enabled()):
            return output
        return _Tap.apply(output, self, *saved)

    def score(self, grad: torch.Tensor, *saved: torch.Tensor) -> None:
        raise NotImplementedError


@dataclass(eq=False)
class LanguageEmbeddingSite(TapSite):
    """Word embeddings (vocab-parallel) plus optional learned position embeddings.

    Both tables feed the same sum ``word[ids] + pos[positions]`` before dropout, so the
    gradient of the word-embedding output is also each token's position-embedding gradient.
    It is taken at the word-embedding output, where it is per sample even when position ids
    are shared by the whole batch.
    """

    word: torch.nn.Module | None = None
    position: torch.nn.Module | None = None
    position_ids: torch.Tensor | None = None

    def score(self, grad: torch.Tensor, ids: torch.Tensor, *positions: torch.Tensor) -> None:
        step = self.scorer.step_scores
        microbatch = step.next_microbatch(self)
        grads, dtype = self.scorer.grads, self.scorer.config.projection_dtype
        if self.word.reduce_scatter_embeddings:  # grad is this rank's [s/tp, b, h] shard
            grad = _gather_sequence(grad, self.word.tp_group).transpose(0, 1)
        partial = rules.embedding_scores(
            ids,
            grad,
            grads[self.word.weight],
            batch_dim=0,
            row_offset=self.word.vocab_start_index,
            projection_dtype=dtype,
        )
        if positions and _counted(self.position.weight):
            pos = positions[0].expand(ids.shape)
            partial = partial + rules.embedding_scores(
                pos, grad, grads[self.position.weight], batch_dim=0, projection_dtype=dtype
            )
        step.add(microbatch, partial)


@builds_sites(LanguageModelEmbedding)
def language_embedding_sites(scorer: MegatronScorer, name: str, module: torch.nn.Module) -> list[Site]:
    if getattr(module, "tokentype_embeddings", None) is not None:
        raise NotImplementedError(f"{name}: token-type embeddings are not supported")
    word = module.word_embeddings
    position = module.position_embeddings if module.add_position_embedding else None
    params = (word.weight,) if position is None else (word.weight, position.weight)
    site = LanguageEmbeddingSite(name=name, params=params, scorer=scorer, word=word, position=position)

    def remember_positions(_module, args, kwargs):
        site.position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]

    def tap_word_output(_module, args, output):
        saved = (args[0],) if position is None else (args[0], site.position_ids)
        return site.tap(output, *saved)

    scorer.add_hook(module.register_forward_pre_hook(remember_positions, with_kwargs=True))
    scorer.add_hook(word.register_forward_hook(tap_word_output))
    return [site]


@dataclass(eq=False)
class NormSite(TapSite):
    """LayerNorm or RMSNorm over the last dimension.

    Under sequence parallelism each TP rank normalises only its sequence shard, so every
    rank adds its part; otherwise the identical copy is counted on TP rank 0 only.
    """

    norm: torch.nn.Module | None = None
    rms: bool = False
    counted_here: bool = True

    def score(self, grad: torch.Tensor, x: torch.Tensor) -> None:
        step = self.scorer.step_scores
        microbatch = step.next_microbatch(self)
        if not self.counted_here:
            return
        grads, dtype = self.scorer.grads, self.scorer.config.projection_dtype
        weight, bias = self.norm.weight, getattr(self.norm, "bias", None)
        g_weight = grads[weight] if weight is not None else None
        if self.rms:
            partial = rules.rms_norm_scores(x, grad, g_weight, eps=self.eps, batch_dim=1, projection_dtype=dtype)
        else:
            g_bias = grads[bias] if bias is not None else None
            partial = rules.layer_norm_scores(
                x, grad, g_weight, g_bias, eps=self.eps, batch_dim=1, projection_dtype=dtype
            )
        step.add(microbatch, partial)

    @property
    def eps(self) -> float:
        eps = self.norm.eps
        return torch.finfo(torch.float32).eps if eps is None else float(eps)


@builds_sites(torch.nn.LayerNorm, torch.nn.RMSNorm)
def norm_sites(scorer: MegatronScorer, name: str, module: torch.nn.Module) -> list[Site]:
    params = tuple(p for p in (module.weight, getattr(module, "bias", None)) if p is not None)
    if not params:
        return []
    if tuple(module.normalized_shape) != (params[0].shape[-1],) or params[0].dim() != 1:
        raise NotImplementedError(f"{name}: only norms over the last dimension are supported")
    sequence_parallel = any(getattr(p, "sequence_parallel", False) for p in params)
    counted = sequence_parallel or _counted(params[0])
    site = NormSite(
        name=name,
        params=params,
        scorer=scorer,
        norm=module,
        rms=isinstance(module, torch.nn.RMSNorm),
        counted_here=counted,
    )
    scorer.add_hook(module.register_forward_hook(lambda _m, args, output: site.tap(output, args[0])))
    return [site]
