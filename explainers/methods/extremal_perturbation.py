"""Extremal Perturbations with smooth masks (Fong, Patrick & Vedaldi, ICCV 2019), as TorchRay."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attriflow.explainers._blur import separable_blur
from attriflow.explainers._numerics import working_dtype
from attriflow.explainers.base import Explainer, ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.registry import register

#: Softmax temperature of the smooth max-pooling of the mask generator (TorchRay's ``coldness``).
COLDNESS = 20.0
#: Value the contrastive reward gives the target before taking the max over the other classes.
CONTRASTIVE_FLOOR = -100.0


def gaussian_taps(sigma: float) -> Tensor:
    """TorchRay's 1-D Gaussian filter (``torchray.utils.imsmooth``), float32.

    ``exp(-(i / (sqrt(2) sigma + eps))^2)`` for ``i`` in ``[-ceil(4 sigma), ceil(4 sigma)]``,
    normalised to sum 1, with ``sqrt(2)``, ``sigma`` and ``eps`` (float32 machine epsilon)
    as float32 numbers and the taps computed in float32, as TorchRay does; ``sigma = 0`` gives
    the single tap 1.

    Parameters
    ----------
    sigma : float
        Standard deviation in pixels (>= 0).

    Returns
    -------
    Tensor, shape (2 ceil(4 sigma) + 1,)
        float32 taps.
    """
    width = math.ceil(4 * sigma)
    f32 = torch.float32
    scale = torch.tensor(math.sqrt(2), dtype=f32) * torch.tensor(sigma, dtype=f32) \
        + torch.tensor(torch.finfo(f32).eps, dtype=f32)
    taps = torch.arange(-width, width + 1, dtype=f32) / scale
    taps = torch.exp(-taps * taps)
    return taps / taps.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of each channel with zero padding (``imsmooth``'s default).

    The vertical then horizontal 1-D convolutions are written as products with band matrices
    (:func:`explainers._blur.separable_blur`): the same sums as TorchRay's two ``conv2d``
    calls, several times faster on CPU for the wide kernels of ``max_blur`` (161 taps at
    sigma 20).

    Parameters
    ----------
    x : Tensor, shape (N, C, H, W)
        Images (any floating dtype; the float32 taps are cast to it).
    sigma : float
        Standard deviation in pixels.

    Returns
    -------
    Tensor, shape (N, C, H, W)
        The blurred images, with the taps of :func:`gaussian_taps`.
    """
    return separable_blur(x, gaussian_taps(sigma))


def perturbation_pyramid(x: Tensor, kind: str, num_levels: int, max_blur: float) -> Tensor:
    """Increasingly perturbed copies of each image (TorchRay's ``Perturbation``).

    Level ``l`` (of ``L = num_levels``) uses ``s_l = l / (L - 1)`` (``torch.linspace(0, 1, L)``
    in float32, as TorchRay): ``blur`` convolves with a Gaussian of standard deviation
    ``(1 - s_l) max_blur`` (float32 arithmetic), ``fade`` multiplies by ``s_l``. Level ``L - 1``
    is the image itself, level 0 the most perturbed.

    Parameters
    ----------
    x : Tensor, shape (N, C, H, W)
        Images.
    kind : {"blur", "fade"}
        Perturbation type.
    num_levels : int
        Number of levels L (>= 2).
    max_blur : float
        Standard deviation of level 0's blur, in pixels.

    Returns
    -------
    Tensor, shape (N, L, C, H, W)
        The pyramid, in ``x``'s dtype.
    """
    levels = []
    for s in torch.linspace(0, 1, num_levels, dtype=torch.float32):
        if kind == "blur":
            levels.append(gaussian_blur(x, float((1 - s) * torch.tensor(max_blur, dtype=torch.float32))))
        else:
            levels.append(x * s.to(x.dtype))
    return torch.stack(levels, dim=1)


def apply_mask(pyramid: Tensor, mask: Tensor) -> Tensor:
    """Perturbed images for masks in [0, 1]: linear interpolation between pyramid levels.

    With ``w = m (L - 1)``, ``k = floor(w)``: ``(1 - (w - k)) y_k + (w - k) y_{min(k+1, L-1)}``
    per pixel, so ``m = 1`` keeps the image and ``m = 0`` shows the most perturbed level
    (TorchRay's ``Perturbation.apply``; no gradient through ``floor``).

    Parameters
    ----------
    pyramid : Tensor, shape (N, L, C, H, W)
        From :func:`perturbation_pyramid`.
    mask : Tensor, shape (N, 1, H, W)
        One mask per image.

    Returns
    -------
    Tensor, shape (N, C, H, W)
        The perturbed images.
    """
    n, levels, c, h, w_ = pyramid.shape
    w = mask.reshape(n, 1, 1, h, w_) * (levels - 1)
    k = w.floor()
    w = w - k
    k = k.long().expand(n, 1, c, h, w_)
    y0 = torch.gather(pyramid, 1, k)
    y1 = torch.gather(pyramid, 1, torch.clamp(k + 1, max=levels - 1))
    return ((1 - w) * y0 + w * y1).squeeze(1)


