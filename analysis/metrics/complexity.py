"""Complexity of a map."""

from __future__ import annotations

import numpy as np


def gini(maps: np.ndarray) -> np.ndarray:
    """Gini index of |map| per image (Hurley & Rickard 2009; Chalasani et al. 2020).

    The index is 0 for a uniform map and tends to 1 when one pixel holds everything. It
    depends only on the sorted values, so ties and pixel order do not matter. An all-zero
    map has no distribution of mass (0/0) and gives NaN. Quantus' ``Sparseness`` adds 1e-7
    to every value instead, which turns an all-zero map into a uniform one scoring 0. We
    keep NaN, because an empty map is not a spread-out one. On other maps the two agree up
    to that 1e-7.

    Parameters
    ----------
    maps : ndarray, shape (N, H, W)
        Attributions.

    Returns
    -------
    ndarray, shape (N,), float64
        Sparseness per image in [0, 1); NaN for an all-zero map or a non-finite one.
    """
    x = np.sort(np.abs(maps.reshape(len(maps), -1).astype(np.float64)), axis=1)
    n = x.shape[1]
    total = x.sum(axis=1)
    k = np.arange(1, n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = 1 - 2 * ((x / total[:, None]) * ((n - k + 0.5) / n)).sum(axis=1)
    g[total <= 0] = np.nan
    return g
