"""Input gradients, channel reductions and ReLU back-propagation overrides."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attriflow.explainers._functional import Call, hardtanh_bounds, intercept, scan
from attriflow.explainers._numerics import as_working
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers.base import UnsupportedModelError

Reduce = Literal["sum", "sum_abs", "max_abs", "l2"]


def reduce_channels(attributions: Tensor, how: Reduce) -> Tensor:
    """(N, C, H, W) -> (N, H, W) by the named channel reduction, in float32 at least (the
    squares of ``l2`` underflow float16)."""
    attributions = as_working(attributions)
    if how == "sum":
        return attributions.sum(dim=1)
    if how == "sum_abs":
        return attributions.abs().sum(dim=1)
    if how == "max_abs":
        return attributions.abs().amax(dim=1)
    return attributions.pow(2).sum(dim=1).sqrt()


def input_gradient(model: nn.Module, inputs: Tensor, targets: Tensor, score: ScoreKind) -> Tensor:
    """Gradient of each image's target score with respect to its input, shape (N, C, H, W)."""
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(False)  # no weight gradients (restored by Explainer.attribute)
        scores = target_scores(model(x), targets, score)
        (grad,) = torch.autograd.grad(scores.sum(), x)
    return grad


class ReluMode:
    """The backward rule of :func:`relu_backward`'s ReLUs, read when the backward runs, so
    one forward pass can serve a plain and a guided gradient (Guided Grad-CAM)."""

    def __init__(self, mode: Literal["plain", "guided", "deconv"]) -> None:
        self.mode = mode


class _SwitchReLU(torch.autograd.Function):
    """clamp(x, 0, high) forward; backward by the :class:`ReluMode` read when it runs."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, state: ReluMode, high: float | None) -> Tensor:
        out = x.clamp_min(0) if high is None else x.clamp(0, high)
        ctx.save_for_backward(out if high is None else x)
        ctx.state, ctx.high = state, high
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (saved,) = ctx.saved_tensors
        mode = ctx.state.mode
        if mode == "deconv":
            return grad.clamp_min(0), None, None
        g = grad.clamp_min(0) if mode == "guided" else grad
        if ctx.high is None:  # ReLU: one fused kernel, zero where the output is zero
            return torch.ops.aten.threshold_backward(g, saved, 0), None, None
        inside = (saved > 0) & (saved < ctx.high)
        return g * inside.to(g.dtype), None, None


#: kinds of :mod:`explainers._functional` that have no guided / deconv rule
UNGUIDED_KINDS = {"activation", "other"}


def refuse_unguided(name: str, model: nn.Module, example: Tensor) -> None:
    """Raise when ``model`` applies non-linearities other than ReLU / ReLU6 (element-wise
    activations, hand-written piecewise functions: see :mod:`explainers._functional`).

    Guided Backprop and DeconvNet define a backward rule for rectifiers only; on a SiLU,
    GELU or Hardswish network they would return the plain gradient there (Captum and
    zennit do so silently).

    Raises
    ------
    UnsupportedModelError
        Naming the functions and the modules that call them.
    """
    found = scan(model, example)
    bad = found.kinds() & UNGUIDED_KINDS
    if bad:
        raise UnsupportedModelError(
            f"{name}: the guided/deconv rule is defined for ReLU (and ReLU6) only, and this model "
            f"also applies {found.describe(bad)}; use saliency, integrated_gradients or smooth_grad "
            "(or grad_cam-type maps) for it")


@contextmanager
def relu_backward(model: nn.Module, mode: Literal["guided", "deconv"] | ReluMode) -> Iterator[None]:
    """Override the backward pass of every rectifier the model applies inside the block.

    ``guided``: pass only positive gradients where the input was positive (Springenberg et
    al.); ``deconv``: pass positive gradients regardless of the input (Zeiler & Fergus); a
    :class:`ReluMode`: whichever rule (or ``plain``) it holds when the backward runs.
    Every ReLU is seen, whoever applies it: ``nn.ReLU`` modules, ``F.relu`` / ``torch.relu``
    / ``Tensor.relu`` calls in a ``forward`` (in place or not), and ReLU6 (``F.hardtanh``
    with ``min_val=0``, guided inside (0, 6)), through :class:`explainers._functional.Intercept`.
    Each is computed once, out of place, by a custom autograd function. (Captum's module
    hooks miss functional calls.) ``model`` is unused; kept for the call sites' symmetry.
    """
    state = mode if isinstance(mode, ReluMode) else ReluMode(mode)

    def handler(call: Call) -> Any:
        if call.kind == "relu":
            return _SwitchReLU.apply(call.input, state, None)
        low, high = hardtanh_bounds(call)
        if low == 0:
            return _SwitchReLU.apply(call.input, state, high)
        return NotImplemented

    with intercept(handler, {"relu", "relu6"}):
        yield