class SmoothMask:
    """Smooth masks from a coarse parameter grid (TorchRay's ``MaskGenerator``, softmax pooling).

    Parameters ``p`` live on a grid of ``ceil(H / step) x ceil(W / step)`` cells in [0, 1]. An
    output pixel ``u`` (of a mask with a margin of ``sigma`` pixels on each side) sees the
    ``(2r + 1)^2`` cells around its own, ``r = 1 + ceil(sigma / step)``; cell ``i`` lies at
    ``margin + step i`` and weighs in through ``k(d) = exp(-2 max(d / sigma - 1/2, 0)^2)`` of
    its distance ``d``. The mask is the smooth max ``sum_j v_j softmax(20 v)_j`` of the values
    ``v_j = k(d_j) p_j``, clamped to [0, 1]; the map is the crop of the image's size at offset
    ``round(sigma)``. The kernel weights are computed in float32, as TorchRay does, and cast to
    the working dtype (a pixel's cell is ``u // step``: TorchRay's float32 ``floor(u m / (step
    m))`` gives the same index for every step up to 40 and image side from 8 to 1024 pixels at
    ``sigma`` 21 and ``3 step``, checked exhaustively; at steps 41, 47, 55 and 61 its rounding
    differs, hence ``step <= 40``).

    Parameters
    ----------
    shape : tuple of int
        Image size (H, W).
    step : int
        Grid step in pixels.
    sigma : float
        Kernel size and margin in pixels.
    """

    def __init__(self, shape: tuple[int, int], step: int, sigma: float) -> None:
        self.shape, self.step, self.sigma = shape, step, sigma
        self.padding = 1 + math.ceil(2 * sigma / step)  # TorchRay: 1 + ceil((margin + sigma) / step)
        self.radius = 1 + math.ceil(sigma / step)
        self.shape_in = tuple(math.ceil(z / step) for z in shape)
        self.shape_mid = tuple(z + 2 * self.padding - 2 * self.radius for z in self.shape_in)
        self.shape_out = tuple(step * z - step + 1 for z in self.shape_mid)
        self.crop = round(sigma)
        side = 2 * self.radius + 1
        f32 = torch.float32
        uy, ux = (torch.arange(z, dtype=torch.int64) for z in self.shape_out)
        offsets = torch.arange(side, dtype=torch.int64) - self.padding
        # centre of the cell each (offset, pixel) pair reads, per axis: (side, out)
        cy = sigma + step * ((uy // step)[None] + offsets[:, None]).to(f32)
        cx = sigma + step * ((ux // step)[None] + offsets[:, None]).to(f32)
        dy = uy.to(f32)[None] - cy  # (side, out_h)
        dx = ux.to(f32)[None] - cx  # (side, out_w)
        dist = torch.sqrt(dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2)  # (side, side, oh, ow)
        z = dist / torch.tensor(sigma, dtype=f32)
        self.weight = torch.exp(-2 * (z - 0.5).clamp(min=0) ** 2).reshape(1, side * side, *self.shape_out)

    def fits(self) -> bool:
        """Whether the crop of the image's size at offset ``round(sigma)`` lies inside the mask."""
        return all(self.crop + s <= o for s, o in zip(self.shape, self.shape_out, strict=True))

    def generate(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """Masks for parameter grids.

        Parameters
        ----------
        params : Tensor, shape (N, 1, h_in, w_in)
            One grid per image (``shape_in``).

        Returns
        -------
        (Tensor, Tensor)
            The crop, shape (N, 1, H, W), and the whole mask with its margin, shape
            (N, 1, ``shape_out``), both in ``params``' dtype.
        """
        n, side = len(params), 2 * self.radius + 1
        cols = F.unfold(params, (side, side), padding=self.padding).reshape(n, side * side, *self.shape_mid)
        cols = cols.repeat_interleave(self.step, 2).repeat_interleave(self.step, 3)
        cols = cols[:, :, : self.shape_out[0], : self.shape_out[1]]
        v = self.weight.to(device=params.device, dtype=params.dtype) * cols
        mask = (v * F.softmax(COLDNESS * v, dim=1)).sum(dim=1, keepdim=True).clamp(min=0, max=1)
        m = self.crop
        return mask[:, :, m : m + self.shape[0], m : m + self.shape[1]], mask


class ExtremalPerturbationParams(BaseModel):
    """Parameters of :class:`ExtremalPerturbation` (defaults: TorchRay's ``extremal_perturbation``
    and its benchmark's area 0.1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    area: float = Field(0.1, gt=0.0, lt=1.0, description="share of the mask (with its margin) kept: "
                        "0 and 1 leave nothing to optimise")
    variant: Literal["preserve", "delete", "dual"] = "preserve"
    perturbation: Literal["blur", "fade"] = "blur"
    reward: Literal["simple", "contrastive"] = "simple"
    iterations: int = Field(800, ge=1, le=100_000)
    learning_rate: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    regul_weight: float = Field(300.0, ge=0.0)
    regul_growth: float = Field(1.0035, gt=0.0)
    num_levels: int = Field(8, ge=2, le=256)
    max_blur: float = Field(20.0, gt=0.0)
    step: int = Field(7, ge=1, le=40)  # beyond 40, TorchRay's float32 cell index rounds differently
    sigma: float = Field(21.0, gt=0.0)
    jitter: bool = True
    smooth: float = Field(0.0, ge=0.0)


@register
class ExtremalPerturbation(Explainer):
    """The smooth mask of a given area whose perturbation keeps (or removes) the class score.

    Per image, a grid of mask parameters ``p`` (one cell per ``step`` pixels, starting at 1)
    gives a smooth mask ``m`` (:class:`SmoothMask`); the image is shown where ``m = 1`` and
    blurred (or faded to 0) where ``m = 0`` through a pyramid of ``num_levels`` perturbations
    (:func:`perturbation_pyramid`, :func:`apply_mask`). The energy
    ``reward(f(perturbed)) - lambda_t mean((sort(m_full) - r)^2)`` is maximised, where ``r``
    is 0 on the first ``int(A (1 - area))`` of the ``A`` pixels of the whole mask (margin
    included) and 1 after, so the sorted mask is pulled to exactly ``area`` ones, and
    ``lambda_t = regul_weight * regul_growth^t``. The reward is the target's logit
    (``simple``) or its margin over the best other logit (``contrastive``, the target set to
    -100 before the max); ``delete`` shows ``1 - m`` and negates it; ``dual`` rewards the
    preserved minus the deleted image's score (two evaluations per iteration). With
    ``jitter`` the perturbed image is flipped left-right at even iterations (deterministic).
    The step is TorchRay's: SGD with momentum ``mu`` and dampening ``mu`` on the energy's
    gradient ``g`` (``b = g`` at the first step, then ``b = mu b + (1 - mu) g``;
    ``p = clamp(p + lr b, 0, 1)``). The map is the mask TorchRay returns, the crop generated at the
    start of its last iteration, after ``iterations - 1`` steps (the last iteration's
    evaluation only feeds a step TorchRay discards, so it is skipped). With ``smooth > 0`` it
    is blurred with standard deviation ``smooth * min(H, W)`` (zero padding). ``attribute``
    returns these masks, (N, H, W) float32 in [0, 1] (1: the region kept).

    Images of a batch are optimised together with independent energies (a mask does not
    depend on its batch). The model's weights are not trained (their ``requires_grad`` is
    off during the call and restored after). Pyramid, masks and the optimiser run in
    float32 for float16 / bfloat16 models; the perturbed image is cast to the model's dtype.

    Notes
    -----
    Defaults are TorchRay's ``extremal_perturbation``: area 0.1 (its ``areas=[0.1]``), 800
    iterations, learning rate 0.01, momentum 0.9, regulariser weight 300 growing by 1.0035
    per iteration, 8 blur levels up to sigma 20 (``Perturbation``'s ``max_blur``), mask step 7
    and sigma 21, jitter on, simple reward, no smoothing. They were set for 224-pixel images:
    at 64 pixels the same step and sigma give a 10x10 grid of very wide bumps, and the area
    term counts the margin of ``sigma`` pixels around the image (a 106x106 mask for a 64x64
    image), so the crop's own area can be far from ``area``; for small images a step near
    ``size / 32`` and ``sigma = 3 step`` keep the paper's proportions.

    Equal to ``torchray.attribution.extremal_perturbation.extremal_perturbation(model, x,
    target, areas=[area], ...)`` (``tests/explainers/test_extremal_perturbation.py``).

    Warns
    -----
    UserWarning
        When an image's mask ends all 0 (TorchRay's defaults on images much smaller than 224
        pixels: the area term's first steps push every parameter to 0).

    Raises
    ------
    UnsupportedModelError
        From ``attribute`` when ``step`` and ``sigma`` give a mask too small to hold the
        image at offset ``round(sigma)`` (roughly ``sigma < 3 step``; TorchRay would return
        a smaller map).

    Notes
    -----
    Batching: each image has its own parameters and energy, so a batch's images do not
    interact; in float64 the masks are the same at every ``batch_size``. In float32 the
    convolution kernels a batch size selects round differently (1e-7), and hundreds of
    optimisation steps amplify that to about 1e-2 on masks in [0, 1]: compare runs at one
    ``batch_size``, or in float64.

    References
    ----------
    R. Fong, M. Patrick, A. Vedaldi, "Understanding Deep Networks via Extremal Perturbations
    and Smooth Masks", ICCV 2019.
    """

    spec = ExplainerSpec(
        name="extremal_perturbation",
        family=Family.OPTIMISATION,
        access=("gradients",),
        summary="smooth mask of a fixed area whose blur keeps (or removes) the class score",
        references=("fong2019",),
        needs_internals=False,
    )
    Params = ExtremalPerturbationParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        p: ExtremalPerturbationParams = params  # type: ignore[assignment]
        n = (p.iterations - 1) * (2 if p.variant == "dual" else 1)
        return {"forward": n, "backward": n}

    def refuse(self, example: Tensor) -> None:
        """Refuse a ``step`` / ``sigma`` whose mask cannot hold an image of this size."""
        gen = SmoothMask(tuple(example.shape[-2:]), self.p.step, self.p.sigma)  # type: ignore[arg-type]
        if not gen.fits():
            raise UnsupportedModelError(
                f"extremal_perturbation: step={self.p.step} and sigma={self.p.sigma} give a "
                f"{gen.shape_out[0]}x{gen.shape_out[1]} mask, too small for a "
                f"{example.shape[-2]}x{example.shape[-1]} image at offset round(sigma)={gen.crop}; "
                "use sigma >= 3 * step")

    def _reward(self, out: Tensor, targets: Tensor) -> Tensor:
        """Per-evaluation reward of the target class (before the variant's sign)."""
        score = out.gather(1, targets[:, None])[:, 0]
        if self.p.reward == "simple":
            return score
        others = out.scatter(1, targets[:, None], CONTRASTIVE_FLOOR)
        return score - others.amax(dim=1)

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        p = self.p
        n, _, h, w = inputs.shape
        work = working_dtype(inputs.dtype)
        gen = SmoothMask((h, w), p.step, p.sigma)
        gen.weight = gen.weight.to(device=inputs.device, dtype=work)  # once, not at every iteration
        pyramid = perturbation_pyramid(inputs.to(work), p.perturbation, p.num_levels, p.max_blur)
        params = torch.ones((n, 1, *gen.shape_in), dtype=work, device=inputs.device)
        area = gen.shape_out[0] * gen.shape_out[1]
        reference = torch.ones((1, area), dtype=work, device=inputs.device)
        reference[:, : int(area * (1 - p.area))] = 0
        buf: Tensor | None = None
        weight = p.regul_weight
        for param in self.model.parameters():
            param.requires_grad_(False)
        for t in range(p.iterations - 1):
            with torch.enable_grad():
                pv = params.detach().requires_grad_(True)
                crop, full = gen.generate(pv)
                if p.variant == "preserve":
                    x = apply_mask(pyramid, crop)
                elif p.variant == "delete":
                    x = apply_mask(pyramid, 1 - crop)
                else:
                    x = torch.cat((apply_mask(pyramid, crop), apply_mask(pyramid, 1 - crop)))
                if p.jitter and t % 2 == 0:
                    x = torch.flip(x, dims=(3,))
                out = self.model(x.to(inputs.dtype)).to(work)
                if p.variant == "dual":
                    reward = self._reward(out[:n], targets) - self._reward(out[n:], targets)
                else:
                    reward = self._reward(out, targets)
                    reward = -reward if p.variant == "delete" else reward
                ranked = full.reshape(n, -1).sort(dim=1)[0]
                regul = -((ranked - reference) ** 2).mean(dim=1) * weight
                energy = (reward + regul).sum()
                (grad,) = torch.autograd.grad(-energy, pv)
            with torch.no_grad():
                if buf is None:
                    buf = grad.clone()
                else:
                    buf.mul_(p.momentum).add_(grad, alpha=1 - p.momentum)
                params = params.add(buf, alpha=-p.learning_rate).clamp(0, 1)
            weight *= p.regul_growth
        with torch.no_grad():
            mask = gen.generate(params)[0]
            if p.smooth > 0:
                mask = gaussian_blur(mask, p.smooth * min(h, w))
        empty = [i for i in range(n) if not bool(mask[i].amax() > 0)]
        if empty:
            warnings.warn(f"extremal_perturbation: the mask of image(s) {empty[:8]} of this batch is all 0: "
                          f"the area term drove every parameter under the {h}x{w} image to 0 (step={p.step}, "
                          f"sigma={p.sigma} suit 224-pixel images; try a smaller step, sigma = 3 * step, "
                          "or a smaller learning_rate)", stacklevel=2)
        return mask[:, 0]
