"""Gradient x Input (Shrikumar et al. 2016)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from attriflow.explainers._gradients import Reduce, input_gradient, reduce_channels
from attriflow.explainers._numerics import as_working
from attriflow.explainers._scores import ScoreKind
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register


class GradientXInputParams(BaseModel):
    """Parameters of :class:`GradientXInput`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    score: ScoreKind = "logit"
    reduce: Reduce = "sum"


@register
class GradientXInput(Explainer):
    """Input times the gradient of the target score, summed over channels by default.

    The input is the model's (normalised) input, so the implicit reference is 0 in that
    space, the dataset's mean colour.

    References
    ----------
    A. Shrikumar et al., "Not Just a Black Box: Learning Important Features Through
    Propagating Activation Differences", arXiv 1605.01713, 2016.
    """

    spec = ExplainerSpec(
        name="gradient_x_input",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.GRADIENT,
        summary="input times input gradient",
        references=("shrikumar2016",),
        needs_internals=False,
    )
    Params = GradientXInputParams

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        grad = as_working(input_gradient(self.model, inputs, targets, self.p.score))  # float32 for 16-bit
        return reduce_channels(grad * inputs.to(grad.dtype), self.p.reduce)
