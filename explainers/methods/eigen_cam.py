"""Eigen-CAM (Muhammad & Yeasin 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from attriflow.explainers._cam import CAMExplainer
from attriflow.explainers._numerics import as_working
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


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

    def combine(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        return first_component(acts)


def first_component(maps: Tensor) -> Tensor:
    """Per image, the projection of the (h*w, C) matrix of ``maps`` (N, C, h, w), centred
    over positions, on its first principal component, shape (N, h, w): pytorch-grad-cam's
    ``get_2d_projection``, oriented to correlate positively with the channel sum.

    The projection on the first right singular vector is the first left singular vector
    times its singular value: the top eigenpair of the smaller of the Gram (hw x hw) and
    covariance (C x C) matrices, formed in float64 (float32 results for 16-bit maps).
    """
    n, c, h, w = maps.shape
    maps = as_working(maps)  # float32 for 16-bit activations (sums of products overflow)
    mats = maps.reshape(n, c, h * w).transpose(1, 2)  # (N, hw, C)
    centred = mats - mats.mean(dim=1, keepdim=True)
    d = centred.to(torch.float64)
    if h * w <= c:
        evals, evecs = torch.linalg.eigh(d @ d.transpose(1, 2))
        proj = (evecs[..., -1] * evals[..., -1:].clamp_min(0).sqrt()).to(maps.dtype)
    else:
        _, evecs = torch.linalg.eigh(d.transpose(1, 2) @ d)
        proj = (d @ evecs[..., -1:])[..., 0].to(maps.dtype)
    return orient(proj, mats.sum(dim=2)).reshape(n, h, w)


def orient(proj: Tensor, reference: Tensor) -> Tensor:
    """``proj`` (N, P) with each row's sign flipped where it correlates negatively with the
    same row of ``reference`` (N, P): the sign of a principal component is arbitrary."""
    corr = ((proj - proj.mean(1, keepdim=True)) * (reference - reference.mean(1, keepdim=True))).sum(1)
    return proj * torch.where(corr < 0, -1.0, 1.0).to(proj.dtype)[:, None]
