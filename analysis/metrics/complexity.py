"""Complexity of a map."""

from __future__ import annotations

import numpy as np


def gini(maps: np.ndarray) -> np.ndarray:
    """Gini index of |map| per image (Hurley & Rickard 2009; Chalasani et al. 2020): 0 for a
    uniform map, towards 1 when one pixel holds everything; NaN for an all-zero map.

    Parameters
    ----------
    maps : ndarray, shape (N, H, W)
        Attributions.

    Returns
    -------
    ndarray, shape (N,)
        Sparseness per image.
    """
    x = np.sort(np.abs(maps.reshape(len(maps), -1).astype(np.float64)), axis=1)
    n = x.shape[1]
    total = x.sum(axis=1)
    k = np.arange(1, n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = 1 - 2 * ((x / total[:, None]) * ((n - k + 0.5) / n)).sum(axis=1)
    g[total <= 0] = np.nan
    return g
