"""Eigen-Grad-CAM (pytorch-grad-cam's ``EigenGradCAM``)."""

from __future__ import annotations

from torch import Tensor

from attriflow.explainers._cam import CAMExplainer, first_component
from attriflow.explainers._numerics import as_working
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


@register
class EigenGradCAM(CAMExplainer):
    """Eigen-CAM of the gradient-weighted activations ``dS/dA * A``: per image, their
    projection on the first principal component over positions (class-discriminative,
    unlike Eigen-CAM). The component's sign is arbitrary; it is oriented to correlate
    positively with the channel sum of ``dS/dA * A`` (the HiResCAM map). Equal to
    pytorch-grad-cam's ``get_2d_projection(grads * activations)`` up to that sign (the test).

    References
    ----------
    J. Gildenblat and contributors, pytorch-grad-cam (``eigen_grad_cam.py``), 2021;
    M. B. Muhammad, M. Yeasin, "Eigen-CAM", IJCNN 2020.
    """

    spec = ExplainerSpec(
        name="eigen_grad_cam",
        family=Family.CAM,
        access=("gradients", "activations"),
        summary="first principal component of activations times gradients",
        references=("jacobgil2021", "muhammad2020"),
    )
    eigen_smooth_refusal = ("its map already is the first principal component of gradients x activations "
                            "(hires_cam with eigen_smooth=True is the same map)")

    def combine(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        assert grads is not None
        return first_component(as_working(grads) * as_working(acts))
