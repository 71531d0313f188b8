"""Grad-CAM element-wise (pytorch-grad-cam's ``GradCAMElementWise``)."""

from __future__ import annotations

from torch import Tensor

from attriflow.explainers._cam import CAMExplainer
from attriflow.explainers._numerics import as_working
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


@register
class GradCAMElementWise(CAMExplainer):
    """``ReLU(sum_k ReLU(dS/dA_k * A_k))``: HiResCAM with each position's and channel's
    negative contributions dropped before the channel sum, so a channel that lowers the
    score at a position cannot cancel one that raises it. Equal to pytorch-grad-cam's
    ``GradCAMElementWise`` after its ReLU, min-max scaling and resize (the test).

    References
    ----------
    J. Gildenblat and contributors, pytorch-grad-cam (``grad_cam_elementwise.py``), 2021.
    """

    spec = ExplainerSpec(
        name="grad_cam_elementwise",
        family=Family.CAM,
        access=("gradients", "activations"),
        summary="positive parts of activations times their gradients, summed over channels",
        references=("jacobgil2021",),
    )

    def weighted(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """``ReLU(dS/dA * A)`` (N, C, h, w), position by position."""
        assert grads is not None
        return (as_working(grads) * as_working(acts)).clamp_min(0)
