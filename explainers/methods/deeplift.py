"""DeepLIFT with the rescale rule (Shrikumar et al. 2017)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from attriflow.explainers._functional import Call, intercept, scan
from attriflow.explainers._gradients import Reduce, reduce_channels
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers.base import Explainer, ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.registry import register

EPS = 1e-10
#: kinds of :mod:`explainers._functional` that DeepLIFT's rescale rule handles
RESCALED = {"relu", "relu6", "activation"}
#: kinds it has no rule for: summation to delta would silently fail there
UNRULED = {"norm", "softmax", "product", "other"}


class _Rescale(torch.autograd.Function):
    """y = f(x) for the inputs; backward: the rescale multiplier (f(x) - f(r)) / (x - r)
    against the reference's input ``r`` at this call, or the plain derivative where
    ``|x - r|`` is below 1e-10. The multiplier is computed in float32 at least, so half
    precision inputs do not round the guard to zero (``1e-10`` is 0 in float16)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, ref: Tensor, fn: Callable[[Tensor], Tensor], relu: bool) -> Tensor:
        ctx.fn, ctx.relu = fn, relu
        ctx.save_for_backward(x, ref)
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        x, ref = ctx.saved_tensors
        wide = torch.promote_types(x.dtype, torch.float32)
        x, ref = x.to(wide), ref.to(wide)
        delta_in = x - ref
        small = delta_in.abs() < EPS
        if ctx.relu:  # closed form: no re-run of the function
            plain = (x > 0).to(x.dtype)
            delta_out = x.clamp_min(0) - ref.clamp_min(0)
        else:
            with torch.enable_grad():
                xx = x.detach().requires_grad_(True)
                y = ctx.fn(xx)
                (plain,) = torch.autograd.grad(y, xx, torch.ones_like(y))
            delta_out = y.detach() - ctx.fn(ref)
        ratio = delta_out.div_(delta_in.masked_fill(small, 1.0))
        return (grad * torch.where(small, plain, ratio).to(grad.dtype)), None, None, None


_POOL_ARGS = inspect.signature(F.max_pool2d_with_indices)


def _wants_indices(call: Call) -> bool:
    bound = _POOL_ARGS.bind(*call.args, **call.kwargs)
    return call.func is F.max_pool2d_with_indices or bool(bound.arguments.get("return_indices"))


def _pool_params(call: Call) -> dict[str, Any]:
    bound = _POOL_ARGS.bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop("input")
    params.pop("return_indices", None)
    if params.get("stride") in (None, []):
        params["stride"] = params["kernel_size"]
    return params


