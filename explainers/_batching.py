"""The one place that splits work into forward passes of ``batch_size`` evaluations."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def iter_jobs(n_items: int, n_evals: int, batch_size: int, device: torch.device | None = None
              ) -> Iterator[tuple[Tensor, Tensor]]:
    """Flatten ``(item, evaluation)`` jobs in item-major order into batches.

    Parameters
    ----------
    n_items : int
        Number of images.
    n_evals : int
        Evaluations per image (steps, samples, masks, windows).
    batch_size : int
        Jobs per batch.
    device : torch.device or None
        Device of the index tensors.

    Yields
    ------
    (Tensor, Tensor)
        int64 item and evaluation indices of one batch.
    """
    total = n_items * n_evals
    for start in range(0, total, max(batch_size, 1)):
        j = torch.arange(start, min(start + batch_size, total), device=device)
        yield j // n_evals, j % n_evals
