"""Centred Gaussian: the centre-bias baseline."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attriflow.explainers._baseline import BaselineExplainer
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


class CentredGaussianParams(BaseModel):
    """Parameters of :class:`CentredGaussian`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sigma: float = Field(0.25, gt=0, description="standard deviation as a fraction of each image side")


@register
class CentredGaussian(BaselineExplainer):
    """The same map for every image: ``exp(-((y - cy)^2 / sy^2 + (x - cx)^2 / sx^2) / 2)``.

    ``(cy, cx) = ((H - 1) / 2, (W - 1) / 2)`` is the image centre in pixel coordinates and
    ``sy = sigma * H``, ``sx = sigma * W`` (``sigma`` a fraction of each side); the peak is 1
    at the centre. Objects in photographs sit near the centre, so localisation metrics
    reward this map without any model: a method's score there means something only above
    it.

    Returns float32 maps of shape (N, H, W).
    """

    spec = ExplainerSpec(
        name="centred_gaussian",
        family=Family.BASELINE,
        access=(),
        summary="a Gaussian at the image centre (the same for every image): the centre-bias baseline",
        needs_internals=False,
    )
    Params = CentredGaussianParams

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        n, _, h, w = inputs.shape
        y = (torch.arange(h, dtype=torch.float64) - (h - 1) / 2) / (self.p.sigma * h)
        x = (torch.arange(w, dtype=torch.float64) - (w - 1) / 2) / (self.p.sigma * w)
        g = torch.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).to(torch.float32)
        return g.expand(n, h, w).contiguous().to(inputs.device)
