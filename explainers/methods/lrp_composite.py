"""LRP composites with a special first layer (zennit's presets)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from attriflow.explainers._gradients import Reduce
from attriflow.explainers._lrp import Rule
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.methods.lrp_epsilon import LRPEpsilon
from attriflow.explainers.registry import register

Preset = Literal["epsilon_plus_flat", "epsilon_alpha2_beta1_flat", "epsilon_plus_box"]


class LRPCompositeParams(BaseModel):
    """Parameters of :class:`LRPComposite`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    preset: Preset = "epsilon_plus_flat"
    epsilon: float = Field(1e-6, ge=0.0)
    stabilizer: float = Field(1e-6, gt=0.0)
    low: float | None = None
    high: float | None = None
    reduce: Reduce = "sum"


@register
class LRPComposite(LRPEpsilon):
    """Rules by layer type: epsilon on Linear layers, z-plus (or alpha2-beta1) on
    convolutions, and the flat (or z-box) rule on the first layer, as zennit's
    ``EpsilonPlusFlat`` and ``EpsilonAlpha2Beta1Flat``; ``epsilon_plus_box`` puts z-box on
    the first layer with bounds ``low``/``high`` in model-input space (default: each
    image's minimum and maximum). BatchNorm is folded into the preceding convolution.

    References
    ----------
    G. Montavon et al., "Layer-Wise Relevance Propagation: An Overview", in Explainable AI,
    Springer 2019; C. J. Anders et al., zennit, arXiv 2106.13200, 2021.
    """

    spec = ExplainerSpec(
        name="lrp_composite",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.RELEVANCE,
        summary="LRP composite: epsilon dense, z-plus conv, flat/box first layer",
        references=("montavon2019", "anders2021"),
    )
    Params = LRPCompositeParams

    def rule_for(self, layer: nn.Module, first: bool) -> Rule:  # noqa: D102
        preset = self.p.preset
        if first:
            if preset.endswith("_box"):
                return Rule("box", epsilon=self.p.stabilizer, low=self.p.low, high=self.p.high)
            return Rule("flat", epsilon=self.p.stabilizer)
        if isinstance(layer, nn.Linear):
            return Rule("epsilon", epsilon=self.p.epsilon or 1e-6)
        if preset == "epsilon_alpha2_beta1_flat":
            return Rule("alpha_beta", epsilon=self.p.stabilizer, alpha=2.0, beta=1.0)
        return Rule("zplus", epsilon=self.p.stabilizer)
