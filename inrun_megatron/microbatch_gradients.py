"""The microbatch-gradient path: score each microbatch's own parameter gradient (framework independent).

When a microbatch holds one sequence, that sequence's gradient *is* the microbatch's gradient,
which training computes anyway. Its raw score is ``<gradient of microbatch m, G>`` over the
rank's parameters: one memory-bound dot product per parameter and microbatch, no GEMM, and
indifferent to what the layers are (Hugging Face modules, Transformer Engine, anything with a
gradient). See ``docs/DESIGN.md`` §2.3.

The gradient is read by a tensor hook on each parameter. A leaf tensor's hooks run before
autograd accumulates the gradient into ``.grad`` and before any hook registered on the
gradient accumulator (where megatron DDP and DeepSpeed ZeRO add it to their buffers and start
reducing), so a hook sees exactly this backward's local gradient of the parameter, summed over
every use of the parameter in the forward (tied weights), before any data-parallel reduction.
The factors the framework applied to the loss (division by microbatches, loss scaling) are in
that gradient exactly as in the per-layer rules' output gradients, so adapters rescale both
paths the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from inrun_megatron.sites import Site, SiteScorer

#: ``local_scores(param, grad, g_val) -> [K]``: the dot products of the gradient this backward
#: produced for ``param`` with each target's ``G`` (``g_val``: ``[K, n]``), given what the
#: parameter's tensor hook received. Adapters replace :func:`gradient_scores` where a framework
#: writes the gradient elsewhere (megatron's fused accumulation into ``main_grad``) or holds
#: ``G`` in another form.
LocalScores = Callable[[torch.nn.Parameter, torch.Tensor, torch.Tensor], torch.Tensor]


def gradient_scores(param: torch.nn.Parameter, grad: torch.Tensor, g_val: torch.Tensor) -> torch.Tensor:
    """``[K, n] @ [n]``: every target in one matrix-vector product, accumulated in G's dtype
    (float32, or float64 for float64 models) whatever the gradient's precision."""
    return g_val @ grad.reshape(-1).to(g_val.dtype)


@dataclass(eq=False)
class ParameterSite(Site):
    """One parameter scored from its own gradient; ``calls`` counts its backward passes in the step."""

    local_scores: LocalScores = gradient_scores

    def score(self, grad: torch.Tensor) -> None:
        step = self.scorer.step_scores
        microbatch = step.next_microbatch(self)
        (param,) = self.params
        g_val = self.scorer.grads[param]
        partial = self.local_scores(param, grad, g_val.reshape(g_val.shape[0], -1))
        step.add(microbatch, partial.to(torch.float64).unsqueeze(1), self)


def attach_parameter_sites(
    scorer: SiteScorer,
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    counted: Callable[[torch.nn.Parameter], bool],
    local_scores: LocalScores = gradient_scores,
) -> list[ParameterSite]:
    """Hook every trainable parameter that this rank counts; return their sites.

    Parameters that ``counted`` rejects (a tensor-parallel duplicate counted on another rank)
    get no hook. Each parameter is hooked once, however many names it has (tied weights).
    """
    sites: list[ParameterSite] = []
    seen: set[int] = set()
    for name, param in named_params:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if not counted(param):
            continue
        site = ParameterSite(name=name, params=(param,), scorer=scorer, local_scores=local_scores)
        scorer.add_hook(param.register_hook(_hook(site)))
        sites.append(site)
    return sites


def _hook(site: ParameterSite) -> Callable[[torch.Tensor], None]:
    def hook(grad: torch.Tensor) -> None:
        if site.scorer.scoring == "microbatch":
            site.score(grad)

    return hook
