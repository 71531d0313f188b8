"""Input gradients, channel reductions and ReLU back-propagation overrides."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from explainers._scores import ScoreKind, target_scores

Reduce = Literal["sum", "sum_abs", "max_abs", "l2"]


def reduce_channels(attributions: Tensor, how: Reduce) -> Tensor:
    """(N, C, H, W) -> (N, H, W) by the named channel reduction."""
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
    @staticmethod
    def forward(ctx: Any, x: Tensor, state: ReluMode) -> Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        ctx.state = state
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        mode = ctx.state.mode
        if mode == "deconv":
            return grad.clamp_min(0), None
        return torch.ops.aten.threshold_backward(grad.clamp_min(0) if mode == "guided" else grad, out, 0), None


@contextmanager
def relu_backward(model: nn.Module, mode: Literal["guided", "deconv"] | ReluMode) -> Iterator[None]:
    """Override the backward pass of every ``nn.ReLU`` module inside the block.

    ``guided``: pass only positive gradients where the input was positive (Springenberg et
    al.); ``deconv``: pass positive gradients regardless of the input (Zeiler & Fergus); a
    :class:`ReluMode`: whichever rule (or ``plain``) it holds when the backward runs.
    Each ReLU module's forward is replaced, for the duration, by a custom autograd function
    (out of place, computed once), which works for a module called several times per
    forward pass.
    Functional ``F.relu`` calls are not seen, as in Captum.
    """
    state = mode if isinstance(mode, ReluMode) else ReluMode(mode)

    def apply(x: Tensor) -> Tensor:
        return _SwitchReLU.apply(x, state)

    relus = [m for m in model.modules() if isinstance(m, nn.ReLU) and "forward" not in m.__dict__]
    try:
        for m in relus:  # an instance attribute shadows ReLU.forward until removed
            m.forward = apply  # type: ignore[method-assign]
        yield
    finally:
        for m in relus:
            m.__dict__.pop("forward", None)
