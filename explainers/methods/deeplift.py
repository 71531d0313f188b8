"""DeepLIFT with the rescale rule (Shrikumar et al. 2017)."""

from __future__ import annotations

import functools
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
    """y = f(x) for the inputs; backward: the rescale multiplier (f(x) - f(r)) / (x - r)
    against the reference's input ``r`` at this call, or the plain derivative where
    ``|x - r|`` is below 1e-10."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, ref: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.fn = fn
        ctx.save_for_backward(x, ref)
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        x, ref = ctx.saved_tensors
        delta_in = x - ref
        small = delta_in.abs() < EPS
        if ctx.fn is F.relu:  # closed form: no re-run of the function
            plain = (x > 0).to(x.dtype)
            delta_out = x.clamp_min(0) - ref.clamp_min(0)
        else:
            with torch.enable_grad():
                xx = x.detach().requires_grad_(True)
                y = ctx.fn(xx)
                (plain,) = torch.autograd.grad(y, xx, torch.ones_like(y))
            delta_out = y.detach() - ctx.fn(ref)
        ratio = delta_out.div_(delta_in.masked_fill(small, 1.0))
        return grad * torch.where(small, plain, ratio), None, None


class _MaxPoolRescale(torch.autograd.Function):
    """Max-pool of the inputs with Captum's DeepLIFT max-pool multiplier against the
    reference's pool input, output and argmax at this call."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, ref: tuple[Tensor, Tensor, Tensor], pool: nn.MaxPool2d,
                overlap: str) -> Tensor:
        out, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                pool.ceil_mode, return_indices=True)
        ctx.pool, ctx.overlap, ctx.ref = pool, overlap, ref
        ctx.save_for_backward(x, out, idx)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        x, out, idx = ctx.saved_tensors
        x_ref, o_ref, i_ref = (t.expand(len(x), *t.shape[1:]) for t in ctx.ref)
        top = torch.max(out, o_ref)

        def unpool(values: Tensor, indices: Tensor, overlap: str = ctx.overlap) -> Tensor:
            flat = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], dtype=x.dtype, device=x.device)
            if overlap == "accumulate":  # every window that picked a position contributes
                flat.scatter_add_(2, indices.flatten(2), values.flatten(2))
                return flat.view_as(x)
            # Captum's max_unpool2d: one window's value per position, the last window in
            # raster order (a sequential unpool's; the threaded one races, so we pick it
            # explicitly and stay deterministic)
            order = torch.arange(values[0, 0].numel(), device=x.device).expand_as(values.flatten(2))
            last = torch.full(flat.shape, -1, dtype=torch.int64, device=x.device)
            last.scatter_reduce_(2, indices.flatten(2), order, "amax")
            picked = values.flatten(2).gather(2, last.clamp_min(0))
            return picked.masked_fill_(last < 0, 0).view_as(x)

        plain = unpool(grad, idx, "accumulate")  # the max-pool's own gradient
        spread = unpool(grad * (top - o_ref), idx) + unpool(grad * (out - top), i_ref)
        delta_in = x - x_ref
        small = delta_in.abs() < EPS
        return torch.where(small, plain, spread / delta_in.masked_fill(small, 1.0)), None, None, None


@contextmanager
def deeplift_hooks(model: nn.Module, reference: Tensor, overlap: str = "accumulate") -> Iterator[None]:
    """Route every non-linearity and max-pool module through the rescale multipliers.

    First one forward pass of the (single, constant) ``reference`` records, call by call,
    the input of every non-linearity and the input, output and argmax of every max-pool;
    inside the block each such module's forward is replaced (an instance attribute) by the
    rescale function against the recorded reference values of the same call. So the
    reference costs one forward pass per batch instead of doubling the batch, and modules
    called several times per forward pass (torchvision ResNets reuse one ReLU per block,
    where Captum's module hooks fail) are handled.
    """
    modules = [m for m in model.modules()
               if isinstance(m, (*NONLINEAR, nn.MaxPool2d)) and "forward" not in m.__dict__]
    records: dict[nn.Module, list[Any]] = {m: [] for m in modules}

    def record(m: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        if isinstance(m, nn.MaxPool2d):
            _, idx = F.max_pool2d(inp[0], m.kernel_size, m.stride, m.padding, m.dilation,
                                  m.ceil_mode, return_indices=True)
            records[m].append((inp[0].clone(), out.clone(), idx))
        else:
            records[m].append(inp[0].clone())

    handles = [m.register_forward_pre_hook(lambda m, inp: records[m].append(inp[0].clone()))
               if isinstance(m, NONLINEAR) else m.register_forward_hook(record) for m in modules]
    try:
        with torch.no_grad():
            model(reference)
    finally:
        for h in handles:
            h.remove()
    calls = {m: iter(r) for m, r in records.items()}
    inplace = [m for m in modules if getattr(m, "inplace", False)]

    def nonlinear(x: Tensor, m: nn.Module, fn: Callable[[Tensor], Tensor]) -> Tensor:
        return _Rescale.apply(x, next(calls[m]), fn)

    def pool(x: Tensor, m: nn.MaxPool2d) -> Tensor:
        return _MaxPoolRescale.apply(x, next(calls[m]), m, overlap)

    try:
        for m in inplace:
            m.inplace = False  # type: ignore[union-attr]
        for m in modules:
            if isinstance(m, nn.MaxPool2d):
                m.forward = functools.partial(pool, m=m)  # type: ignore[method-assign]
            else:
                fn = F.relu if isinstance(m, nn.ReLU) else functools.partial(type(m).forward, m)
                m.forward = functools.partial(nonlinear, m=m, fn=fn)  # type: ignore[method-assign]
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)
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

    The reference is a constant ``baseline`` in model-input space (0 is the mean colour),
    the same for every image: it goes through the model once per batch, and its activations
    at every non-linearity and max-pool are broadcast against the inputs' (Captum stacks
    inputs and references into a batch twice the size). Each ReLU/ELU/LeakyReLU/Sigmoid/Tanh
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
        return {"forward": "1 + 1 per batch (the reference)", "backward": 1}

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        reference = torch.full_like(inputs[:1], self.p.baseline)
        with deeplift_hooks(self.model, reference, self.p.maxpool_overlap), torch.enable_grad():
            for p in self.model.parameters():
                p.requires_grad_(False)
            x = inputs.detach().clone().requires_grad_(True)
            scores = target_scores(self.model(x), targets, self.p.score)
            (grad,) = torch.autograd.grad(scores.sum(), x)
        return reduce_channels((inputs - reference) * grad, self.p.reduce)
