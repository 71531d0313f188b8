"""Excitation Backprop (Zhang et al., ECCV 2016 / IJCV 2018), as TorchRay computes it.

Excitation Backprop (EB) passes a "winning probability" top-down: a Conv/Linear layer
``z_i = sum_j w_ij x_j`` hands the signal ``p_i`` of its output ``i`` to its inputs in
proportion to their excitatory contributions,

    p'_j = x_j * sum_i w+_ij * p_i / (sum_k w+_ik x_k + 1e-20),     w+ = max(w, 0),

(biases ignored), which conserves ``sum p`` where every input is non-negative (behind a
ReLU). The signal starts as the one-hot of the target on the logits (not a softmax), and
the map is the signal at the output of a layer summed over channels, resized bilinearly
(``align_corners=False``) to the input.

The whole forward pass is watched by a torch function mode (as :mod:`explainers._functional`
does for LRP), so functional calls are seen as module calls are, and every computation gets
TorchRay's rule (``torchray.attribution.excitation_backprop.ExcitationBackpropContext``,
which patches ``torch.nn.functional``) or a refusal:

``F.conv1d/2d/3d``, ``F.linear``
    the rule above (TorchRay's ``_patch_conv``; the backward recomputes the layer with ``w+``
    and no bias).
average pools (``F.avg_pool*d``, ``F.adaptive_avg_pool*d``)
    the same rule with the pool as the layer (TorchRay's ``_patch_pool``); also ``mean`` and
    ``sum`` reductions (a global pool written ``x.mean((2, 3))``), which TorchRay does not
    patch (it passes their plain gradient, ``p / n`` to every input: not EB).
``F.batch_norm`` (eval mode)
    passes the signal through unchanged (TorchRay's ``_patch_norm``).
ReLU, max pools, concatenation, reshapes, dropout, padding
    the ordinary gradient (TorchRay does not patch them): ReLU masks, max pools route the
    signal to the winner, concatenation splits it by position.
a sum of two input-dependent tensors (residual connections)
    split in proportion to the summands, ``p_a = a / (a + b) * p`` (0 where ``a + b = 0``):
    TorchRay's ``EltwiseSum``, which TorchRay applies to torchvision ResNets only after
    ``update_resnet(model)``; its plain ``+`` would copy the whole signal to both branches
    and double it at every block (not EB: no conservation). Here every addition of two
    input-dependent tensors takes the rule (ResNet, ResNeXt, RegNet alike). The summands
    of a ResNet block are BatchNorm outputs, signed, so a share can be negative or exceed
    1 (the sum is still conserved): the map can have negative values, as TorchRay's.
products with a constant (a number, a parameter or buffer: ``FrozenBatchNorm2d``'s
    ``x * scale + shift``, layer scales) and divisions by one
    a diagonal linear layer: with every factor positive its ``w+`` share is 1 and the
    signal passes unchanged (as through a BatchNorm); a factor <= 0 is refused (its
    ``w+`` is 0: the signal would vanish there), as is a negation, except inside a
    ``FrozenBatchNorm2d`` (torchvision's detection backbones), which takes BatchNorm's rule.
refused (:class:`explainers.base.UnsupportedModelError`, naming the function and module)
    a BatchNorm that normalises with batch statistics (``track_running_stats=False`` or
    training mode): the shares of one image would depend on the others in its batch;
    every other non-linearity: SiLU, GELU, Hardswish, sigmoid / tanh and other
    activations, ReLU6 / hardtanh (clipping), layer / group / instance norm, softmax,
    products of two input-dependent tensors (squeeze-excitation gates, attention),
    subtractions, and linear maps EB defines no rule for (transposed convolutions, matrix
    products, interpolation); and, found during the
    backward pass, a Conv/Linear/average-pool layer between the map's layer and the logits
    that receives a negative input: EB assumes non-negative inputs to every such layer
    (ReLU networks), which fails at linear bottlenecks (MobileNetV2, MNASNet, ShuffleNet)
    and at the first convolution of a normalised (signed) image when ``layer="input"``.

The contrastive variant is in :mod:`explainers.methods.contrastive_excitation_backprop`.

References
----------
J. Zhang, S. A. Bargal, Z. Lin, J. Brandt, X. Shen, S. Sclaroff, "Top-down Neural Attention
by Excitation Backprop", ECCV 2016 / IJCV 2018. TorchRay (Fong, Patrick, Vedaldi),
``torchray.attribution.excitation_backprop``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from attriflow.explainers._functional import _depends, _func_name, classify
from attriflow.explainers._hooks import capture_outputs, default_cam_layer, get_layer, spatial_layers
from attriflow.explainers._numerics import working_dtype
from attriflow.explainers.base import Explainer, ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.registry import register

#: ``layer`` value that reads the signal at the model's input
INPUT = "input"
#: TorchRay's denominator guard (``output_ebp + 1e-20``)
GUARD = 1e-20

_LINEAR = {F.conv1d, F.conv2d, F.conv3d, F.linear}
_AVG_POOL = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
             F.adaptive_avg_pool3d,
             torch.mean, Tensor.mean, torch.sum, Tensor.sum}  # ``x.mean((2, 3))``: a global average pool
_BATCH_NORM = {F.batch_norm, torch.batch_norm}
_ADD = {torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__iadd__, Tensor.__radd__, operator.add}
_IN_PLACE_ADD = {Tensor.add_, Tensor.__iadd__}
#: products and quotients with a constant operand: diagonal linear layers (see :meth:`ExcitationPass._scale`)
_SCALE = {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, operator.mul,
          torch.div, Tensor.div, Tensor.__truediv__, operator.truediv}
_IN_PLACE_SCALE = {Tensor.mul_, Tensor.__imul__, Tensor.div_, Tensor.__itruediv__}
_NEGATE = {torch.neg, Tensor.neg, Tensor.__neg__, torch.negative, Tensor.negative, operator.neg}
_SUBTRACT = {torch.sub, Tensor.sub, Tensor.__sub__, operator.sub, torch.rsub, Tensor.__rsub__}


def _subtracts_an_activation(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``c - x`` with a constant ``c`` and an input-dependent ``x`` (``rsub``: ``x`` first)."""
    first = args[0] if args else kwargs.get("input")
    second = args[1] if len(args) > 1 else kwargs.get("other")
    if func in (torch.rsub, Tensor.__rsub__):
        first, second = second, first
    return _depends(second) and not _depends(first)
