"""HiResCAM (Draelos & Carin 2020)."""

from __future__ import annotations

from torch import Tensor

from attriflow.explainers._cam import CAMExplainer
from attriflow.explainers._numerics import as_working
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


@register
class HiResCAM(CAMExplainer):
    """Element-wise product of the layer's activations and the target score's gradient,
    summed over channels: ``ReLU(sum_k dS/dA_k * A_k)``.

    Grad-CAM averages each channel's gradient over positions first; HiResCAM keeps it per
    position. For a CNN whose head is ``layer -> global average pool -> linear`` the
    gradient is the same at every position, so HiResCAM equals Grad-CAM there (and CAM
    divided by the layer's h x w positions); elsewhere it shows the positions the score is
    locally sensitive to. Equal to
    pytorch-grad-cam's ``HiResCAM`` after its ReLU, min-max scaling and resize; with
    ``relu=False`` it is TorchRay's Linear Approximation (``linear_approx(..., resize=True)``),
    the two tests.

    References
    ----------
    R. L. Draelos, L. Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", arXiv:2011.08891, 2020.
    """

    spec = ExplainerSpec(
        name="hires_cam",
        family=Family.CAM,
        access=("gradients", "activations"),
        summary="activations times their gradients, position by position",
        references=("draelos2020",),
    )

    def weighted(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """``dS/dA * A`` (N, C, h, w), position by position."""
        assert grads is not None
        return as_working(grads) * as_working(acts)
