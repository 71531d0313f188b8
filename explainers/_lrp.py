"""Layer-wise relevance propagation as a modified gradient, with BatchNorm folded on the fly.

Every Conv/Linear layer's forward is replaced (for the call) by one that returns

    carrier = sum_i  c_i * z_i * (z / stab(z_i)).detach()
    out = carrier + (z - carrier).detach()          (value z, gradient of the carrier)

where ``z_i`` are the rule's modified pre-activations (modified weights applied to modified
inputs) and ``c_i`` its coefficients. Back-propagating the target logit then carries
``g = R / a`` for every activation ``a``, and ``x * grad`` at the input is the LRP relevance:
for the layer, ``x_j dz_i/dx_j`` is exactly the rule's contribution of input ``j`` to output
``k``, divided by the stabilised denominator. Element-wise ReLUs (zennit's Pass) and
max-pools (winner takes all) need no hook: they are positively homogeneous, so their
gradient times their input distributes relevance exactly that way. Average pools and the
skip additions of torchvision's ResNet blocks get zennit's Norm rule (a proportional split
with a 1e-6 stabiliser); other functional additions split proportionally without the
stabiliser. Unlike zennit, no layer's forward is run again inside the backward pass: one
forward, one backward.

BatchNorm is folded into the preceding Conv/Linear (found by tracing which module's output
each BatchNorm reads): that layer computes with the folded weights and the BatchNorm
passes its input through, so the model is never modified. The first layer can take the
flat or the z-box rule, which are computed explicitly from the relevance at its output.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explainers._hooks import trace

RuleName = Literal["epsilon", "zplus", "alpha_beta", "flat", "box"]
LINEAR_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Rule:
    """An LRP rule and its constants."""

    name: RuleName
    epsilon: float = 1e-6  # epsilon rule's epsilon; stabiliser of the others
    alpha: float = 2.0
    beta: float = 1.0
    low: float | None = None  # z-box bounds in model-input space; None: per-image min / max
    high: float | None = None


def stabilize(z: Tensor, eps: float) -> Tensor:
    """zennit's stabiliser: add ``eps`` with the sign of each entry (+ for zeros)."""
    e = z.new_tensor(eps)
    return z + torch.where(z >= 0, e, -e)


def _identity(x: Tensor) -> Tensor:
    return x


