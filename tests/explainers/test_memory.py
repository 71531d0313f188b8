"""Memory of sampling explainers is one batch's, whatever their sample, step or mask count.

Issue #13: SmoothGrad built all noisy copies up front (9 MiB at 25 samples, 167 MiB at 400
for two 96x96 images). Here every tensor storage created by a torch operation during
``attribute`` is counted from its allocation until it is freed (a ``TorchDispatchMode`` sees
every operation's outputs; a finaliser on the storage sees the free, also for tensors that
autograd keeps), and the peak of the live bytes must not grow when the count grows 8-fold.
Deterministic: no timing, no process RSS.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attriflow.explainers import get_explainer
from attriflow.explainers._numerics import NormalStream, SerialStream


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created by torch operations inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.alive: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.alive:
                    self.alive.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()


def _peak(name: str, params: dict, x: torch.Tensor, batch_size: int) -> int:
    exp = get_explainer(name)(_net(), **params)
    t = torch.tensor([0, 1])
    exp.attribute(x, t, batch_size=batch_size, seeds=torch.tensor([3, 4]))  # warm (resolve, caches)
    with LiveBytes() as mode:
        out = exp.attribute(x, t, batch_size=batch_size, seeds=torch.tensor([3, 4]))
    assert torch.isfinite(out).all()
    return mode.peak


#: (explainer, fixed parameters, the count parameter, its small and large value)
SAMPLING = [
    ("smooth_grad", {}, "samples", 16, 128),
    ("smooth_grad", {"base": "integrated_gradients", "base_params": {"steps": 2}}, "samples", 16, 128),
    ("integrated_gradients", {}, "steps", 16, 128),
    ("rise", {"grid": 4}, "masks", 16, 128),
    ("occlusion", {"window": 4}, "stride", 4, 2),  # 16 windows -> 49 windows
    ("neuromask", {}, "iterations", 4, 32),
]


@pytest.mark.parametrize(("name", "fixed", "count", "small", "large"), SAMPLING,
                         ids=[f"{s[0]}-{s[2]}" for s in SAMPLING])
def test_peak_memory_does_not_grow_with_the_count(name, fixed, count, small, large) -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = 8  # the small count already makes several full passes
    lo = _peak(name, {**fixed, count: small}, x, batch)
    hi = _peak(name, {**fixed, count: large}, x, batch)
    # one 16x16 RGB image is 3 KiB: allow a few, never anything like count x image
    image = x[0].numel() * x.element_size()
    assert hi - lo <= 4 * image, (lo, hi, (hi - lo) / image)


def test_the_tracker_sees_a_count_times_image_buffer() -> None:
    x = torch.randn(2, 3, 32, 32)
    with LiveBytes() as a:
        torch.randn((2, 25, 3, 32, 32)).sum()
    with LiveBytes() as b:
        torch.randn((2, 400, 3, 32, 32)).sum()
    assert b.peak - a.peak >= 375 * 2 * x[0].numel() * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("count", "shape"), [(25, (3, 7, 7)), (3, (5,)), (2, (3,)), (10, (16,)),
                                              (400, (3,)), (13, (3, 20, 20))])
def test_normal_stream_equals_one_draw(dtype, count, shape) -> None:
    full = torch.randn((count, *shape), generator=torch.Generator().manual_seed(5), dtype=dtype)
    stream = NormalStream(torch.Generator().manual_seed(5), count, shape, dtype)
    pieces, k = [], 0
    for step in (1, 2, 5, 1, 3, 7, 11, 64):
        take = min(step, count - k)
        if take:
            pieces.append(stream.take(take))
            k += take
    while k < count:
        pieces.append(stream.take(1))
        k += 1
    assert torch.equal(torch.cat(pieces), full)
    with pytest.raises(ValueError, match="left"):
        stream.take(1)


def test_serial_stream_equals_one_draw_and_advances_the_generator() -> None:
    g = torch.Generator().manual_seed(9)
    grids = torch.rand((37, 4, 4), generator=g)
    after = torch.randint(0, 5, (37,), generator=g)
    g = torch.Generator().manual_seed(9)
    stream = SerialStream(g, 37, lambda k, gen: torch.rand((k, 4, 4), generator=gen), block=5)
    assert torch.equal(torch.randint(0, 5, (37,), generator=g), after)
    assert torch.equal(torch.cat([stream.take(k) for k in (10, 1, 20, 6)]), grids)
