"""Localisation metrics against ground-truth regions (metrics.md, sections 3 to 6).

Ties are never broken by raster order. A metric that picks pixels by rank (the pointing
game's maximum, Bbox's top ``K``) reports its expectation over a uniformly random choice
among tied pixels, and these expectations are exact. A constant map (all-zero included)
then scores what a uniformly random point or ranking scores: the chance baseline. Ratios
that are 0/0 (EBPG of a map without positive energy) are NaN. A region without pixels
gives NaN, and so does a map with a non-finite value.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.stats import hypergeom


def default_tolerance(height: int, width: int | None = None) -> float:
    """The pointing game's 15 px at 224 px, scaled to the image's shorter side (our choice
    for small images: 15 px on a 64 px image would accept a third of it)."""
    return 15.0 * min(height, height if width is None else width) / 224.0


def pointing_game(maps: np.ndarray, masks: np.ndarray, tolerance: float) -> np.ndarray:
    """Hit (1) when the map's maximum lies within ``tolerance`` pixels of the ground truth.

    With several maxima (exactly equal values) the score is the expected hit of a maximum
    drawn uniformly at random: the share of tied maxima within tolerance. So a constant
    map (all-zero included) scores the share of the image within tolerance of the region,
    the chance level. Zhang et al. (ECCV 2016) take one maximum. Quantus' ``PointingGame``
    counts a hit when *any* maximum is inside, which gives a constant map a perfect 1; we
    do not follow it there. Without ties both agree (tested at zero tolerance).

    Parameters
    ----------
    maps : ndarray, shape (N, H, W)
        Attributions.
    masks : ndarray, shape (N, H, W)
        Ground-truth regions (bool); an empty region gives NaN.
    tolerance : float
        Euclidean distance in pixels.

    Returns
    -------
    ndarray, shape (N,), float64
        1.0 / 0.0 for a single maximum, the share of hits in [0, 1] for tied maxima; NaN
        without ground truth or with a non-finite map.
    """
    out = np.full(len(maps), np.nan)
    for i, (m, g) in enumerate(zip(maps, masks)):
        if not g.any() or not np.isfinite(m).all():
            continue
        maxima = m == m.max()
        distance = distance_transform_edt(~g)  # 0 inside the region
        out[i] = float((distance[maxima] <= tolerance).mean())
    return out


def energy_pointing_game(maps: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Share of the map's positive energy inside the region (Score-CAM's EBPG).

    Negative attributions are clamped to 0 first (signed maps would break the ratio). A
    map with no positive energy (all-zero or all-negative) gives NaN, the 0/0 that Quantus'
    ``RelevanceMassAccuracy`` also returns. A uniform positive map scores the region's area
    fraction. No ranking is involved, so ties do not matter.

    Parameters
    ----------
    maps : ndarray, shape (N, H, W)
        Attributions.
    regions : ndarray, shape (N, H, W)
        Ground-truth regions (bool): boxes in the papers.

    Returns
    -------
    ndarray, shape (N,), float64
        EBPG per image in [0, 1]; NaN without positive energy or without a region.
    """
    pos = np.clip(np.nan_to_num(maps.astype(np.float64), nan=0.0), 0, None)
    total = pos.sum(axis=(1, 2))
    inside = (pos * regions).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = inside / total
    out[(total <= 0) | ~regions.any(axis=(1, 2))] = np.nan
    return out


def box_regions(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boolean (N, H, W) regions of (y0, x0, y1, x1) boxes; rows of -1 give empty regions."""
    out = np.zeros((len(boxes), height, width), dtype=bool)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        if y1 > y0 >= 0 and x1 > x0 >= 0:
            out[i, y0:y1, x0:x1] = True
    return out


def bbox_accuracy(maps: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bbox accuracy and IoU (metrics.md, sections 5 and 6; Schulz et al., ICLR 2020).

    With ``K`` the region's area, Bbox accuracy is the share of the map's ``K`` highest
    pixels that lie inside the region. IoU is the IoU of those ``K`` pixels with the region
    (our reading of SISE's mIoU: binarise by the same top-``K`` rule). If a group of tied
    pixels straddles the ``K``-th value, the top ``K`` takes a uniformly random subset of
    it. Both scores are then exact expectations over that subset: the number of tied
    pixels inside is hypergeometric. A constant map (all-zero included) therefore scores
    the chance level: accuracy ``K / (H W)``, and IoU ``E[i / (2K - i)]`` for a
    hypergeometric ``i``. Without ties the scores are the plain top-``K`` ones.

    Parameters
    ----------
    maps : ndarray, shape (N, H, W)
        Attributions.
    regions : ndarray, shape (N, H, W)
        Ground-truth regions (bool).

    Returns
    -------
    (ndarray, ndarray), each shape (N,), float64
        Bbox accuracy and IoU per image, in [0, 1]; NaN without a region or with a
        non-finite map.
    """
    n = len(maps)
    acc, iou = np.full(n, np.nan), np.full(n, np.nan)
    for i in range(n):
        region = regions[i].ravel().astype(bool)
        k = int(region.sum())
        values = maps[i].ravel().astype(np.float64)
        if k == 0 or not np.isfinite(values).all():
            continue
        threshold = np.sort(values)[::-1][k - 1]
        above, tied = values > threshold, values == threshold
        sure = int((above & region).sum())  # surely in the top K and inside
        draw = k - int(above.sum())  # tied pixels that enter the top K
        g, g_in = int(tied.sum()), int((tied & region).sum())
        extra = np.arange(min(draw, g_in) + 1)
        pmf = hypergeom.pmf(extra, g, g_in, draw) if draw < g else (extra == min(draw, g_in)).astype(float)
        inside = sure + extra
        acc[i] = float((pmf * inside).sum() / k)
        iou[i] = float((pmf * inside / (2 * k - inside)).sum())
    return acc, iou
