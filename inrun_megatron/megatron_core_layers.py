"""Megatron-Core layer support: one unit that both adapters compose (:class:`MegatronCoreLayers`).

Scoring megatron-core's layers takes the same things whichever framework trains them (megatron's
own schedules and DDP, or a DeepSpeed engine doing data parallelism and ZeRO around them):

* site builders for megatron-core's layer kinds (see :mod:`inrun_megatron.sites`):

  * linear layers (Column/RowParallelLinear, the output layer): megatron's linear autograd
    function ``LinearWithGradAccumulationAndAsyncCommunication`` gets a wrapped ``backward`` that
    scores first, then runs megatron's own backward untouched. It sees the layer input as saved for
    the weight gradient and the full-sequence output gradient, and runs exactly once per
    microbatch, also under activation recomputation;
  * word (vocab-parallel) and learned position embeddings: one tap on the word-embedding output;
  * norms: torch LayerNorm/RMSNorm (megatron's ``WrappedTorchNorm``), tapped on ``[s, b, h]``;

* the lifetime of that patch on megatron's linear backward (reference counted over every scorer
  attached, removed with the last);
* tensor-parallel counting (``docs/DESIGN.md`` §2.4): tensor-parallel shards are summed over TP
  ranks; a parameter whose identical copy lives on every TP rank (row-parallel biases, position
  embeddings, norms without sequence parallelism) is counted on TP rank 0 only;
* the tied output weight: a GPT output layer without a weight of its own multiplies by the
  embedding weight, which is scored there too;
* the megatron-core versions the support is tested with.

An adapter creates one :class:`MegatronCoreLayers` for its models, takes its site builders from
:meth:`MegatronCoreLayers.attach` and answers the site builders' ``scorer.counts`` and
``scorer.tied_output_weight`` from it. Neither adapter imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.package_info import __version__ as MEGATRON_VERSION
from megatron.core.tensor_parallel import layers as tp_layers
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    param_is_not_tensor_parallel_duplicate,
)

from inrun_megatron import rules
from inrun_megatron.sites import Site, SiteBuilder, SiteScorer, TapSite, norm_site, site_registry

#: megatron-core release lines the megatron-core layer support is tested against.
TESTED_MEGATRON = ("0.16.", "0.19.")


def check_megatron_version(allow_untested: bool = False, version: str = MEGATRON_VERSION) -> None:
    if version.startswith(TESTED_MEGATRON) or allow_untested:
        return
    raise RuntimeError(
        f"inrun_megatron is tested with megatron-core {', '.join(v + 'x' for v in TESTED_MEGATRON)};"
        f" megatron-core {version} is installed. Install a tested version, or pass"
        " ScoringConfig(allow_untested_megatron=True) and check the scores against the brute-force"
        " tests first"
    )


SITE_BUILDERS, builds_sites = site_registry()


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
    if site is not None and site.scorer.scoring == "rules":
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
    """``y = a W^T (+ bias)``; the bias may be added inside the function or by the caller
    (``skip_bias_add``): either way its per-token gradient is the output gradient."""

    weight: torch.nn.Parameter | None = None
    bias: torch.nn.Parameter | None = None
    bias_counted_here: bool = True

    def score(self, ctx, grad_output: torch.Tensor) -> None:
        step = self.scorer.step_scores
        microbatch = step.next_microbatch(self)
        a = ctx.saved_tensors[0]
        if ctx.sequence_parallel:  # the function saved only this rank's sequence shard
            a = _gather_sequence(a, ctx.tp_group)
        grads = self.scorer.grads
        partial = rules.linear_scores(
            a,
            grad_output,
            grads[self.weight],
            grads[self.bias] if self.bias is not None and self.bias_counted_here else None,
            batch_dim=1,
            projection_dtype=self.scorer.config.projection_dtype,
        )
        step.add(microbatch, partial, self)


@builds_sites(ColumnParallelLinear, RowParallelLinear)
def linear_sites(scorer: SiteScorer, name: str, module: torch.nn.Module) -> list[Site]:
    weight = module.weight
    if weight is None:
        # The tied output layer of a GPTModel gets the embedding weight at call time.
        weight = scorer.tied_output_weight(name, module)
    if not scorer.counts(weight):
        raise NotImplementedError(f"{name}: a linear weight replicated over tensor-parallel ranks is not supported")
    bias = module.bias if isinstance(module.bias, torch.nn.Parameter) else None
    site = LinearSite(
        name=name,
        params=(weight,) if bias is None else (weight, bias),
        scorer=scorer,
        weight=weight,
        bias=bias,
        bias_counted_here=bias is not None and scorer.counts(bias),
    )
    weight._inrun_linear_site = site
    scorer.on_detach(lambda: delattr(weight, "_inrun_linear_site"))
    return [site]


# --------------------------------------------------------------------------------------
# Embeddings and norms: taps on the module output.


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

    def partial(self, grad: torch.Tensor, ids: torch.Tensor, *positions: torch.Tensor) -> torch.Tensor:
        if self.word.reduce_scatter_embeddings:  # grad is this rank's [s/tp, b, h] shard
            grad = _gather_sequence(grad, self.word.tp_group).transpose(0, 1)
        word = self.word.weight
        partial = rules.embedding_scores(
            ids,
            grad,
            self.grads[word],
            batch_dim=0,
            row_offset=self.word.vocab_start_index,
            projection_dtype=self.projection_dtype,
        )
        if positions and self.scorer.counts(self.position.weight):
            table = self.grads[self.position.weight]
            partial = partial + rules.embedding_scores(
                positions[0].expand(ids.shape), grad, table, batch_dim=0, projection_dtype=self.projection_dtype
            )
        return partial


@builds_sites(LanguageModelEmbedding)
def language_embedding_sites(scorer: SiteScorer, name: str, module: torch.nn.Module) -> list[Site]:
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


@builds_sites(torch.nn.LayerNorm, torch.nn.RMSNorm)
def megatron_norm_sites(scorer: SiteScorer, name: str, module: torch.nn.Module) -> list[Site]:
    return norm_site(scorer, name, module, batch_dim=1)  # megatron activations are [s, b, h]


class MegatronCoreLayers:
    """Everything scoring megatron-core layers needs, for the models one scorer attaches to.

    Args:
        models: the unwrapped megatron-core models (chunks) the scorer scores.
        tp_group: the tensor-parallel group the models' layers are sharded over (megatron's global
            one if None).
        allow_untested_megatron: accept a megatron-core release outside :data:`TESTED_MEGATRON`.
    """

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        *,
        tp_group: dist.ProcessGroup | None = None,
        allow_untested_megatron: bool = False,
    ):
        check_megatron_version(allow_untested_megatron)
        self.models = list(models)
        self.tp_group = tp_group

    def counts(self, param: torch.nn.Parameter) -> bool:
        """Whether this rank counts ``param``: False for a tensor-parallel duplicate off TP rank 0."""
        return param_is_not_tensor_parallel_duplicate(param, tp_group=self.tp_group)

    def tied_output_weight(self, name: str, module: torch.nn.Module) -> torch.nn.Parameter:
        """The embedding weight a weightless output layer multiplies by (tied embeddings)."""
        for model in self.models:
            if getattr(model, "output_layer", None) is module and model.share_embeddings_and_output_weights:
                return model.shared_embedding_or_output_weight()
        raise NotImplementedError(
            f"{name}: a linear layer without its own weight is only supported as GPT's tied output layer"
        )

    def attach(self, scorer: SiteScorer) -> Mapping[type, SiteBuilder]:
        """Route megatron's linear backward through the scorers until ``scorer`` detaches; return the
        site builders of megatron-core's layer kinds."""
        install_linear_patch()
        scorer.on_detach(remove_linear_patch)
        return SITE_BUILDERS
