"""Sobel edge magnitude of the image: the edge-detector baseline of Adebayo et al. (2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attriflow.explainers._baseline import BaselineExplainer
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


@register
class Sobel(BaselineExplainer):
    """Edge magnitude ``sqrt((Gy^2 + Gx^2) / 2)`` of the image's channel mean, ignoring the
    model and the target.

    ``Gy`` and ``Gx`` are the Sobel filters ``[1, 2, 1]^T [1, 0, -1] / 4`` along each axis
    with the border pixel repeated, exactly scikit-image's ``skimage.filters.sobel`` on a 2-D
    image (its default ``mode="reflect"``; the test compares the two). The image is the
    model input with the model's normalisation undone when the pipeline knows it
    (``normalization``), so edges are weighted as the researcher sees them, not by each
    channel's standard deviation.

    Returns float32 maps of shape (N, H, W), non-negative.

    References
    ----------
    J. Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018 (section 3, the edge
    detector compared with saliency maps).
    """

    spec = ExplainerSpec(
        name="sobel",
        family=Family.BASELINE,
        access=(),
        summary="Sobel edge magnitude of the image: the edge-detector baseline",
        references=("adebayo2018",),
        needs_internals=False,
    )

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        x = inputs.to(torch.float32)
        if self.normalization is not None:
            mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
                         for v in self.normalization)
            x = x * std + mean
        gray = F.pad(x.mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")
        smooth = torch.tensor([1.0, 2.0, 1.0], device=x.device) / 4
        diff = torch.tensor([1.0, 0.0, -1.0], device=x.device)
        ky = (diff[:, None] * smooth[None, :]).view(1, 1, 3, 3)  # derivative along y, smoothing along x
        kx = (smooth[:, None] * diff[None, :]).view(1, 1, 3, 3)
        gy = F.conv2d(gray, ky)
        gx = F.conv2d(gray, kx)
        return torch.sqrt((gy * gy + gx * gx) / 2)[:, 0]
