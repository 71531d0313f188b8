"""Dtype-aware numeric guards and streamed random draws shared by the explainers.

Half precision (``model.half()``, or ``torch.autocast`` with float16 / bfloat16) breaks two
habits of float32 code: constants such as ``1e-8`` added to a denominator round to 0 in
float16 (its smallest subnormal is 6e-8), and sums of a few thousand squares overflow its
largest value (65504). The rule used here: normalisations, divisions and accumulators run in
:func:`working_dtype` (float32 for 16-bit tensors, the tensor's own dtype otherwise, so float32
and float64 results are unchanged bit for bit), and a result is cast back to the model's dtype
only where it is fed to the model.

The second half of the module draws a long sequence of random numbers a block at a time
without changing a single value (:class:`NormalStream`, :class:`SerialStream`): a sampling
explainer keeps one batch of noise in memory however many samples it averages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attriflow.explainers.base import UnsupportedModelError

#: Dtypes whose arithmetic is redone in float32 by :func:`working_dtype`.
LOW_PRECISION = (torch.float16, torch.bfloat16)


class LowPrecisionError(UnsupportedModelError):
    """An explainer cannot give a finite result in float16 / bfloat16; the message says why
    and names the dtype (a ``ValueError``, through :class:`explainers.base.UnsupportedModelError`)."""


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which normalisations and accumulations of ``dtype`` values are computed.

    Parameters
    ----------
    dtype : torch.dtype
        Dtype of the tensors involved (activations, gradients, inputs).

    Returns
    -------
    torch.dtype
        float32 for float16 and bfloat16, float64 for float64, else float32.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_working(x: Tensor) -> Tensor:
    """``x`` in :func:`working_dtype` (the same tensor, no copy, when it already is)."""
    return x.to(working_dtype(x.dtype))


def guard(eps: float, dtype: torch.dtype) -> float:
    """A positive denominator guard that does not round to 0 in ``dtype``.

    Parameters
    ----------
    eps : float
        The method's constant (for example Score-CAM's ``1e-8``).
    dtype : torch.dtype
        Floating dtype the addition happens in.

    Returns
    -------
    float
        ``eps`` when it is at least ``torch.finfo(dtype).tiny`` (the smallest normal number),
        else ``tiny``: 6.1e-5 in float16, 1.2e-38 in bfloat16 and float32.
    """
    return max(eps, torch.finfo(dtype).tiny)


def minmax_scale(x: Tensor, eps: float) -> Tensor:
    """Each item of ``x`` (along dim 0) scaled to [0, 1]: ``(x - min) / (max - min + eps)``.

    Computed in :func:`working_dtype` with the guard :func:`guard`, so a constant item gives
    zeros (not NaN) in every precision; float32 and float64 inputs give exactly the old
    float32 / float64 expression.

    Parameters
    ----------
    x : Tensor, shape (N, ...)
        Floating values.
    eps : float
        Denominator guard of the method (``1e-8`` Score-CAM, ``1e-6`` SISE).

    Returns
    -------
    Tensor, shape (N, ...)
        Scaled values in :func:`working_dtype` of ``x``.
    """
    x = as_working(x)
    flat = x.flatten(1)
    shape = (-1, *([1] * (x.ndim - 1)))
    lo, hi = flat.amin(1).view(shape), flat.amax(1).view(shape)
    return (x - lo) / (hi - lo + guard(eps, x.dtype))


# ---------------------------------------------------------------------------- streamed draws
#: CPU ``normal_`` transforms uniforms in blocks of this many numbers (Box-Muller pairs i and
#: i + 8); a tensor whose size is not a multiple redraws its last block. Blocks that keep to
#: this grid reproduce one large draw exactly (checked by tests/explainers/test_memory.py).
_NORMAL_BLOCK = 16


class NormalStream:
    """``torch.randn((count, *shape), generator=g, dtype=dtype)``, handed out in pieces.

    ``take(k)`` returns the next ``k`` items of that tensor with the same values, while only
    ``k`` items (plus fewer than 16 numbers) are ever held, so the memory of a sampling loop
    does not grow with ``count``. The generator must not be used by anyone else until the
    stream is exhausted.

    Parameters
    ----------
    generator : torch.Generator
        CPU generator (a sample's own).
    count : int
        Number of items in the full draw.
    shape : tuple of int
        Shape of one item.
    dtype : torch.dtype
        Floating dtype of the draw.

    Raises
    ------
    ValueError
        From :meth:`take` when more items are asked for than remain.

    Notes
    -----
    Relies on the block structure of PyTorch's CPU ``normal_`` (``normal_fill``: all uniforms
    of a tensor of at least 16 numbers are drawn first and transformed 16 at a time; a tail is
    redrawn as the last 16 numbers); draws of fewer than 16 numbers in all are made at once.
    """

    def __init__(self, generator: torch.Generator, count: int, shape: tuple[int, ...],
                 dtype: torch.dtype) -> None:
        self.generator = generator
        self.item = 1
        for s in shape:
            self.item *= int(s)
        self.shape = tuple(int(s) for s in shape)
        self.count = count
        self.total = count * self.item
        self.dtype = dtype
        self.drawn = 0  # numbers drawn from the generator (and placed)
        self.given = 0  # items handed out
        self.buffer = torch.empty(0, dtype=dtype)  # drawn, not yet handed out

    def _draw(self, n: int) -> None:
        """Draw at least ``n`` more numbers, keeping every draw on the 16-number grid."""
        left = self.total - self.drawn
        if left >= _NORMAL_BLOCK:
            n = min(-(-n // _NORMAL_BLOCK) * _NORMAL_BLOCK, left)
            if left - n < _NORMAL_BLOCK:
                n = left  # the tail (redrawn by normal_ when not a multiple) goes with its block
        else:
            n = left  # fewer than 16 numbers in all: one draw
        new = torch.randn(n, generator=self.generator, dtype=self.dtype)
        self.buffer = torch.cat([self.buffer, new]) if len(self.buffer) else new
        self.drawn += n

    def take(self, k: int) -> Tensor:
        """The next ``k`` items.

        Parameters
        ----------
        k : int
            Items to return.

        Returns
        -------
        Tensor, shape (k, *shape)
            ``dtype`` values on the CPU.

        Raises
        ------
        ValueError
            If fewer than ``k`` items remain.
        """
        if self.given + k > self.count:
            raise ValueError(f"NormalStream: {k} items asked, {self.count - self.given} left")
        need = k * self.item
        if len(self.buffer) < need:
            self._draw(need - len(self.buffer))
        out, self.buffer = self.buffer[:need], self.buffer[need:]
        self.given += k
        if not len(self.buffer):
            self.buffer = torch.empty(0, dtype=self.dtype)
        return out.reshape(k, *self.shape)


class SerialStream:
    """A draw whose numbers come one per element in order, handed out in pieces.

    ``draw(k, generator)`` must return ``k`` items and consume the generator element by
    element (CPU ``torch.rand``, ``torch.randint``, ``torch.bernoulli`` do; ``torch.randn``
    does not, see :class:`NormalStream`), so consecutive pieces equal one draw of ``count``
    items. The stream replays a copy of the generator's state; the generator itself is
    advanced past the whole draw at once (a block at a time, nothing kept), so later draws
    from it (RISE's shifts after its grids) get the numbers they always got.

    Parameters
    ----------
    generator : torch.Generator
        CPU generator (a sample's own).
    count : int
        Number of items in the full draw.
    draw : callable
        ``draw(k, generator) -> Tensor`` of ``k`` items.
    block : int
        Items drawn (and dropped) per step while advancing ``generator``.

    Raises
    ------
    ValueError
        From :meth:`take` when more items are asked for than remain.
    """

    def __init__(self, generator: torch.Generator, count: int,
                 draw: Callable[[int, torch.Generator], Tensor], block: int = 4096) -> None:
        self.count = count
        self.draw = draw
        self.given = 0
        self.own = torch.Generator().set_state(generator.get_state())
        left = count
        while left:
            step = min(left, block)
            draw(step, generator)
            left -= step

    def take(self, k: int) -> Tensor:
        """The next ``k`` items.

        Parameters
        ----------
        k : int
            Items to return.

        Returns
        -------
        Tensor
            What ``draw(k, ...)`` returns for the next ``k`` items.

        Raises
        ------
        ValueError
            If fewer than ``k`` items remain.
        """
        if self.given + k > self.count:
            raise ValueError(f"SerialStream: {k} items asked, {self.count - self.given} left")
        self.given += k
        return self.draw(k, self.own)
