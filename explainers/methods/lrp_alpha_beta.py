"""LRP with the alpha-beta rule on every layer (Bach et al. 2015)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from attriflow.explainers._gradients import Reduce
from attriflow.explainers._lrp import Rule
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.methods.lrp_epsilon import LRPEpsilon
from attriflow.explainers.registry import register


class LRPAlphaBetaParams(BaseModel):
    """Parameters of :class:`LRPAlphaBeta`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float = Field(2.0, ge=1.0)
    beta: float = Field(1.0, ge=0.0)
    stabilizer: float = Field(1e-6, gt=0.0)
    reduce: Reduce = "sum"

    @model_validator(mode="after")
    def _conserving(self) -> LRPAlphaBetaParams:
        if abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ValueError("alpha - beta must equal 1")
        return self


@register
class LRPAlphaBeta(LRPEpsilon):
    """``R = alpha * positive share - beta * negative share`` on every Conv and Linear layer
    (zennit's AlphaBeta: positive and negative inputs are both handled).

    Notes
    -----
    Relevance is conserved only where a unit has both positive and negative
    contributions; where it has no negative one its relevance is counted ``alpha`` times
    (as in zennit). ``alpha=1, beta=0`` is always conservative.

    References
    ----------
    S. Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by
    Layer-Wise Relevance Propagation", PLoS ONE 2015.
    """

    spec = ExplainerSpec(
        name="lrp_alpha_beta",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.RELEVANCE,
        summary="LRP, alpha-beta rule on every layer",
        references=("bach2015",),
    )
    Params = LRPAlphaBetaParams

    def rule_for(self, layer: nn.Module, first: bool) -> Rule:  # noqa: D102
        return Rule("alpha_beta", epsilon=self.p.stabilizer, alpha=self.p.alpha, beta=self.p.beta)
