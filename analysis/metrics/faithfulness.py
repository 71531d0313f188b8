"""Deletion and insertion curves (RISE protocol, Petsiuk et al. 2018).

Pixels are ranked by decreasing attribution (ties keep raster order: a stable sort).
Deletion starts from the input and replaces the next ``pixels_per_step`` pixels (all
channels) by the substrate, 0 in the model's normalised input space (the dataset mean
colour), as the reference code does. Insertion starts from a Gaussian-blurred copy
(11x11 kernel, sigma 5, zero padding, per channel) and puts original pixels back. The
score is the softmax probability of the target class; the AUC is the trapezoid rule on
an x-axis normalised to [0, 1]. Step inputs are built batch by batch, so memory holds at
most ``batch_size`` of them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel(size: int = 11, sigma: float = 5.0) -> Tensor:
    """Normalised 2-D Gaussian kernel, shape (size, size), float64."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return k / k.sum()


def gaussian_blur(inputs: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """Blur each channel of (N, C, H, W) ``inputs`` with zero padding (RISE's ``blur``)."""
    c = inputs.shape[1]
    k = gaussian_kernel(size, sigma).to(inputs)[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(inputs, k, padding=size // 2, groups=c)


def pixels_per_step(n_pixels: int, steps: int) -> int:
    """Pixels changed per step so that ``steps`` steps cover the image."""
    return -(-n_pixels // steps)


def auc(curves: Tensor) -> Tensor:
    """Trapezoid area under curves (..., P) on x in [0, 1]."""
    n = curves.shape[-1]
    return (curves.sum(-1) - curves[..., 0] / 2 - curves[..., -1] / 2) / (n - 1)


def deletion_insertion_curves(
    predict: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    targets: Tensor,
    *,
    steps: int = 32,
    batch_size: int = 256,
    blur_size: int = 11,
    blur_sigma: float = 5.0,
) -> Tensor:
    """Deletion and insertion curves of each map.

    Parameters
    ----------
    predict : callable
        Maps a batch of model inputs (B, C, H, W) to logits (B, K).
    inputs : Tensor, shape (N, C, H, W)
        Normalised model inputs.
    attributions : Tensor, shape (N, H, W)
        Maps to evaluate (higher = more important).
    targets : Tensor, shape (N,)
        Class whose softmax probability is tracked.
    steps : int
        Number of steps; the curve has ``ceil(HW / pixels_per_step) + 1`` points.
    batch_size : int
        Model inputs per forward pass.
    blur_size, blur_sigma : int, float
        Insertion's blur kernel.

    Returns
    -------
    Tensor, shape (N, 2, P)
        Curve values; index 0 is deletion, 1 is insertion.
    """
    n, _, h, w = inputs.shape
    pps = pixels_per_step(h * w, steps)
    n_points = -(-(h * w) // pps) + 1
    order = torch.argsort(attributions.reshape(n, -1).to(torch.float64), dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(n, -1).contiguous())
    rank = rank.reshape(n, 1, h, w)
    blurred = gaussian_blur(inputs, blur_size, blur_sigma)
    # job j = (image, curve, point): built lazily, batch by batch
    total = n * 2 * n_points
    out = torch.empty(total, dtype=torch.float32)
    for s in range(0, total, batch_size):
        j = torch.arange(s, min(s + batch_size, total))
        img, curve, point = j // (2 * n_points), (j // n_points) % 2, j % n_points
        changed = rank[img] < (point * pps).view(-1, 1, 1, 1).to(rank)
        x = inputs[img]
        deletion = torch.where(changed, torch.zeros_like(x), x)
        insertion = torch.where(changed, x, blurred[img])
        batch = torch.where((curve == 0).view(-1, 1, 1, 1), deletion, insertion)
        with torch.inference_mode():
            probs = torch.softmax(predict(batch).float(), dim=1)
        out[s : s + len(j)] = probs.gather(1, targets[img].view(-1, 1).to(probs.device))[:, 0].cpu()
    return out.reshape(n, 2, n_points)


def normalize_map(attributions: Tensor) -> Tensor:
    """Negatives clamped to 0, then per-map min-max to [0, 1] (metrics.md, section 8)."""
    pos = attributions.clamp_min(0)
    flat = pos.flatten(1)
    lo, hi = flat.amin(1).view(-1, 1, 1), flat.amax(1).view(-1, 1, 1)
    return torch.where(hi > lo, (pos - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(pos))


def top_fraction_mask(attributions: Tensor, frac: float) -> Tensor:
    """Binary (N, H, W) mask of the ``ceil(frac * H * W)`` highest pixels (stable ties)."""
    n, h, w = attributions.shape
    k = max(1, int(np.ceil(frac * h * w)))
    order = torch.argsort(attributions.reshape(n, -1).to(torch.float64), dim=1, descending=True, stable=True)
    mask = torch.zeros((n, h * w), dtype=attributions.dtype, device=attributions.device)
    mask.scatter_(1, order[:, :k], 1.0)
    return mask.view(n, h, w)


def drop_increase(
    predict: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    targets: Tensor,
    *,
    mode: str = "soft",
    frac: float = 0.15,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Average Drop % and Increase in Confidence % terms per image (Grad-CAM++).

    ``soft`` (Grad-CAM++'s protocol): the explanation image is the input times the map
    normalised to [0, 1]; ``top`` (the SISE authors' course code): the input keeps its top
    ``frac`` pixels and the rest is set to 0. Both act in the model's normalised input
    space, where 0 is the mean colour (as deletion's substrate). With ``Y`` and ``O`` the
    softmax probabilities of the target on the input and on the explanation image, the
    terms are ``100 * max(0, Y - O) / Y`` and ``100 * 1[O > Y]``; their means over images
    are the two metrics.

    Returns
    -------
    (Tensor, Tensor), each shape (N,)
        Drop % and increase (0 or 100) per image.
    """
    if mode == "soft":
        weights = normalize_map(attributions)
    else:
        weights = top_fraction_mask(attributions, frac)
    explained = inputs * weights[:, None].to(inputs.dtype)
    both = torch.cat([inputs, explained])
    probs = []
    with torch.inference_mode():
        for s in range(0, len(both), batch_size):
            probs.append(torch.softmax(predict(both[s : s + batch_size]).float(), dim=1))
    p = torch.cat(probs).gather(1, torch.cat([targets, targets]).view(-1, 1))[:, 0].cpu().double()
    y, o = p[: len(inputs)], p[len(inputs) :]
    drop = 100.0 * (y - o).clamp_min(0) / y.clamp_min(1e-12)
    return drop, 100.0 * (o > y).double()