class _MaxPoolRescale(torch.autograd.Function):
    """Max-pool of the inputs with Captum's DeepLIFT max-pool multiplier against the
    reference's pool input, output and argmax at this call."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, ref: tuple[Tensor, Tensor, Tensor], params: dict[str, Any],
                overlap: str) -> Tensor:
        out, idx = F.max_pool2d_with_indices(x, **params)
        ctx.overlap, ctx.ref = overlap, ref
        ctx.save_for_backward(x, out, idx)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        x, out, idx = ctx.saved_tensors
        x_ref, o_ref, i_ref = (t.expand(len(x), *t.shape[1:]) for t in ctx.ref)
        top = torch.max(out, o_ref)

        def unpool(values: Tensor, indices: Tensor, overlap: str = ctx.overlap) -> Tensor:
            flat = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], dtype=values.dtype,
                               device=x.device)
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

        wide = torch.promote_types(x.dtype, torch.float32)
        g = grad.to(wide)
        plain = unpool(g, idx, "accumulate")  # the max-pool's own gradient
        spread = unpool(g * (top - o_ref).to(wide), idx) + unpool(g * (out - top).to(wide), i_ref)
        delta_in = x.to(wide) - x_ref.to(wide)
        small = delta_in.abs() < EPS
        mult = torch.where(small, plain, spread / delta_in.masked_fill(small, 1.0))
        return mult.to(grad.dtype), None, None, None


def refuse_unruled(name: str, model: nn.Module, example: Tensor) -> None:
    """Raise when ``model`` applies operations DeepLIFT's rescale rule does not cover.

    Raises
    ------
    UnsupportedModelError
        For normalisations computed from the activations (LayerNorm, GroupNorm), softmax,
        products of two activations (squeeze-excitation gates, attention), other
        non-linear functions of activations, and max-pools other than 2-D; the message
        names the functions and modules.
    """
    found = scan(model, example)
    bad = found.kinds() & UNRULED
    pools = {f for f in found.seen.get("max_pool", {}) if f not in ("max_pool2d", "max_pool2d_with_indices")}
    if bad or pools:
        what = found.describe(bad)
        if pools:
            what = "; ".join(filter(None, [what, ", ".join(sorted(pools)) + " (max_pool)"]))
        raise UnsupportedModelError(
            f"{name}: the rescale rule covers element-wise activations and 2-D max-pools, "
            f"not {what}; summation to delta would not hold. Use integrated_gradients for this model")


@contextmanager
def deeplift_hooks(model: nn.Module, reference: Tensor, overlap: str = "accumulate") -> Iterator[None]:
    """Route every element-wise non-linearity and max-pool through the rescale multipliers.

    Non-linearities are seen wherever they are applied (``nn.ReLU`` modules, ``F.relu`` in
    a ``forward``, in place or not, SiLU, GELU, sigmoid, ...) through
    :class:`explainers._functional.Intercept`. First one forward pass of the (single,
    constant) ``reference`` records, call by call, the input of every non-linearity and
    the input, output and argmax of every max-pool; inside the block the k-th such call
    of each forward pass runs the rescale function against the k-th recorded reference
    call. So the reference costs one forward pass per batch instead of doubling the
    batch, and functions called several times per forward pass are handled.

    Raises
    ------
    RuntimeError
        If a forward pass inside the block makes other calls than the reference's (data-
        dependent control flow).
    """
    records: list[Any] = []

    def record(call: Call) -> Any:
        if call.kind == "max_pool":
            params = _pool_params(call)
            out, idx = F.max_pool2d_with_indices(call.input, **params)
            records.append((call.input.clone(), out, idx))
            return NotImplemented
        records.append(call.input.clone())  # before an in-place call changes it
        return NotImplemented

    kinds = RESCALED | {"max_pool"}
    # the reference pass tracks gradients (of the input only), so calls are classified as in
    # the explained pass (``clamp(min=0)`` of an activation is a ReLU only there)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad(), intercept(record, kinds):
            model(reference.detach().clone().requires_grad_(True))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    records = [tuple(t.detach() for t in r) if isinstance(r, tuple) else r.detach() for r in records]
    position = [0]

    def rescale(call: Call) -> Any:
        k = position[0] % max(len(records), 1)
        if not records:
            raise RuntimeError("deeplift: the forward pass makes other calls than the reference's")
        position[0] += 1
        ref = records[k]
        x = call.input
        expected = ref[0] if isinstance(ref, tuple) else ref
        if (call.kind == "max_pool") != isinstance(ref, tuple) or expected.shape[1:] != x.shape[1:]:
            raise RuntimeError("deeplift: the forward pass makes other calls than the reference's "
                               "(data-dependent control flow); DeepLIFT needs one graph for both")
        if call.kind == "max_pool":
            params = _pool_params(call)
            out = _MaxPoolRescale.apply(x, ref, params, overlap)
            if _wants_indices(call):  # the model unpacks (output, indices)
                return out, F.max_pool2d_with_indices(x.detach(), **params)[1]
            return out
        return _Rescale.apply(x, ref, call.unary(), call.kind == "relu")

    with intercept(rescale, kinds):
        yield


def multipliers(model: nn.Module, inputs: Tensor, targets: Tensor, reference: Tensor, score: ScoreKind,
                overlap: str = "accumulate") -> Tensor:
    """DeepLIFT's rescale-rule multipliers of each image's target score with respect to its
    input against ``reference`` ((1, C, H, W) for all images, or (N, C, H, W), one per
    image), shape (N, C, H, W): the map is ``(inputs - reference) * multipliers``."""
    with deeplift_hooks(model, reference, overlap), torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(False)  # restored by Explainer.attribute
        x = inputs.detach().clone().requires_grad_(True)
        scores = target_scores(model(x), targets, score)
        (grad,) = torch.autograd.grad(scores.sum(), x)
    return grad


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
    inputs and references into a batch twice the size). Every element-wise non-linearity
    (ReLU, ReLU6, SiLU, GELU, Hardswish, ELU, LeakyReLU, sigmoid, tanh, ...), whether a
    module or a functional call in ``forward``, multiplies the gradient by
    ``delta out / delta in`` (Captum sees modules only and silently returns gradient x
    input for functional ones), and 2-D max-pools use Captum's
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

    Raises
    ------
    UnsupportedModelError
        For models with operations the rescale rule does not cover (LayerNorm / GroupNorm,
        softmax, products of activations such as squeeze-excitation gates, other
        non-linear functions, non-2-D max-pools), naming them and their modules.

    References
    ----------
    A. Shrikumar, P. Greenside, A. Kundaje, "Learning Important Features Through
    Propagating Activation Differences", ICML 2017.
    """

    spec = ExplainerSpec(
        name="deeplift",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.RELEVANCE,
        summary="reference-difference contributions by the rescale rule",
        references=("shrikumar2017",),
    )
    Params = DeepLIFTParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": "1 + 1 per batch (the reference)", "backward": 1}

    def refuse(self, example: Tensor) -> None:  # noqa: D102
        refuse_unruled(self.spec.name, self.model, example)

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        reference = torch.full_like(inputs[:1], self.p.baseline)
        grad = multipliers(self.model, inputs, targets, reference, self.p.score, self.p.maxpool_overlap)
        return reduce_channels((inputs - reference) * grad, self.p.reduce)