#: linear in the input, but weighted maps EB has no rule for (TorchRay passes the plain gradient)
_NO_RULE = {torch.nansum, F.conv_transpose1d,
            F.conv_transpose2d, F.conv_transpose3d, F.interpolate, F.upsample, F.bilinear, torch.matmul,
            Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.mm, torch.bmm, torch.einsum,
            torch.addmm, torch.baddbmm, torch.tensordot, F.embedding, F.scaled_dot_product_attention}


class _Excite(torch.autograd.Function):
    """A linear layer (Conv/Linear/average pool) whose forward is exact and whose backward is
    EB's: ``x * sum_k sign_k * vjp(f_k, p / (f_k(x) + 1e-20))`` over its parts ``f_k`` (``w+``
    without bias; the contrastive classifier adds ``-((-w)+)``), in :func:`working_dtype`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, exact: Callable[[Tensor], Tensor],
                parts: list[tuple[float, Callable[[Tensor], Tensor]]],
                note: Callable[[Tensor], None]) -> Tensor:
        ctx.parts, ctx.note = parts, note
        ctx.save_for_backward(x)
        return exact(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        (x,) = ctx.saved_tensors
        wd = working_dtype(x.dtype)
        xw = x.detach().to(wd)
        ctx.note(xw)
        gw = grad.to(wd)
        total: Tensor | None = None
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            for sign, part in ctx.parts:
                xi = xw.detach().requires_grad_(True)
                z = part(xi)
                # TorchRay's p / (z + 1e-20); where z = 0 (x >= 0, w+ >= 0: every term
                # w+_ij x_j is 0) its share is 0 * huge = 0, taken as 0 directly (no overflow)
                ratio = torch.where(z > 0, gw / (z + GUARD), torch.zeros_like(z))
                (g,) = torch.autograd.grad(z, xi, ratio)
                term = xw * g if sign == 1.0 else xw * g * sign
                total = term if total is None else total + term
        assert total is not None
        return total.to(x.dtype), None, None, None


class _PassThrough(torch.autograd.Function):
    """Exact forward, identity backward (TorchRay's BatchNorm rule)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, exact: Callable[[Tensor], Tensor]) -> Tensor:
        return exact(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _Share(torch.autograd.Function):
    """``a + b`` whose backward splits the signal in proportion to the summands
    (TorchRay's ``EltwiseSum``: ``a / (a + b) * p``; 0 where the sum is 0)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        out = a + b
        with torch.no_grad():
            wd = working_dtype(out.dtype)
            ow = out.to(wd)
            safe = torch.where(ow != 0, ow, torch.ones_like(ow))
            zero = ow == 0
            ctx.save_for_backward(torch.where(zero, 0.0, a.to(wd) / safe),
                                  torch.where(zero, 0.0, b.to(wd) / safe))
        ctx.shapes = (a.shape, b.shape)
        ctx.dtypes = (a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        sa, sb = ctx.saved_tensors
        gw = grad.to(sa.dtype)
        ga = (gw * sa).sum_to_size(ctx.shapes[0]).to(ctx.dtypes[0])
        gb = (gw * sb).sum_to_size(ctx.shapes[1]).to(ctx.dtypes[1])
        return ga, gb


class ExcitationPass(TorchFunctionMode):
    """One EB forward pass of ``model``: every torch function call gets its rule (module
    docstring) or is refused; ``record_only`` collects the refusals of a scan instead.

    Parameters
    ----------
    model : nn.Module
        The network (hooks on its modules name the innermost module making each call).
    explainer : str
        Name for the messages.
    classifier : nn.Module or None
        The contrastive variant's classifier layer: its backward subtracts the signal of
        its negated weights (``-((-w)+)`` part).
    record_only : bool
        Scan: record refusals (:attr:`refused`) instead of raising, apply no rule.
    """

    def __init__(self, model: nn.Module, explainer: str, classifier: nn.Module | None = None,
                 record_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.explainer = explainer
        self.classifier = classifier
        self.record_only = record_only
        self.names = {m: n or "(model)" for n, m in model.named_modules()}
        self.by_name = {n: m for m, n in self.names.items()}
        self.stack: list[str] = []
        self.refused: dict[str, list[str]] = {}  # what -> modules
        self.negative: dict[str, float] = {}  # module -> min input, found in the backward pass
        self.classifier_used = False
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ context
    def __enter__(self) -> ExcitationPass:
        def enter(_m: nn.Module, _i: object, n: str) -> None:
            self.stack.append(n)

        def leave(_m: nn.Module, _i: object, _o: object) -> None:
            if self.stack:
                self.stack.pop()

        for m, n in self.names.items():
            self._handles.append(m.register_forward_pre_hook(functools.partial(enter, n=n)))
            self._handles.append(m.register_forward_hook(leave))
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.stack.clear()

    @property
    def where(self) -> str:
        return self.stack[-1] if self.stack else "(model)"

    def _refuse(self, what: str) -> None:
        self.refused.setdefault(what, []).append(self.where)
        if not self.record_only:
            raise UnsupportedModelError(
                f"{self.explainer}: no Excitation Backprop rule for {what} in {self.where}")

    def describe_refused(self) -> str:
        parts = []
        for what, where in sorted(self.refused.items()):
            uniq = list(dict.fromkeys(where))
            shown = ", ".join(uniq[:3]) + (f", ... ({len(where)} calls)" if len(uniq) > 3 else "")
            parts.append(f"{what} in {shown}")
        return "; ".join(parts)

    def _note(self, where: str, classifier: bool = False) -> Callable[[Tensor], None]:
        def note(x: Tensor) -> None:
            if classifier:
                self.classifier_used = True
            low = float(x.amin()) if x.numel() else 0.0
            if low < 0:
                self.negative[where] = min(low, self.negative.get(where, 0.0))
        return note

    def check_negative(self) -> None:
        """Raise when a layer the signal went through received a negative input."""
        if not self.negative:
            return
        shown = ", ".join(f"{n} (min input {v:.3g})" for n, v in list(self.negative.items())[:4])
        raise UnsupportedModelError(
            f"{self.explainer}: {shown} receive{'s' if len(self.negative) == 1 else ''} negative inputs. "
            "Excitation Backprop assumes non-negative inputs to every Conv/Linear/average-pool layer "
            "between the map's layer and the logits (a ReLU before each): its shares "
            "w+ x / sum(w+ x) are no probabilities otherwise. Linear bottlenecks (MobileNetV2, MNASNet, "
            "ShuffleNet) break it, as does a normalised (signed) image at layer='input'; read the map "
            "at a deeper layer (params.layer) or use an LRP rule that handles signed inputs (lrp_zplus)")

    # ------------------------------------------------------------------ dispatch
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in _LINEAR:
            return self._linear(func, args, kwargs)
        if func in _AVG_POOL:
            return self._pool(func, args, kwargs)
        if func in _BATCH_NORM:
            if not args or not _depends(args[0]):
                return func(*args, **kwargs)
            running = args[1] if len(args) > 1 else kwargs.get("running_mean")
            training = args[5] if len(args) > 5 else kwargs.get("training", False)
            if running is None or training:
                self._refuse("batch_norm with batch statistics (track_running_stats=False or training "
                             "mode: each image's shares would depend on the rest of its batch)")
            if self.record_only:
                return func(*args, **kwargs)
            rest = args[1:]
            return _PassThrough.apply(args[0], lambda t: func(t, *rest, **kwargs))
        tensors = [*args, *kwargs.values()]
        if func in _NO_RULE:
            if any(_depends(t) for t in tensors):
                self._refuse(f"{_func_name(func)} (a weighted linear map EB defines no rule for)")
            return func(*args, **kwargs)
        if func in _NEGATE and any(_depends(t) for t in tensors):
            self._refuse(f"{_func_name(func)} (a negation: its w+ is 0)")
        if func in _SUBTRACT and _subtracts_an_activation(func, args, kwargs):
            self._refuse(f"{_func_name(func)} (an activation subtracted from a constant: a negation, "
                         "w+ is 0)")
        kind = classify(func, args, kwargs)
        if kind is None and (func in _SCALE or func in _IN_PLACE_SCALE):
            return self._scale(func, args, kwargs)
        if kind is None or kind in ("relu", "max_pool"):
            return func(*args, **kwargs)
        if kind == "sum" and func in _ADD and kwargs.get("alpha", 1) == 1 and len(args) >= 1:
            if self.record_only:
                return func(*args, **kwargs)
            a = args[0]
            b = args[1] if len(args) > 1 else kwargs.get("other")
            if func is Tensor.__radd__:
                a, b = b, a
            out = _Share.apply(a, b)
            if func in _IN_PLACE_ADD:
                return args[0].copy_(out)
            return out
        self._refuse(f"{_func_name(func)} ({kind})")
        return func(*args, **kwargs)

    def _scale(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``x * c`` or ``x / c`` with a constant ``c``: a diagonal linear layer whose EB share
        ``c+ x / (c+ x)`` is 1 where ``c > 0``; the signal passes unchanged. Any factor <= 0
        (``w+ = 0``: the signal would vanish) and an in-place scale are refused."""
        operands = [*args, *kwargs.values()]
        live = [i for i, t in enumerate(args) if _depends(t)]
        if not live:
            return func(*args, **kwargs)
        if len(live) != 1 or len(operands) != 2:
            self._refuse(f"{_func_name(func)} (a product EB defines no rule for)")
            return func(*args, **kwargs)
        at = live[0]
        if func in (torch.div, Tensor.div, Tensor.__truediv__, operator.truediv) and at != 0:
            self._refuse(f"{_func_name(func)} (a constant divided by an activation)")
            return func(*args, **kwargs)
        factor = operands[1 - at] if at == 0 else operands[0]
        positive = bool((torch.as_tensor(factor).detach() > 0).all()) if not isinstance(factor, bool) else False
        frozen_bn = "FrozenBatchNorm" in type(self.by_name.get(self.where)).__name__  # BatchNorm's rule
        if not positive and not frozen_bn:
            self._refuse(f"{_func_name(func)} by a factor <= 0 (its w+ is 0: the signal would vanish)")
        if func in _IN_PLACE_SCALE:
            self._refuse(f"{_func_name(func)} (an in-place scale)")
        if self.record_only:
            return func(*args, **kwargs)
        rest = list(args)
        return _PassThrough.apply(args[at], lambda t: func(*rest[:at], t, *rest[at + 1:], **kwargs))

    def _linear(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs.pop("input")
        weight = args[1] if len(args) > 1 else kwargs.pop("weight")
        bias = args[2] if len(args) > 2 else kwargs.pop("bias", None)
        rest = args[3:]
        if _depends(weight) or _depends(bias):
            self._refuse(f"{_func_name(func)} with input-dependent weights")
        if self.record_only or not _depends(x):
            return func(x, weight, bias, *rest, **kwargs)
        where = self.where
        module = self.by_name.get(where)
        wp = weight.detach().clamp(min=0)
        parts: list[tuple[float, Callable[[Tensor], Tensor]]] = [
            (1.0, lambda t: func(t, wp.to(t.dtype), None, *rest, **kwargs))]
        is_classifier = self.classifier is not None and module is self.classifier
        if is_classifier:
            wn = (-weight.detach()).clamp(min=0)  # TorchRay: classifier weights negated
            parts.append((-1.0, lambda t: func(t, wn.to(t.dtype), None, *rest, **kwargs)))
        return _Excite.apply(x, lambda t: func(t, weight, bias, *rest, **kwargs), parts,
                             self._note(where, is_classifier))

    def _pool(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs.pop("input")
        rest = args[1:]
        if self.record_only or not _depends(x):
            return func(x, *rest, **kwargs)
        pool = functools.partial(_call, func, rest, kwargs)
        return _Excite.apply(x, pool, [(1.0, pool)], self._note(self.where))


def _call(func: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], t: Tensor) -> Tensor:
    return func(t, *rest, **kwargs)


def scan_refusals(model: nn.Module, example: Tensor, explainer: str) -> None:
    """Refuse a model with a computation EB has no rule for (one forward pass of one image).

    Raises
    ------
    UnsupportedModelError
        Naming each function and the modules that call it.
    """
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        x = example[:1].detach().clone().requires_grad_(True)
        with torch.enable_grad(), ExcitationPass(model, explainer, record_only=True) as scan:
            model(x)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    if scan.refused:
        raise UnsupportedModelError(
            f"{explainer}: no Excitation Backprop rule for {scan.describe_refused()}. EB has rules for "
            "Conv/Linear, average pools, eval-mode BatchNorm, ReLU, max pools, additions and "
            "concatenation (ReLU networks); explain this model with a gradient, LRP or CAM method instead")


def excitation_signal(model: nn.Module, inputs: Tensor, targets: Tensor, layer: str, explainer: str,
                      classifier: nn.Module | None = None) -> Tensor:
    """EB's signal at the output of ``layer`` (or the input) summed over channels.

    Parameters
    ----------
    model : nn.Module
        A network EB has rules for (check with :func:`scan_refusals`).
    inputs : Tensor, shape (N, C, H, W)
        Model inputs.
    targets : Tensor, shape (N,)
        int64 classes; the signal starts as their one-hot on the logits.
    layer : str
        Module name, or ``"input"``.
    explainer : str
        Name for the messages.
    classifier : nn.Module or None
        For the contrastive variant: the layer whose negated-weight signal is subtracted.

    Returns
    -------
    Tensor, shape (N, h, w)
        In :func:`working_dtype` of the inputs, not clamped, at the layer's resolution.

    Raises
    ------
    UnsupportedModelError
        When a layer the signal passes receives a negative input, when the layer's output is
        not (N, C, h, w), or when ``classifier`` is not between the layer and the logits.
    """
    for p in model.parameters():
        p.requires_grad_(False)  # restored by attribute()
    names = [] if layer == INPUT else [layer]
    with torch.enable_grad(), capture_outputs(model, names) as acts:
        x = inputs.detach().clone().requires_grad_(True)
        with ExcitationPass(model, explainer, classifier) as eb:
            logits = model(x)
        at = x if layer == INPUT else acts[layer]
        if at.ndim != 4:
            raise UnsupportedModelError(
                f"{explainer}: params.layer {layer!r} outputs shape {tuple(at.shape)}, no (N, C, h, w) "
                "feature maps; use a convolutional layer or 'input'")
        score = logits.gather(1, targets[:, None]).sum()
        (grad,) = torch.autograd.grad(score, at, allow_unused=True)
    eb.check_negative()
    if classifier is not None and not eb.classifier_used:
        raise UnsupportedModelError(
            f"{explainer}: params.classifier_layer {eb.names.get(classifier, '?')!r} is not between "
            f"params.layer {layer!r} and the logits; set classifier_layer to the Conv/Linear layer "
            "that computes the logits")
    if grad is None:
        raise UnsupportedModelError(f"{explainer}: the logits do not depend on params.layer {layer!r}")
    return grad.to(working_dtype(grad.dtype)).sum(dim=1)


def default_layer(model: nn.Module, example: Tensor) -> str:
    """The last direct child of ``model`` with a spatial output (``layer4`` for ResNets,
    ``features`` for VGG, DenseNet and SqueezeNet, ``Mixed_6e`` for Inception-v3 at small
    sizes): a cut of the network that every path to the logits crosses, so the map holds
    the whole signal; :func:`explainers._hooks.default_cam_layer` (the last module with a
    spatial output, which can be one branch of a block) when no direct child has one."""
    spatial = [n for n, _ in spatial_layers(model, example[:1])]
    top = [n for n in spatial if "." not in n]
    return top[-1] if top else default_cam_layer(model, example[:1])


def resize(layer_map: Tensor, size: tuple[int, int]) -> Tensor:
    """TorchRay's ``resize_saliency(..., resize=True)``: bilinear, ``align_corners=False``."""
    if tuple(layer_map.shape[-2:]) == tuple(size):
        return layer_map
    return F.interpolate(layer_map[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class ExcitationBackpropParams(BaseModel):
    """Parameters of :class:`ExcitationBackprop`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layer: str | None = None


@register
class ExcitationBackprop(Explainer):
    """Excitation Backprop's marginal winning probability of the target, read at a layer.

    The signal starts as the one-hot of the target logit and is passed down with EB's rule
    (module docstring); the map is the signal at the output of ``layer`` summed over
    channels (not clamped: ResNet's signed summands can give negative values), bilinearly
    resized to the input. Equal to TorchRay's
    ``excitation_backprop(model, x, t, saliency_layer=layer, resize=True)[:, 0]`` (for
    torchvision ResNets: on ``update_resnet(model)``, whose ``EltwiseSum`` rule we give every
    residual addition). The map at the layer sums to 1 per image (probability
    conservation) where no unit that carries signal has ``sum_k w+_ik x_k = 0``.

    Parameters
    ----------
    layer : str or None
        Module whose output the map is read at; ``"input"`` reads the signal at the model
        input (TorchRay's ``saliency_layer=''``; needs non-negative images). None (default):
        the last direct child of the model with a spatial output (:func:`default_layer`:
        ``layer4`` for ResNets, ``features`` for VGG, DenseNet and SqueezeNet), the CAM
        layer of most networks but never one branch of a block (Inception) nor a layer above
        the classifier (SqueezeNet's final ReLU); TorchRay's benchmark likewise reads EB
        at an intermediate layer and resizes.

    Inputs are (N, C, H, W) (float64, float32, 16-bit); maps are (N, H, W). The rule's
    arithmetic runs in float32 for 16-bit tensors.

    Raises
    ------
    UnsupportedModelError
        For a computation EB has no rule for (naming it and its modules); when a layer the
        signal passes receives negative inputs (naming it); for a ``layer`` without an
        (N, C, h, w) output.

    References
    ----------
    J. Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016, Eq. 3-4;
    TorchRay ``torchray.attribution.excitation_backprop.excitation_backprop``.
    """

    spec = ExplainerSpec(
        name="excitation_backprop",
        family=Family.RELEVANCE,
        summary="Excitation Backprop: top-down winning probabilities through excitatory weights",
        references=("zhang2016",),
    )
    Params = ExcitationBackpropParams

    def __init__(self, model: nn.Module, **params: Any) -> None:
        super().__init__(model, **params)
        if self.p.layer not in (None, INPUT):
            get_layer(model, self.p.layer)  # fail early with the list of valid names

    def refuse(self, example: Tensor) -> None:
        """Refuse the functions EB has no rule for (one scanning pass), then run the method on
        one image: the refusals met only on the way back (a layer below the map's that
        receives negative inputs, a map layer without (N, C, h, w) output) come before any
        work too."""
        scan_refusals(self.model, example, self.spec.name)
        self.layer_map(example[:1], torch.zeros(1, dtype=torch.int64, device=example.device))

    def resolve(self, example: Tensor) -> None:  # noqa: D102
        if self.p.layer is None:
            self.resolved["layer"] = default_layer(self.model, example[:1])

    def layer_name(self, example: Tensor) -> str:
        """The configured layer, or the automatically found one."""
        if self.p.layer is not None:
            return str(self.p.layer)
        if "layer" not in self.resolved:
            self.resolve(example)
        return str(self.resolved["layer"])

    def layer_map(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The signal at the layer summed over channels, shape (N, h, w), before resizing."""
        return excitation_signal(self.model, inputs, targets, self.layer_name(inputs), self.spec.name)

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        return resize(self.layer_map(inputs, targets), tuple(inputs.shape[-2:]))
