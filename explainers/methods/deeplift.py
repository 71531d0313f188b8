"""DeepLIFT with the rescale rule (Shrikumar et al. 2017)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from explainers._gradients import Reduce, reduce_channels
from explainers._scores import ScoreKind, target_scores
from explainers.base import Explainer, ExplainerSpec, Family
from explainers.registry import register

EPS = 1e-10
NONLINEAR = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh)


class _Rescale(torch.autograd.Function):
    """y = f(x) on the stacked batch [inputs; references]; backward: the rescale multiplier
    (delta out / delta in), or the plain derivative where delta in is below 1e-10."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.fn = fn
        ctx.save_for_backward(x)
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            y = ctx.fn(xx)
            (plain,) = torch.autograd.grad(y, xx, grad)
        y = y.detach()
        x_in, x_ref = x.chunk(2)
        y_in, y_ref = y.chunk(2)
        delta_in = torch.cat(2 * [x_in - x_ref])
        delta_out = torch.cat(2 * [y_in - y_ref])
        return torch.where(delta_in.abs() < EPS, plain, grad * delta_out / delta_in), None


class _MaxPoolRescale(torch.autograd.Function):
    """Max-pool on [inputs; references] with Captum's DeepLIFT max-pool multiplier."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, pool: nn.MaxPool2d, overlap: str) -> Tensor:
        out, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                pool.ceil_mode, return_indices=True)
        ctx.pool = pool
        ctx.overlap = overlap
        ctx.save_for_backward(x, out, idx)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        x, out, idx = ctx.saved_tensors
        p = ctx.pool
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            y = F.max_pool2d(xx, p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode)
            (plain,) = torch.autograd.grad(y, xx, grad)
        x_in, x_ref = x.chunk(2)
        o_in, o_ref = out.chunk(2)
        delta_in = torch.cat(2 * [x_in - x_ref])
        top = torch.max(o_in, o_ref)
        delta_out = torch.cat([top - o_ref, o_in - top])
        if ctx.overlap == "overwrite":  # Captum: one window's value per input position
            unpooled = F.max_unpool2d(grad * delta_out, idx, p.kernel_size, p.stride, p.padding,
                                      output_size=list(x.shape))
        else:  # every window that picked a position contributes
            flat = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], dtype=x.dtype, device=x.device)
            flat.scatter_add_(2, idx.flatten(2), (grad * delta_out).flatten(2))
            unpooled = flat.view_as(x)
        a, b = unpooled.chunk(2)
        spread = torch.cat(2 * [a + b])
        return torch.where(delta_in.abs() < EPS, plain, spread / delta_in), None, None


@contextmanager
def deeplift_hooks(model: nn.Module, overlap: str = "accumulate") -> Iterator[None]:
    """Route every non-linearity and max-pool module through the rescale multipliers.

    Works for modules called several times per forward pass (torchvision ResNets reuse one
    ReLU per block, where Captum's module hooks fail); in-place modules are made
    out-of-place for the duration and restored.
    """
    handles, inplace = [], []
    try:
        for m in model.modules():
            if isinstance(m, NONLINEAR):
                if getattr(m, "inplace", False):
                    inplace.append(m)
                    m.inplace = False  # type: ignore[union-attr]
                handles.append(m.register_forward_hook(
                    lambda mod, inp, _out: _Rescale.apply(inp[0], mod.forward)))
            elif isinstance(m, nn.MaxPool2d):
                handles.append(m.register_forward_hook(
                    lambda mod, inp, _out: _MaxPoolRescale.apply(inp[0], mod, overlap)))
        yield
    finally:
        for h in handles:
            h.remove()
        for m in inplace:
            m.inplace = True  # type: ignore[union-attr]


class DeepLIFTParams(BaseModel):
    """Parameters of :class:`DeepLIFT`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    baseline: float = 0.0
    score: ScoreKind = "logit"
    reduce: Reduce = "sum"
    maxpool_overlap: Literal["accumulate", "overwrite"] = "accumulate"


@register
class DeepLIFT(Explainer):
    """Contribution of each input's difference from a reference, by the rescale rule.

    Inputs and references (a constant ``baseline`` in model-input space; 0 is the mean
    colour) go through the model in one stacked batch; each ReLU/ELU/LeakyReLU/Sigmoid/Tanh
    module multiplies the gradient by ``delta out / delta in``, and max-pools use Captum's
    rule (multipliers through the larger of the input's and the reference's maxima), so
    maps equal Captum's ``DeepLift``. Linear layers, BatchNorm, average pools and additions
    pass gradients unchanged. The map is ``(x - baseline) * multiplier``, summed over
    channels; it sums to ``f(x) - f(baseline)`` (summation to delta).

    Notes
    -----
    Where max-pool windows overlap (ResNet's 3x3/2 stem pool), Captum un-pools with
    ``max_unpool2d``, which keeps one window's contribution per position and breaks
    summation to delta. We add every window's contribution (``maxpool_overlap=
    "accumulate"``, default); ``"overwrite"`` reproduces Captum. Both agree when windows do
    not overlap. Captum also mis-orders its hooks when a ReLU feeds a max-pool directly
    (its maps then stop summing to delta); ours do not depend on module adjacency.

    References
    ----------
    A. Shrikumar, P. Greenside, A. Kundaje, "Learning Important Features Through
    Propagating Activation Differences", ICML 2017.
    """

    spec = ExplainerSpec(
        name="deeplift",
        family=Family.RELEVANCE,
        summary="reference-difference contributions by the rescale rule",
        references=("shrikumar2017",),
    )
    Params = DeepLIFTParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": 2, "backward": 2}

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        reference = torch.full_like(inputs, self.p.baseline)
        with deeplift_hooks(self.model, self.p.maxpool_overlap), torch.enable_grad():
            for p in self.model.parameters():
                p.requires_grad_(False)
            x = inputs.detach().clone().requires_grad_(True)
            out = self.model(torch.cat([x, reference]))
            scores = target_scores(out, torch.cat([targets, targets]), self.p.score)
            (grad,) = torch.autograd.grad(scores.sum(), x)
        return reduce_channels((inputs - reference) * grad, self.p.reduce)
