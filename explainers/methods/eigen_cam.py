"""Eigen-CAM (Muhammad & Yeasin 2020)."""

from __future__ import annotations

from torch import Tensor

from attriflow.explainers._cam import CAMExplainer, first_component, orient
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register

__all__ = ["EigenCAM", "first_component", "orient"]  # the projection moved to _cam, still importable here


@register
class EigenCAM(CAMExplainer):
    """Projection of the layer's activations on their first principal component.

    Per image, the (h*w, C) activation matrix is centred over positions and projected on
    its first right singular vector, found as the top eigenvector of the smaller of its
    Gram and covariance matrices (49 x 49 on ResNet-50's last block, where pytorch-grad-cam
    builds a full 2048 x 2048 SVD basis). The
    singular vector's sign is arbitrary; we orient it so that the projection correlates
    positively with the channel-summed activation (our choice, stated because it decides
    what the ReLU keeps). Class-agnostic: ``targets`` are ignored; no gradient is taken.

    References
    ----------
    M. B. Muhammad, M. Yeasin, "Eigen-CAM: Class Activation Map using Principal
    Components", IJCNN 2020.
    """

    spec = ExplainerSpec(
        name="eigen_cam",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.CAM,
        access=("activations",),
        summary="first principal component of the activations (class-agnostic)",
        references=("muhammad2020",),
    )
    uses_gradients = False
    eigen_smooth_refusal = "its map already is the first principal component of the activations"

    def combine(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        return first_component(acts)

