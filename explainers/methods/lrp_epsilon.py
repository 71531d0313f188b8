"""LRP with the epsilon rule on every layer (Bach et al. 2015)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from explainers._gradients import Reduce, reduce_channels
from explainers._lrp import Rule, lrp, trace_layers
from explainers.base import Explainer, ExplainerSpec, Family
from explainers.registry import register


class LRPEpsilonParams(BaseModel):
    """Parameters of :class:`LRPEpsilon`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epsilon: float = Field(0.25, ge=0.0)
    reduce: Reduce = "sum"


@register
class LRPEpsilon(Explainer):
    """Relevance of the target logit, ``R_j = sum_k a_j w_jk R_k / (z_k + eps sign z_k)``.

    ``epsilon = 0`` (with zennit's 1e-6 floor for zeros) is LRP-0. BatchNorm is folded into
    the preceding convolution. The initial relevance is the target logit, so the map sums
    to about that logit on bias-free ReLU networks (zennit's ``attr_output = one_hot *
    output``). See :mod:`explainers._lrp` for the implementation and its assumptions.

    References
    ----------
    S. Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by
    Layer-Wise Relevance Propagation", PLoS ONE 2015.
    """

    spec = ExplainerSpec(
        name="lrp_epsilon",
        family=Family.RELEVANCE,
        summary="LRP, epsilon rule on every layer",
        references=("bach2015",),
    )
    Params = LRPEpsilonParams

    def rule_for(self, layer: nn.Module, first: bool) -> Rule:
        """The rule of ``layer``."""
        return Rule("epsilon", epsilon=self.p.epsilon or 1e-6)

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        key = (tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
        if getattr(self, "_traced_key", None) != key:  # the layer order and BatchNorm folds
            self._traced = trace_layers(self.model, inputs[:1])
            self._traced_key = key
        return reduce_channels(lrp(self.model, inputs, targets, self.rule_for, self._traced),
                               self.p.reduce)
