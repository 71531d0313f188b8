"""The one place that splits work into forward passes of ``batch_size`` evaluations."""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn


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


#: Activation bytes one automatically sized batch may produce in a forward pass: the sum
#: over every leaf module's output, per input, times the batch. 2 GiB gives ResNet-50 at
#: 224x224 (122 MiB per input) 16 and small CNNs the cap.
AUTO_BUDGET_BYTES = 2 << 30
AUTO_MAX_BATCH = 256

_auto_cache: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def iter_ragged_jobs(counts: list[int], batch_size: int, device: torch.device | None = None
                     ) -> Iterator[tuple[Tensor, Tensor]]:
    """:func:`iter_jobs` for items with different numbers of evaluations (superpixels of
    each image): ``counts[i]`` evaluations of item ``i``, item-major, in batches of
    ``batch_size`` jobs.

    Yields
    ------
    (Tensor, Tensor)
        int64 item and evaluation indices of one batch.
    """
    item = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64))
    first = torch.cumsum(torch.tensor([0, *counts[:-1]], dtype=torch.int64), 0) if counts else item
    for start in range(0, len(item), max(batch_size, 1)):
        i = item[start:start + batch_size]
        e = torch.arange(start, start + len(i)) - first[i]
        yield i.to(device), e.to(device)


def auto_batch_size(model: nn.Module, example: Tensor, budget_bytes: int = AUTO_BUDGET_BYTES,
                    cap: int = AUTO_MAX_BATCH) -> int:
    """Evaluations per pass chosen from the model's activation footprint.

    The largest power of two ``b <= cap`` for which ``b`` inputs like ``example`` produce at
    most ``budget_bytes`` of leaf-module outputs in one forward pass (at least 1). With the
    allocator kept warm, time per evaluation is flat from batch 8 to 64 on ResNet-50
    (``benchmarks/RESULTS.md``), but passes much larger than the caches are slower (50-step
    Integrated Gradients on ResNet-50: 2.97 s per image at 16, 3.85 s at 64), and memory grows
    with the batch; so the footprint, not a fixed count, picks the size. Measured once per
    model, input shape, dtype and device with one forward pass of one input.

    Parameters
    ----------
    model : nn.Module
        The network explained.
    example : Tensor, shape (N, ...)
        An input batch; its first item is run.
    budget_bytes : int
        Activation bytes allowed per pass.
    cap : int
        Largest batch returned.

    Returns
    -------
    int
        The batch size.
    """
    key = (tuple(example.shape[1:]), example.dtype, example.device, budget_bytes, cap)
    cached = _auto_cache.setdefault(model, {})
    if key in cached:
        return cached[key]
    total = 0

    def count(_m: nn.Module, _i: object, out: object) -> None:
        nonlocal total
        if isinstance(out, Tensor):
            total += out.numel() * out.element_size()

    leaves = [m for m in model.modules() if next(iter(m.children()), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    fits = budget_bytes // max(total, 1)
    size = 1 << max(0, min(int(fits), cap).bit_length() - 1) if fits >= 1 else 1
    cached[key] = size
    return size
