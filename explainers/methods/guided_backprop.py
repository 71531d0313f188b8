"""Guided back-propagation (Springenberg et al. 2015)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from explainers._gradients import Reduce, input_gradient, reduce_channels, relu_backward
from explainers._scores import ScoreKind
from explainers.base import Explainer, ExplainerSpec, Family
from explainers.registry import register


class GuidedBackpropParams(BaseModel):
    """Parameters of :class:`GuidedBackprop`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    score: ScoreKind = "logit"
    reduce: Reduce = "max_abs"


@register
class GuidedBackprop(Explainer):
    """Input gradient where every ReLU passes back only positive gradients at positive inputs.

    Notes
    -----
    Acts on ``nn.ReLU`` modules; a model applying ``F.relu`` functionally is not guided there.

    References
    ----------
    J. T. Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR-W 2015.
    """

    spec = ExplainerSpec(
        name="guided_backprop",
        family=Family.GRADIENT,
        summary="gradient with positive-only ReLU back-propagation",
        references=("springenberg2015",),
    )
    Params = GuidedBackpropParams
    mode = "guided"

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        with relu_backward(self.model, self.mode):  # type: ignore[arg-type]
            grad = input_gradient(self.model, inputs, targets, self.p.score)
        return reduce_channels(grad, self.p.reduce)
