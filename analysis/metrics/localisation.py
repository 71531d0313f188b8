"""Localisation metrics against ground-truth regions (metrics.md, sections 3 and 4)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt


def default_tolerance(image_size: int) -> float:
    """The pointing game's 15 px at 224 px, scaled to the image size (our choice for small
    images: 15 px on a 64 px image would accept a third of it)."""
    return 15.0 * image_size / 224.0


def pointing_game(maps: np.ndarray, masks: np.ndarray, tolerance: float) -> np.ndarray:
    """1 where the map's maximum lies within ``tolerance`` pixels of the ground truth, else 0.

    Parameters
    ----------
    maps : ndarray, shape (N, H, W)
        Attributions (the first maximum in raster order is the point).
    masks : ndarray, shape (N, H, W)
        Ground-truth regions (bool); an empty region gives NaN.
    tolerance : float
        Euclidean distance in pixels.

    Returns
    -------
    ndarray, shape (N,)
        Hits as 1.0 / 0.0 (NaN without ground truth or with a non-finite map).
    """
    out = np.full(len(maps), np.nan)
    for i, (m, g) in enumerate(zip(maps, masks)):
        if not g.any() or not np.isfinite(m).all():
            continue
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        distance = distance_transform_edt(~g)  # 0 inside the region
        out[i] = float(distance[y, x] <= tolerance)
    return out


def energy_pointing_game(maps: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Share of the map's positive energy inside the region (Score-CAM's EBPG).

    Negative attributions are clamped to 0 first (signed maps would break the ratio); a
    map with no positive energy gives NaN. A uniform map scores the region's area fraction.

    Parameters
    ----------
    maps : ndarray, shape (N, H, W)
        Attributions.
    regions : ndarray, shape (N, H, W)
        Ground-truth regions (bool): boxes in the papers.

    Returns
    -------
    ndarray, shape (N,)
        EBPG per image in [0, 1].
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
    """Bbox accuracy and IoU (metrics.md, sections 5 and 6): with K the region's area, the
    share of the map's K highest pixels inside the region, and the IoU of those K pixels with
    the region (our reading of SISE's mIoU: binarise by the same top-K rule). NaN without a
    region. Ties keep raster order.

    Returns
    -------
    (ndarray, ndarray), each shape (N,)
        Bbox accuracy and IoU per image.
    """
    n = len(maps)
    acc, iou = np.full(n, np.nan), np.full(n, np.nan)
    for i in range(n):
        k = int(regions[i].sum())
        if k == 0 or not np.isfinite(maps[i]).all():
            continue
        order = np.argsort(-maps[i].ravel(), kind="stable")[:k]
        top = np.zeros(maps[i].size, bool)
        top[order] = True
        inside = int((top & regions[i].ravel()).sum())
        acc[i] = inside / k
        iou[i] = inside / int((top | regions[i].ravel()).sum())
    return acc, iou