def _apply(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return module._conv_forward(x, weight, bias)  # type: ignore[operator]


def _zeros_like(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else torch.zeros_like(bias)


def _pos(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


def rule_output(rule: Rule, module: nn.Module, x: Tensor, w: Tensor, b: Tensor | None, z: Tensor) -> Tensor:
    """Output of a hooked layer: value ``z``, gradient carrying ``rule``."""
    if rule.name == "epsilon":
        carrier = z * (z / stabilize(z, rule.epsilon)).detach()
    else:
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        # after a ReLU or a max-pool of ReLUs the input is non-negative: its negative part
        # contributes nothing, and skipping it saves one convolution (forward and backward)
        signed = bool((x.detach() < 0).any())
        xp, xn = (x.clamp(min=0), x.clamp(max=0)) if signed else (x, None)
        zpos = _apply(module, xp, wp, _pos(b))
        if xn is not None:
            zpos = zpos + _apply(module, xn, wn, _zeros_like(b))
        if rule.name == "zplus":
            carrier = zpos * (z / stabilize(zpos, rule.epsilon)).detach()
        elif rule.name == "alpha_beta":
            zneg = _apply(module, xp, wn, _neg(b))
            if xn is not None:
                zneg = zneg + _apply(module, xn, wp, _zeros_like(b))
            carrier = (rule.alpha * zpos * (z / stabilize(zpos, rule.epsilon)).detach()
                       - rule.beta * zneg * (z / stabilize(zneg, rule.epsilon)).detach())
        else:
            raise ValueError(f"rule {rule.name!r} applies to the first layer only")
    # the carrier's value is only close to z (stabilisers); keep the forward pass exact
    return carrier + (z - carrier).detach()


_CONV_INPUT_GRAD = {nn.Conv1d: torch.nn.grad.conv1d_input, nn.Conv2d: torch.nn.grad.conv2d_input,
                    nn.Conv3d: torch.nn.grad.conv3d_input}


def _fusable(module: nn.Module) -> bool:
    """Whether :class:`_RuleLayer` can compute the layer's input gradient directly."""
    if isinstance(module, nn.Linear):
        return True
    return (type(module) in _CONV_INPUT_GRAD and module.padding_mode == "zeros"  # type: ignore[attr-defined]
            and not isinstance(module.padding, str))  # type: ignore[attr-defined]


def _input_grad(module: nn.Module, shape: torch.Size, weight: Tensor, grad: Tensor) -> Tensor:
    """Gradient at the input of ``module`` computed with ``weight``, for output gradient ``grad``."""
    if isinstance(module, nn.Linear):
        return grad @ weight
    m: nn.Conv2d = module  # type: ignore[assignment]
    return _CONV_INPUT_GRAD[type(m)](shape, weight, grad, m.stride, m.padding, m.dilation, m.groups)


class _RuleLayer(torch.autograd.Function):
    """A Conv/Linear layer whose forward is exact and whose backward is the rule's: the
    carrier formulation of the module docstring, with the carrier's gradient computed
    directly (one input-gradient convolution per rule term; no extra elementwise passes)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: nn.Module, rule: Rule, params: Folded) -> Tensor:
        w, b = params.weight, params.bias
        terms: list[tuple[float, Tensor, Tensor | None, Tensor]] = []  # (coeff, weight, mask, scale)
        signed = rule.name != "epsilon" and bool(x.detach().amin() < 0)
        z = _apply(module, x, w, b)
        if rule.name == "epsilon":
            terms.append((1.0, w, None, z / stabilize(z, rule.epsilon)))
        elif rule.name in ("zplus", "alpha_beta"):
            wp, wn = params.positive, params.negative
            xp, xn = (x.clamp(min=0), x.clamp(max=0)) if signed else (x, None)
            mp, mn = (x >= 0, x <= 0) if signed else (None, None)
            zpos = _apply(module, xp, wp, _pos(b))
            if xn is not None:
                zpos = zpos + _apply(module, xn, wn, _zeros_like(b))
            alpha = 1.0 if rule.name == "zplus" else rule.alpha
            if signed:
                cp = z / stabilize(zpos, rule.epsilon)
            else:  # x >= 0 with w+ >= 0 and b+ >= 0: z+ >= 0, so the stabiliser adds +eps
                cp = torch.div(z, zpos.add_(rule.epsilon), out=zpos)
            terms.append((alpha, wp, mp, cp))
            if xn is not None:
                terms.append((alpha, wn, mn, cp))
            if rule.name == "alpha_beta":
                zneg = _apply(module, xp, wn, _neg(b))
                if xn is not None:
                    zneg = zneg + _apply(module, xn, wp, _zeros_like(b))
                cn = z / stabilize(zneg, rule.epsilon)
                terms.append((-rule.beta, wn, mp, cn))
                if xn is not None:
                    terms.append((-rule.beta, wp, mn, cn))
        else:
            raise ValueError(f"rule {rule.name!r} applies to the first layer only")
        ctx.module, ctx.shape, ctx.coeffs = module, x.shape, [t[0] for t in terms]
        ctx.has_mask = [t[2] is not None for t in terms]
        ctx.save_for_backward(*[t[1] for t in terms], *[t[2] for t in terms if t[2] is not None],
                              *[t[3] for t in terms])
        return z

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        k = len(ctx.coeffs)
        saved = ctx.saved_tensors
        weights, rest = saved[:k], saved[k:]
        n_masks = sum(ctx.has_mask)
        masks_iter, scales = iter(rest[:n_masks]), rest[n_masks:]
        total: Tensor | None = None
        for coeff, weight, has_mask, scale in zip(ctx.coeffs, weights, ctx.has_mask, scales):
            g = _input_grad(ctx.module, ctx.shape, weight, grad * scale)
            if has_mask:
                g = g * next(masks_iter)
            if coeff != 1.0:
                g = g * coeff
            total = g if total is None else total + g
        return total, None, None, None


def first_layer_relevance(rule: Rule, module: nn.Module, x: Tensor, w: Tensor, b: Tensor | None,
                          relevance: Tensor) -> Tensor:
    """Relevance at the input of the first layer for the flat or z-box rule (zennit's form)."""
    with torch.enable_grad():
        if rule.name == "flat":
            ones = torch.ones_like(x).requires_grad_(True)
            zf = _apply(module, ones, torch.ones_like(w), _zeros_like(b))
            (g,) = torch.autograd.grad(zf, ones, relevance / stabilize(zf, rule.epsilon))
            return g
        dims = tuple(range(1, x.ndim))
        low = x.amin(dim=dims, keepdim=True) if rule.low is None else torch.full_like(x[:1], rule.low)
        high = x.amax(dim=dims, keepdim=True) if rule.high is None else torch.full_like(x[:1], rule.high)
        xi = x.detach().clone().requires_grad_(True)
        li = low.expand_as(x).clone().requires_grad_(True)
        hi = high.expand_as(x).clone().requires_grad_(True)
        z0 = _apply(module, xi, w, b)
        z1 = _apply(module, li, w.clamp(min=0), _pos(b))
        z2 = _apply(module, hi, w.clamp(max=0), _neg(b))
        scale = relevance / stabilize(z0 - z1 - z2, rule.epsilon)
        g0, g1, g2 = torch.autograd.grad((z0, z1, z2), (xi, li, hi), (scale, scale, scale))
        return xi * g0 - li * g1 - hi * g2


AVGPOOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a fixed ``scale``."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return z.clone()  # a new tensor: an in-place ReLU may follow

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def norm_output(z: Tensor, eps: float) -> Tensor:
    """zennit's Norm rule for parameter-free linear maps (pools, sums): value ``z``,
    gradient scaled by ``z / stab(z)``."""
    with torch.no_grad():
        scale = z / stabilize(z, eps)
    return _ScaleGrad.apply(z, scale)


def _residual_forward(block: nn.Module, eps: float) -> Callable[[Tensor], Tensor]:
    """torchvision BasicBlock / Bottleneck forward whose skip addition uses the Norm rule."""
    def forward(x: Tensor) -> Tensor:
        identity = x
        out = block.relu(block.bn1(block.conv1(x)))
        if hasattr(block, "conv3"):
            out = block.relu(block.bn2(block.conv2(out)))
            out = block.bn3(block.conv3(out))
        else:
            out = block.bn2(block.conv2(out))
        if block.downsample is not None:
            identity = block.downsample(x)
        return block.relu(norm_output(out + identity, eps))
    return forward


def _residual_blocks(model: nn.Module) -> list[nn.Module]:
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is None:  # not imported: the model holds none of its blocks (and importing
        return []       # torchvision here would cost a second and a half on the first call)
    return [m for m in model.modules() if type(m) in (resnet.BasicBlock, resnet.Bottleneck)]


def trace_layers(model: nn.Module, example: Tensor) -> tuple[list[nn.Module], dict[nn.Module, nn.Module]]:
    """Conv/Linear modules in execution order and the BatchNorm that reads each one's output."""
    calls = [c for c in trace(model, example) if isinstance(c.module, LINEAR_TYPES + BN_TYPES)]
    producers = {id(c.output): c.module for c in calls if isinstance(c.module, LINEAR_TYPES)}
    folded = {}
    for c in calls:
        source = producers.get(id(c.input))
        if isinstance(c.module, BN_TYPES) and source is not None and not isinstance(source, nn.Linear):
            folded[source] = c.module
    order = list(dict.fromkeys(c.module for c in calls if isinstance(c.module, LINEAR_TYPES)))
    return order, folded


@dataclass
class Folded:
    """A layer's weight and bias with its BatchNorm folded in, and the weight's positive and
    negative parts (computed when first asked for)."""

    weight: Tensor
    bias: Tensor | None
    _pos: Tensor | None = None
    _neg: Tensor | None = None

    @property
    def positive(self) -> Tensor:
        if self._pos is None:
            self._pos = self.weight.clamp(min=0)
        return self._pos

    @property
    def negative(self) -> Tensor:
        if self._neg is None:
            self._neg = self.weight.clamp(max=0)
        return self._neg

    @staticmethod
    def of(layer: nn.Module, bn: nn.Module | None, cache: dict[int, Folded]) -> Folded:
        """The folded parameters of ``layer``, computed once per ``cache`` (one LRP call:
        a layer called several times per forward pass folds once)."""
        hit = cache.get(id(layer))
        if hit is None:
            with torch.no_grad():
                w, b = folded_params(layer, bn)
            hit = cache[id(layer)] = Folded(w, b)
        return hit


def folded_params(layer: nn.Module, bn: nn.Module | None) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of ``layer`` with ``bn`` (eval statistics) folded in."""
    w, b = layer.weight, layer.bias
    if bn is None:
        return w, b
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # type: ignore[operator]
    shape = (-1,) + (1,) * (w.ndim - 1)
    bias = b if b is not None else torch.zeros_like(bn.running_mean)  # type: ignore[arg-type]
    return w * scale.view(shape), (bias - bn.running_mean) * scale + bn.bias  # type: ignore[operator]


def lrp(model: nn.Module, inputs: Tensor, targets: Tensor, rule_for: Callable[[nn.Module, bool], Rule],
        traced: tuple[list[nn.Module], dict[nn.Module, nn.Module]] | None = None) -> Tensor:
    """LRP relevance of the target logit at the input, shape (N, C, H, W).

    Parameters
    ----------
    model : nn.Module
        A network of Conv/Linear layers, BatchNorms, ReLUs, pools, additions and reshapes.
    inputs : Tensor, shape (N, C, H, W)
        Model inputs.
    targets : Tensor, shape (N,)
        Classes whose logit is decomposed (initial relevance: the logit itself).
    rule_for : callable
        ``(layer, is_first) -> Rule``.
    traced : tuple or None
        :func:`trace_layers` of the model for inputs of this size, when the caller kept it
        (the trace costs one forward pass of one image).

    Returns
    -------
    Tensor, shape (N, C, H, W)
        Relevance per input element.
    """
    layers, folded = traced if traced is not None else trace_layers(model, inputs[:1])
    first = layers[0] if layers else None
    first_rule = rule_for(first, True) if first is not None else None
    explicit_first = first_rule is not None and first_rule.name in ("flat", "box")
    state: dict[str, Tensor] = {}
    cache: dict[int, Folded] = {}  # folded weights, once per layer and call
    handles = []

    def layer_forward(m: nn.Module, x: Tensor) -> Tensor:
        params = Folded.of(m, folded.get(m), cache)
        w, b = params.weight, params.bias
        if not (m is first and explicit_first) and _fusable(m):
            return _RuleLayer.apply(x, m, rule_for(m, m is first), params)
        z = _apply(m, x, w, b)
        if m is first and explicit_first:
            state["x"] = x.detach()
            state["z"] = z.detach().requires_grad_(True)
            return state["z"].clone()  # a non-leaf, so that an in-place ReLU may follow
        return rule_output(rule_for(m, m is first), m, x, w, b, z)

    norm_eps = (first_rule.epsilon if first_rule is not None and first_rule.name != "epsilon" else 1e-6)
    blocks = _residual_blocks(model)
    try:
        # instance attributes shadow the classes' forwards until removed: a layer computes
        # only its folded, rule-carrying output and a folded BatchNorm passes its input on
        for m in layers:
            m.forward = functools.partial(layer_forward, m)  # type: ignore[method-assign]
        for bn in folded.values():
            bn.forward = _identity  # type: ignore[method-assign]
        for m in model.modules():
            if isinstance(m, AVGPOOL_TYPES):
                handles.append(m.register_forward_hook(lambda _m, _i, out: norm_output(out, norm_eps)))
        for block in blocks:  # instance attribute shadows the class's forward until removed
            block.forward = _residual_forward(block, norm_eps)  # type: ignore[method-assign]
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(False)
            x = inputs.detach().clone().requires_grad_(True)
            logits = model(x)
            score = logits.gather(1, targets[:, None]).sum()
            if explicit_first:
                (g,) = torch.autograd.grad(score, state["z"])
            else:
                (g,) = torch.autograd.grad(score, x)
    finally:
        for h in handles:
            h.remove()
        for m in [*blocks, *layers, *folded.values()]:
            if "forward" in m.__dict__:
                del m.forward
    if not explicit_first:
        return x.detach() * g
    assert first is not None and first_rule is not None
    w, b = folded_params(first, folded.get(first))
    return first_layer_relevance(first_rule, first, state["x"], w.detach(),
                                 None if b is None else b.detach(), state["z"].detach() * g)
