"""KPCA-CAM (Karmani et al. 2024; pytorch-grad-cam's ``KPCA_CAM``)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from attriflow.explainers._cam import CAMExplainer, CAMParams, orient
from attriflow.explainers._numerics import as_working
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


class KPCACAMParams(CAMParams):
    """Parameters of :class:`KPCACAM`."""

    kernel: Literal["sigmoid", "rbf", "poly", "cosine", "linear"] = "sigmoid"
    gamma: float | None = Field(None, gt=0, description="kernel coefficient; None: 1 / channels (sklearn)")


@register
class KPCACAM(CAMExplainer):
    """Eigen-CAM with kernel PCA: per image, the layer's (h*w, C) activations, centred over
    positions, projected on their first kernel principal component (scikit-learn's
    ``KernelPCA(n_components=1, kernel, gamma)``, the library pytorch-grad-cam calls, with
    a fixed ``random_state`` so maps of layers beyond 200 positions are reproducible).
    The component's sign is arbitrary; it is oriented to correlate positively with the
    channel-summed activation. Class-agnostic: ``targets`` are ignored; no gradient is
    taken. Equal to pytorch-grad-cam's ``get_2d_projection_kernel`` up to that sign (the test).

    References
    ----------
    S. Karmani, T. Sivakaran, G. Prasad, M. Ait-Amara, H. Kumar, "KPCA-CAM: Visual
    Explainability of Deep Computer Vision Models using Kernel PCA", MMSP 2024.
    """

    spec = ExplainerSpec(
        name="kpca_cam",
        family=Family.CAM,
        access=("activations",),
        summary="first kernel principal component of the activations (class-agnostic)",
        references=("karmani2024",),
    )
    Params = KPCACAMParams
    uses_gradients = False
    eigen_smooth_refusal = ("its map already is a (kernel) principal component of the activations, "
                            "not a channel sum to project")

    def combine(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        from sklearn.decomposition import KernelPCA

        n, c, h, w = acts.shape
        mats = as_working(acts).reshape(n, c, h * w).transpose(1, 2)  # (N, hw, C)
        out = []
        for m in mats.detach().cpu().to(torch.float64).numpy():
            centred = m - m.mean(axis=0)
            # random_state: beyond 200 positions scikit-learn's ARPACK solver starts from a random vector
            kpca = KernelPCA(n_components=1, kernel=self.p.kernel, gamma=self.p.gamma, random_state=0)
            out.append(np.asarray(kpca.fit_transform(centred), dtype=np.float64)[:, 0])
        proj = torch.from_numpy(np.stack(out)).to(device=acts.device, dtype=mats.dtype)
        return orient(proj, mats.sum(dim=2)).reshape(n, h, w)
