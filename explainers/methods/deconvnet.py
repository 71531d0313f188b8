"""DeconvNet (Zeiler & Fergus 2014)."""

from __future__ import annotations

import torch
from torch import Tensor

from explainers._gradients import input_gradient, reduce_channels, relu_backward
from explainers.base import Explainer, ExplainerSpec, Family
from explainers.methods.guided_backprop import GuidedBackpropParams
from explainers.registry import register


@register
class DeconvNet(Explainer):
    """Back-projection where every ReLU passes back the positive part of the gradient,
    ignoring the forward activation pattern.

    References
    ----------
    M. D. Zeiler, R. Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014.
    """

    spec = ExplainerSpec(
        name="deconvnet",
        family=Family.GRADIENT,
        summary="back-projection through rectified ReLU gradients",
        references=("zeiler2014",),
    )
    Params = GuidedBackpropParams

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        with relu_backward(self.model, "deconv"):
            grad = input_gradient(self.model, inputs, targets, self.p.score)
        return reduce_channels(grad, self.p.reduce)
