"""Eigen-CAM (Muhammad & Yeasin 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from explainers._cam import CAMExplainer
from explainers.base import ExplainerSpec, Family
from explainers.registry import register


@register
class EigenCAM(CAMExplainer):
    """Projection of the layer's activations on their first principal component.

    Per image, the (h*w, C) activation matrix is centred over positions and projected on
    its first right singular vector (reduced SVD: the C x C matrix is never formed). The
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
        family=Family.CAM,
        access=("activations",),
        summary="first principal component of the activations (class-agnostic)",
        references=("muhammad2020",),
    )
    uses_gradients = False

    def combine(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        n, c, h, w = acts.shape
        mats = acts.reshape(n, c, h * w).transpose(1, 2)  # (N, hw, C)
        centred = mats - mats.mean(dim=1, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        proj = torch.einsum("npc,nc->np", centred, vh[:, 0])
        total = mats.sum(dim=2)
        corr = ((proj - proj.mean(1, keepdim=True)) * (total - total.mean(1, keepdim=True))).sum(1)
        proj = proj * torch.where(corr < 0, -1.0, 1.0).to(proj.dtype)[:, None]
        return proj.reshape(n, h, w)
