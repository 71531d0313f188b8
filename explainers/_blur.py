"""Separable blurs as products with band matrices.

A 1-D correlation with zero padding of an axis of length ``n`` is the (n x n) band matrix
``B[i, j] = taps[j - i + r]`` (``|j - i| <= r``, ``r`` the kernel's radius); blurring the two
spatial axes of an image is ``B_h X B_w^T``. For the wide kernels of path and perturbation
methods (401 taps at PAIR's sigma of 50 pixels, wider than the image) this does the work of
the overlapping taps only, where a convolution spends most of its on padding, and one
batched matrix product serves images with different kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def band_matrices(taps: Tensor, size: int) -> Tensor:
    """Zero-padded centred correlation with each row of ``taps`` as a (size x size) matrix.

    Parameters
    ----------
    taps : Tensor, shape (K,) or (B, K), K odd
        Kernels, centred on tap ``(K - 1) / 2``.
    size : int
        Length of the axis.

    Returns
    -------
    Tensor, shape (size, size) or (B, size, size)
        ``B[..., i, j] = taps[..., j - i + (K - 1) / 2]`` where that tap exists, else 0; the
        dtype and device of ``taps``.
    """
    k = taps.shape[-1]
    i = torch.arange(size, device=taps.device)
    d = i[None, :] - i[:, None] + (k - 1) // 2  # (size, size)
    inside = (d >= 0) & (d < k)
    picked = taps[..., d.clamp(0, k - 1)]  # (..., size, size)
    return torch.where(inside, picked, torch.zeros((), dtype=taps.dtype, device=taps.device))


def separable_blur(images: Tensor, taps: Tensor) -> Tensor:
    """Images blurred over their two spatial axes with zero padding.

    Parameters
    ----------
    images : Tensor, shape (B, C, H, W)
        Images.
    taps : Tensor, shape (K,) or (B, K)
        One kernel for all images or one per image, cast to the images' dtype.

    Returns
    -------
    Tensor, shape (B, C, H, W)
    """
    taps = taps.to(device=images.device, dtype=images.dtype)
    h, w = images.shape[-2:]
    rows = band_matrices(taps, h)
    cols = band_matrices(taps, w) if w != h else rows
    if taps.ndim == 2:
        rows, cols = rows[:, None], cols[:, None]
    return rows @ images @ cols.transpose(-1, -2)
