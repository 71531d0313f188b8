"""Deletion and insertion curves (RISE protocol, Petsiuk et al. 2018).

Pixels are ranked by decreasing attribution. Deletion starts from the input and replaces
the next ``pixels_per_step`` pixels (all channels) by the substrate, 0 in the model's
normalised input space (the dataset mean colour), as the reference code does. Insertion starts from a Gaussian-blurred copy
(11x11 kernel, sigma 5, zero padding, per channel) and puts original pixels back. The
score is the softmax probability of the target class; the AUC is the trapezoid rule on
an x-axis normalised to [0, 1]. Step inputs are built batch by batch, so memory holds at
most ``batch_size`` of them.

Ties (pixels of equal attribution, an all-zero or constant map included) are never broken
by raster order. RISE and Quantus break them by ``argsort`` order, so the score depends on
where the tied pixels lie in memory. Here a group of tied pixels is changed all at once. A
curve point that falls inside a group is the linear interpolation (the chord) between the
scores with the group left out and with it changed. If the score is affine in which tied
pixels are changed, this chord is exactly the expected curve over uniformly random tie
orders; otherwise it is a deterministic stand-in that does not depend on the order. A
constant map is one group, so its curve is the straight line from the unchanged to the
fully changed input, and its AUC is the mean of the two end scores. For a map without ties
the curves are those of the reference code (and of Quantus' ``PixelFlipping``).
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
        Maps to evaluate (higher = more important; ties are changed together).
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
    Tensor, shape (N, 2, P), float32
        Curve values (softmax probabilities); index 0 is deletion, 1 is insertion. Points
        inside a group of tied pixels are interpolated (module docstring); a constant map
        gives the straight line between the two ends.
    """
    n, _, h, w = inputs.shape
    hw = h * w
    pps = pixels_per_step(hw, steps)
    n_points = -(-hw // pps) + 1
    counts = (torch.arange(n_points) * pps).clamp_max(hw)  # pixels changed at each point
    before = tie_ranks(attributions).reshape(n, 1, h, w)
    # per image, the tie-group boundaries around each point: the curve is evaluated there
    lo, hi = torch.empty(n, n_points, dtype=torch.int64), torch.empty(n, n_points, dtype=torch.int64)
    job_img, job_count, offsets = [], [], [0]
    for i in range(n):
        bounds = torch.cat([torch.unique(before[i].flatten().cpu()), torch.tensor([hw])])
        lo[i] = bounds[torch.searchsorted(bounds, counts, right=True) - 1]
        hi[i] = bounds[torch.searchsorted(bounds, counts)]
        needed = torch.unique(torch.cat([lo[i], hi[i]]))
        job_img.append(torch.full_like(needed, i))
        job_count.append(needed)
        offsets.append(offsets[-1] + len(needed))
    jobs_img, jobs_count = torch.cat(job_img), torch.cat(job_count)
    blurred = gaussian_blur(inputs, blur_size, blur_sigma)
    # job j = (evaluation point, curve): built lazily, batch by batch
    total = 2 * len(jobs_img)
    values = torch.empty(total, dtype=torch.float64)
    for s in range(0, total, batch_size):
        j = torch.arange(s, min(s + batch_size, total))
        curve, e = j % 2, j // 2
        img = jobs_img[e].to(before.device)
        changed = before[img] < jobs_count[e].view(-1, 1, 1, 1).to(before)
        x = inputs[img]
        deletion = torch.where(changed, torch.zeros_like(x), x)
        insertion = torch.where(changed, x, blurred[img])
        batch = torch.where((curve == 0).view(-1, 1, 1, 1).to(changed.device), deletion, insertion)
        with torch.inference_mode():
            probs = torch.softmax(predict(batch).float(), dim=1)
        target = targets[img].view(-1, 1).to(probs.device)
        values[s : s + len(j)] = probs.gather(1, target)[:, 0].cpu().double()
    values = values.view(-1, 2)
    out = torch.empty(n, 2, n_points, dtype=torch.float64)
    for i in range(n):
        needed = jobs_count[offsets[i] : offsets[i + 1]]
        v = values[offsets[i] : offsets[i + 1]]  # (evaluations, 2)
        v_lo, v_hi = v[torch.searchsorted(needed, lo[i])], v[torch.searchsorted(needed, hi[i])]
        span = (hi[i] - lo[i]).clamp_min(1).double()
        t = ((counts - lo[i]).double() / span)[:, None]
        out[i] = (v_lo + t * (v_hi - v_lo)).T
    return out.float()


def tie_ranks(attributions: Tensor) -> Tensor:
    """Per pixel, the number of pixels of the same map with a strictly higher value.

    Tied pixels share the rank of their group (the "min" rank of
    ``scipy.stats.rankdata`` on the negated map, minus one), so no tie is broken by raster
    order. The pixels with rank below ``b`` are the ``b`` highest exactly when ``b`` is a
    group boundary.

    Parameters
    ----------
    attributions : Tensor, shape (N, H, W)
        Maps, compared as float64.

    Returns
    -------
    Tensor, shape (N, H, W), int64
        Ranks from 0 (the maximum and its ties).
    """
    n = attributions.shape[0]
    flat = attributions.reshape(n, -1).to(torch.float64)
    ascending = torch.sort(flat, dim=1).values
    above = flat.shape[1] - torch.searchsorted(ascending, flat.contiguous(), right=True)
    return above.reshape(attributions.shape)


def normalize_map(attributions: Tensor) -> Tensor:
    """Negatives clamped to 0, then per-map min-max to [0, 1] (metrics.md, section 8).

    A map that is constant after clamping (all-zero, all-negative or uniform) cannot be
    scaled. Its weights are 0 everywhere, the value of a map that marks nothing."""
    pos = attributions.clamp_min(0)
    flat = pos.flatten(1)
    lo, hi = flat.amin(1).view(-1, 1, 1), flat.amax(1).view(-1, 1, 1)
    return torch.where(hi > lo, (pos - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(pos))


def top_fraction_masks(attributions: Tensor, frac: float) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k = ceil(frac * H * W)`` highest pixels of each map, with ties at the threshold.

    Let ``a`` pixels lie strictly above the ``k``-th highest value and ``g`` pixels equal
    it. Then ``k - a`` of the ``g`` tied pixels belong to the top ``k``, and raster order
    must not choose them.

    Parameters
    ----------
    attributions : Tensor, shape (N, H, W)
        Maps (compared as float64).
    frac : float
        Fraction of pixels kept, in (0, 1]; at least one pixel is kept.

    Returns
    -------
    (Tensor, Tensor, Tensor)
        ``lower`` and ``upper``, binary (N, H, W) masks in the map's dtype: the pixels
        above the threshold value, and those pixels together with the whole tied group.
        Also ``weight``, shape (N,), float64: ``(k - a) / g``, the share of the tied group
        in the top ``k``. It is 1 when the group fits exactly, and then ``upper`` is the
        plain top-``k`` mask.
    """
    n, h, w = attributions.shape
    k = max(1, int(np.ceil(frac * h * w)))
    ranks = tie_ranks(attributions)
    threshold_rank = torch.sort(ranks.reshape(n, -1), dim=1).values[:, k - 1].view(n, 1, 1)
    lower = ranks < threshold_rank
    upper = ranks <= threshold_rank
    a = lower.flatten(1).sum(1).double()
    g = upper.flatten(1).sum(1).double() - a
    weight = ((k - a) / g).cpu()
    return lower.to(attributions.dtype), upper.to(attributions.dtype), weight


def top_fraction_mask(attributions: Tensor, frac: float) -> Tensor:
    """Expected top-``frac`` mask over random tie orders, shape (N, H, W), in the map's dtype.

    The mask is 1 on pixels above the threshold value and ``weight`` on pixels tied at it,
    where ``weight`` is the tied group's share in the top ``k`` (:func:`top_fraction_masks`).
    It sums to ``k`` and is binary unless a tied group straddles the threshold. A constant
    map gives ``k / (H W)`` everywhere.
    """
    lower, upper, weight = top_fraction_masks(attributions, frac)
    return lower + (upper - lower) * weight.to(upper).view(-1, 1, 1)


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
    normalised to [0, 1] (:func:`normalize_map`; a map constant after clamping weighs 0
    everywhere, so its explanation image is the mean colour). ``top`` (the SISE authors'
    course code, ``frac = 0.15`` there): the input keeps its top ``frac`` pixels and the
    rest is set to 0. If a group of tied pixels straddles the top-``frac`` threshold, ``O``
    is interpolated along the chord, ``O_lower + weight * (O_upper - O_lower)``, between
    the scores with the group dropped and with it kept (:func:`top_fraction_masks`). This
    is the expected ``O`` over random tie orders when the score is affine in the kept
    pixels, and no raster order enters. A constant map is one such group: ``O`` lies
    between the score of the mean-colour image (weight 0) and that of the input (weight
    1), at ``weight = k / (H W)``. Both act in the model's normalised input
    space, where 0 is the mean colour (as deletion's substrate). With ``Y`` and ``O`` the
    softmax probabilities of the target on the input and on the explanation image, the
    terms are ``100 * max(0, Y - O) / Y`` and ``100 * 1[O > Y]``; their means over images
    are the two metrics.

    Parameters
    ----------
    predict : callable
        Maps a batch of model inputs (B, C, H, W) to logits (B, K).
    inputs : Tensor, shape (N, C, H, W)
        Normalised model inputs.
    attributions : Tensor, shape (N, H, W)
        Maps to evaluate.
    targets : Tensor, shape (N,)
        Class whose softmax probability is compared.
    mode : {"soft", "top"}
        Protocol, see above.
    frac : float
        Share of pixels kept by ``top``.
    batch_size : int
        Model inputs per forward pass.

    Returns
    -------
    (Tensor, Tensor), each shape (N,), float64
        Drop % in [0, 100] and increase (0 or 100) per image.

    Raises
    ------
    ValueError
        For an unknown ``mode``.
    """
    n = len(inputs)
    if mode == "soft":
        explained = inputs * normalize_map(attributions)[:, None].to(inputs.dtype)
        straddle = torch.zeros(n, dtype=torch.bool)
        weight = torch.ones(n, dtype=torch.float64)
    elif mode == "top":
        lower, upper, weight = top_fraction_masks(attributions, frac)
        straddle = weight < 1  # a tied group crosses the threshold: score both ends
        partial = inputs[straddle.to(inputs.device)] * lower[straddle.to(lower.device)][:, None].to(inputs.dtype)
        explained = torch.cat([inputs * upper[:, None].to(inputs.dtype), partial])
    else:
        raise ValueError(f"mode must be 'soft' or 'top', got {mode!r}")
    both = torch.cat([inputs, explained])
    idx = torch.cat([torch.arange(n), torch.arange(n), torch.nonzero(straddle)[:, 0]])
    probs = []
    with torch.inference_mode():
        for s in range(0, len(both), batch_size):
            probs.append(torch.softmax(predict(both[s : s + batch_size]).float(), dim=1))
    target = targets[idx.to(targets.device)].view(-1, 1).to(probs[0].device)
    p = torch.cat(probs).gather(1, target)[:, 0].cpu().double()
    y, o = p[:n], p[n : 2 * n].clone()
    o_lower = p[2 * n :]
    w = weight[straddle]
    o[straddle] = o_lower + w * (o[straddle] - o_lower)  # the chord across the tied group
    drop = 100.0 * (y - o).clamp_min(0) / y.clamp_min(1e-12)
    return drop, 100.0 * (o > y).double()
