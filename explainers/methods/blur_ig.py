"""Blur Integrated Gradients (Xu et al. 2020; PAIR's ``saliency.core.BlurIG``)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attriflow.explainers._batching import iter_jobs
from attriflow.explainers._blur import separable_blur
from attriflow.explainers._gradients import Reduce, input_gradient, reduce_channels
from attriflow.explainers._scores import ScoreKind
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register


class BlurIGParams(BaseModel):
    """Parameters of :class:`BlurIG` (defaults: PAIR's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(100, ge=1, le=100_000)
    max_sigma: float = Field(50.0, gt=0, description="blur of the path's start, in pixels")
    grad_step: float = Field(0.01, gt=0, description="finite-difference step of d blur / d sigma, in pixels")
    sqrt: bool = False
    score: ScoreKind = "logit"
    reduce: Reduce = "sum"


def gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Each image blurred over its two spatial axes with its own standard deviation.

    SciPy's ``ndimage.gaussian_filter(image, (sigma, sigma, 0), mode="constant")`` (zero
    padding, kernel ``exp(-d^2 / (2 sigma^2))`` truncated at ``int(4 sigma + 0.5)`` taps
    each side and normalised over its taps, those beyond the edge included), as PAIR's
    ``gaussian_blur``; sigma 0 leaves the image unchanged. Applied as products with band
    matrices (:func:`explainers._blur.separable_blur`), the kernels built in float64.

    Parameters
    ----------
    images : Tensor, shape (B, C, H, W)
        Images (model inputs).
    sigmas : Tensor, shape (B,)
        Standard deviations in pixels, float64, >= 0.

    Returns
    -------
    Tensor, shape (B, C, H, W)
        The blurred images, in the images' dtype.
    """
    s = sigmas.to(torch.float64).cpu()[:, None]
    radii = (4.0 * s + 0.5).floor()  # SciPy's truncate=4.0
    r = int(radii.max())
    d = torch.arange(-r, r + 1, dtype=torch.float64)[None]
    phi = torch.exp(-0.5 / s.clamp_min(1e-150) ** 2 * d**2) * (d.abs() <= radii)  # SciPy's order of operations
    taps = torch.where(s == 0, (d == 0).to(torch.float64), phi / phi.sum(-1, keepdim=True))
    return separable_blur(images, taps)


@register
class BlurIG(Explainer):
    """Integrated gradients along a path of ever stronger Gaussian blur of the image.

    With ``sigma_i = i * max_sigma / steps`` (``sqrt``: ``sqrt(i * max_sigma / steps)``),
    the map is ``-sum_i (sigma_{i+1} - sigma_i) * d blur(x, s)/ds|_{sigma_i} *
    grad f(blur(x, sigma_i))`` over ``i = 0 .. steps - 1``, the derivative taken as the
    forward difference over ``grad_step``, summed over channels. The path needs no baseline
    image: it removes information by blurring, from fine to coarse scales. Equal to PAIR's
    ``BlurIG().GetMask(x, ...)`` summed over channels (the test; PAIR blurs with SciPy,
    ours with the same kernels as matrix products). PAIR's batched loop credits every
    step of a batch with the last step's ``sigma`` difference, which matters only with
    ``sqrt``; ours uses each step's own. The blurred path and its slope are computed in
    float64 (the slope is a difference of two blurs ``grad_step`` apart), the model
    evaluated in the inputs' dtype. Every step of all images is packed into passes of
    ``batch_size``.

    Returns float32 maps of shape (N, H, W).

    References
    ----------
    S. Xu, S. Venugopalan, M. Sundararajan, "Attribution in Scale and Space", CVPR 2020.
    """

    spec = ExplainerSpec(
        name="blur_ig",
        family=Family.GRADIENT,
        access=("gradients",),
        batches_evaluations=True,
        summary="integrated gradients along a path of increasing Gaussian blur",
        references=("xu2020",),
        needs_internals=False,
    )
    Params = BlurIGParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        s = params.steps  # type: ignore[attr-defined]
        return {"forward": s, "backward": s}

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        n = len(inputs)
        steps, top = self.p.steps, self.p.max_sigma
        frac = [i * top / steps for i in range(steps + 1)]
        sigmas = torch.tensor([math.sqrt(f) for f in frac] if self.p.sqrt else frac, dtype=torch.float64)
        width = sigmas[1:] - sigmas[:-1]
        # the path and its slope in float64: the slope is a difference of two blurs 0.01 pixel
        # apart, which float32 would round to a few significant digits
        path = torch.float64 if inputs.device.type != "mps" else torch.float32
        total = torch.zeros(inputs.shape, dtype=path, device=inputs.device)
        for img, step in iter_jobs(n, steps, self.batch_size):
            s = sigmas[step]
            x = inputs[img.to(inputs.device)].to(path)
            blurred = gaussian_blur(x, s)
            slope = (gaussian_blur(x, s + self.p.grad_step) - blurred) / self.p.grad_step
            at = img.to(inputs.device)
            grad = input_gradient(self.model, blurred.to(inputs.dtype), targets[at], self.p.score)
            term = width[step].to(path).to(inputs.device).view(-1, 1, 1, 1) * slope * grad.to(path)
            total.index_add_(0, img.to(inputs.device), term)
        self.last_forward_passes = torch.full((n,), steps, dtype=torch.int64)
        return reduce_channels(-total, self.p.reduce)
