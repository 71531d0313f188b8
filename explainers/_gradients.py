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


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp_min(0) * (out > 0).to(grad.dtype)


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.clamp_min(0)


@contextmanager
def relu_backward(model: nn.Module, mode: Literal["guided", "deconv"]) -> Iterator[None]:
    """Override the backward pass of every ``nn.ReLU`` module inside the block.

    ``guided``: pass only positive gradients where the input was positive (Springenberg et
    al.); ``deconv``: pass positive gradients regardless of the input (Zeiler & Fergus).
    The ReLU's output is recomputed from its input by a custom function, which works for a
    module called several times per forward pass; in-place ReLUs are switched to
    out-of-place for the duration (and restored), so their input is still available.
    Functional ``F.relu`` calls are not seen, as in Captum.
    """
    fn = _GuidedReLU if mode == "guided" else _DeconvReLU
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    inplace = [m.inplace for m in relus]
    handles = []
    try:
        for m in relus:
            m.inplace = False
            handles.append(m.register_forward_hook(lambda _m, inp, _out: fn.apply(inp[0])))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, flag in zip(relus, inplace):
            m.inplace = flag
