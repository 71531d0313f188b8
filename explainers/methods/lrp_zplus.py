"""LRP with the z-plus rule on every layer (Montavon et al. 2017)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from attriflow.explainers._gradients import Reduce
from attriflow.explainers._lrp import Rule
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.methods.lrp_epsilon import LRPEpsilon
from attriflow.explainers.registry import register


class LRPZPlusParams(BaseModel):
    """Parameters of :class:`LRPZPlus`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stabilizer: float = Field(1e-6, gt=0.0)
    reduce: Reduce = "sum"


@register
class LRPZPlus(LRPEpsilon):
    """Relevance through positive contributions only: ``z+ = W+ x+ + b+ + W- x-`` (zennit's
    ZPlus, which also handles negative inputs), on every Conv and Linear layer.

    Notes
    -----
    The rule conserves relevance where every unit that receives relevance has a positive
    contribution (``z+ > 0``). Behind a ReLU that holds; where a convolution's output is not
    rectified (the linear bottlenecks of MobileNet, MNASNet, ShuffleNet and EfficientNet),
    a unit with no positive contribution can still receive relevance from the next layer,
    and z+ drops it: the map then sums to less than the logit (on bias-free versions of
    those networks 34-99 % is kept; ``benchmarks/ZOO.md``). zennit's ZPlus does the same.
    Relevance is never created. The same holds for the z+ layers of ``lrp_composite`` and
    for ``lrp_alpha_beta`` with beta = 0.

    References
    ----------
    G. Montavon et al., "Explaining Nonlinear Classification Decisions with Deep Taylor
    Decomposition", Pattern Recognition 2017.
    """

    spec = ExplainerSpec(
        name="lrp_zplus",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.RELEVANCE,
        summary="LRP, z-plus rule on every layer",
        references=("montavon2017",),
    )
    Params = LRPZPlusParams

    def rule_for(self, layer: nn.Module, first: bool) -> Rule:  # noqa: D102
        return Rule("zplus", epsilon=self.p.stabilizer)
