"""Layer-wise relevance propagation as a modified gradient, with BatchNorm folded on the fly.

Every Conv/Linear layer's forward is replaced (for the call) by one that returns

    carrier = sum_i  c_i * z_i * (z / stab(z_i)).detach()
    out = carrier + (z - carrier).detach()          (value z, gradient of the carrier)

where ``z_i`` are the rule's modified pre-activations (modified weights applied to modified
inputs) and ``c_i`` its coefficients. Back-propagating the target logit then carries
``g = R / a`` for every activation ``a``, and ``x * grad`` at the input is the LRP relevance:
for the layer, ``x_j dz_i/dx_j`` is exactly the rule's contribution of input ``j`` to output
``k``, divided by the stabilised denominator. Unlike zennit, no layer's forward is run again
inside the backward pass: one forward, one backward.

Everything else the forward pass computes is seen by a torch function mode
(:class:`explainers._functional.Intercept`), whoever calls it (a module or a functional
call inside ``forward``), and gets a rule from the literature or a refusal
(:func:`check_supported`, :class:`explainers.base.UnsupportedModelError`) naming the module:

``relu``, PReLU, max-pools
    no hook: positively homogeneous, so ``x * grad`` passes relevance on exactly (zennit's
    Pass rule for ReLU; winner takes all for max-pools).
other element-wise activations (SiLU, GELU, Hardswish, ReLU6/hardtanh, sigmoid, tanh, ELU, ...)
    the identity ("pass") rule ``R_in = R_out``: backward ``grad * f(x) / stab(x)`` (zennit's
    ``Pass`` rule, which its composites map to every activation module; Montavon et al.
    2019 likewise let relevance pass element-wise activations unchanged).
sums of two input-dependent tensors (residual connections), average pools
    zennit's Norm rule: a proportional split with a 1e-6 stabiliser (what zennit's ResNet
    canonizer gives torchvision's skip additions; on every dependent addition here).
concatenation, reshapes, permutes, eval-mode BatchNorm not preceded by a Conv
    linear: ``x * grad`` conserves (a BatchNorm left unfolded, e.g. DenseNet's norm-relu-conv
    order, is a diagonal affine map whose shift absorbs relevance as a bias does).
products with a gate (one operand smaller and broadcast to the other: squeeze-excitation)
    the signal-take-all gating rule of Arras et al. (2017, 2019): the gate is a constant,
    all relevance goes to the signal.
``F.layer_norm`` (ConvNeXt, transformers)
    the LN-rule of Ali et al. (ICML 2022): the standard deviation is a constant,
    which makes LayerNorm linear in its input; its gradient times input then conserves
    relevance (LRP-0 for the linearised layer, the affine bias absorbing its share).
refused
    group / instance / local-response / RMS norm, softmax and attention, products with no
    broadcast gate (two same-shape activations, matrix products, divisions by an
    activation), and other non-linear functions (exp, pow, abs, clamp, max, ...).

BatchNorm is folded into the preceding Conv/Linear (found by tracing which module's output
each BatchNorm reads): that layer computes with the folded weights and the BatchNorm
passes its input through, so the model is never modified. The first layer can take the
flat or the z-box rule, which are computed explicitly from the relevance at its output.

Precision: the forward pass runs as the model runs (``model.half()``, ``torch.autocast``);
every rule's division, stabiliser and accumulation runs in
:func:`explainers._numerics.working_dtype` (float32 for 16-bit tensors), so float32 and
float64 results are unchanged and no float32 tensor meets a float16 one in a backward
kernel. A low-precision result that is still not finite is refused (the explainer's
``_attribute``).

References
----------
S. Bach et al., PLoS ONE 2015 (LRP). G. Montavon et al., "Layer-Wise Relevance Propagation:
An Overview", 2019. L. Arras et al., "Explaining Recurrent Neural Network Predictions in
Sentiment Analysis", WASSA 2017, and "Explaining and Interpreting LSTMs", 2019 (gates).
A. Ali et al., "XAI for Transformers: Better Explanations through Conservative
Propagation", ICML 2022 (LayerNorm). C. J. Anders et al., zennit, arXiv 2106.13200.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attriflow.explainers._functional import Call, Findings, Intercept, record_calls
from attriflow.explainers._hooks import trace
from attriflow.explainers._numerics import LOW_PRECISION, as_working, working_dtype
from attriflow.explainers.base import UnsupportedModelError

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
        zw = as_working(z)  # rule arithmetic in float32 for 16-bit tensors (module docstring)
        if rule.name == "epsilon":
            terms.append((1.0, w, None, zw / stabilize(zw, rule.epsilon)))
        elif rule.name in ("zplus", "alpha_beta"):
            wp, wn = params.positive, params.negative
            xp, xn = (x.clamp(min=0), x.clamp(max=0)) if signed else (x, None)
            mp, mn = (x >= 0, x <= 0) if signed else (None, None)
            zpos = _apply(module, xp, wp, _pos(b))
            if xn is not None:
                zpos = zpos + _apply(module, xn, wn, _zeros_like(b))
            alpha = 1.0 if rule.name == "zplus" else rule.alpha
            zpos = as_working(zpos)
            if signed:
                cp = zw / stabilize(zpos, rule.epsilon)
            else:  # x >= 0 with w+ >= 0 and b+ >= 0: z+ >= 0, so the stabiliser adds +eps
                cp = torch.div(zw, zpos.add_(rule.epsilon), out=zpos)
            terms.append((alpha, wp, mp, cp))
            if xn is not None:
                terms.append((alpha, wn, mn, cp))
            if rule.name == "alpha_beta":
                zneg = _apply(module, xp, wn, _neg(b))
                if xn is not None:
                    zneg = zneg + _apply(module, xn, wp, _zeros_like(b))
                cn = zw / stabilize(as_working(zneg), rule.epsilon)
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
        # in working dtype: a 16-bit gradient and float32 weights (autocast) or 16-bit weights
        # meet in float32; autograd casts the returned gradient to the input's dtype
        grad = as_working(grad)
        for coeff, weight, has_mask, scale in zip(ctx.coeffs, weights, ctx.has_mask, scales):
            g = _input_grad(ctx.module, ctx.shape, weight.to(grad.dtype), grad * scale)
            if has_mask:
                g = g * next(masks_iter)
            if coeff != 1.0:
                g = g * coeff
            total = g if total is None else total + g
        return total, None, None, None


def first_layer_relevance(rule: Rule, module: nn.Module, x: Tensor, w: Tensor, b: Tensor | None,
                          relevance: Tensor) -> Tensor:
    """Relevance at the input of the first layer for the flat or z-box rule (zennit's form).

    Computed in :func:`working_dtype` with autocast off (the last step of the backward pass,
    an accumulation): float32 and float64 inputs are computed as before.
    """
    wd = working_dtype(x.dtype)
    x, w, relevance = x.to(wd), w.to(wd), relevance.to(wd)
    b = None if b is None else b.to(wd)
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
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
    gradient scaled by ``z / stab(z)`` (computed in :func:`working_dtype`)."""
    with torch.no_grad():
        zw = as_working(z)
        scale = zw / stabilize(zw, eps)
    return _ScaleGrad.apply(z, scale)


# ---------------------------------------------------------------------- functional rules
class _PassRule(torch.autograd.Function):
    """Element-wise activation ``y = f(x)`` with the identity ("pass") rule ``R_in = R_out``:
    the carried ``g = R / a`` becomes ``g * y / stab(x)`` (zennit's ``Pass``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, f: Callable[[Tensor], Tensor], eps: float) -> Tensor:
        y = f(x)
        xw = as_working(x)
        ctx.save_for_backward(as_working(y) / stabilize(xw, eps))
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (scale,) = ctx.saved_tensors
        return as_working(grad) * scale, None, None


_MUL = {torch.mul, Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__imul__, Tensor.__rmul__,
        operator.mul}
_LAYER_NORM = {F.layer_norm, torch.layer_norm}
#: non-linear functions that :func:`explainers._functional.classify` does not name (their
#: inner calls are not seen either: a torch function mode is off while it handles a call)
_EXTRA: dict[Any, str] = {
    F.glu: "product", F.scaled_dot_product_attention: "softmax",
    F.multi_head_attention_forward: "softmax", F.normalize: "other", F.cosine_similarity: "other",
    F.softsign: "activation", F.tanhshrink: "activation", F.softshrink: "activation",
    F.hardshrink: "activation", F.threshold: "activation", F.prelu: "relu",
}
_EXTRA_BINARY = {torch.baddbmm, torch.addmm, torch.addbmm, torch.addmv, torch.addcmul, torch.addcdiv,
                 F.bilinear}


def _depends(t: Any) -> bool:
    return isinstance(t, Tensor) and t.requires_grad


def _operands(call: Call) -> list[Tensor]:
    return [t for t in (*call.args, *call.kwargs.values()) if _depends(t)]


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name.strip("_") if name.startswith("__") else name


class _LRPIntercept(Intercept):
    """:class:`Intercept` that also names the functions of :data:`_EXTRA`."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        kind = _EXTRA.get(func)
        if kind is None and func in _EXTRA_BINARY:
            kind = "product" if sum(_depends(t) for t in (*args, *kwargs.values())) >= 2 else None
        if kind is not None and any(_depends(t) for t in (*args, *kwargs.values())):
            out = self.handler(Call(kind, func, args, kwargs))
            if out is not NotImplemented:
                return out
            return func(*args, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


def _gate(call: Call) -> Tensor | None:
    """The gate of a product: of two input-dependent factors, the one with fewer elements
    whose shape broadcasts to the other's (squeeze-excitation's (N, C, 1, 1) scale of an
    (N, C, H, W) signal); None for other products."""
    if call.func not in _MUL:
        return None
    ops = _operands(call)
    if len(ops) != 2:
        return None
    small, big = sorted(ops, key=lambda t: t.numel())
    if small.numel() == big.numel():
        return None
    try:
        shape = torch.broadcast_shapes(small.shape, big.shape)
    except RuntimeError:
        return None
    return small if shape == big.shape else None


def _layer_norm_rule(call: Call) -> Tensor:
    """``F.layer_norm`` with the LN-rule of Ali et al. (2022): value exact, gradient that of
    ``(x - mean(x)) / std(x).detach() * weight + bias`` (linear in ``x``)."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, call.args))
    bound.update({k: v for k, v in call.kwargs.items() if k in names})
    x, shape = bound["input"], bound["normalized_shape"]
    weight, bias, eps = bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)
    ref = call.run()
    n = 1 if isinstance(shape, int) else len(shape)
    dims = tuple(range(-n, 0))
    xw = as_working(x)
    var = xw.detach().var(dims, unbiased=False, keepdim=True)
    lin = (xw - xw.mean(dims, keepdim=True)) / torch.sqrt(var + eps)
    if weight is not None:
        lin = lin * weight.to(lin.dtype)
    if bias is not None:
        lin = lin + bias.to(lin.dtype)
    return ref.detach() + (lin - lin.detach()).to(ref.dtype)


def refusal(call: Call) -> str | None:
    """Why LRP has no rule for ``call`` (a short name for the message), or None.

    Parameters
    ----------
    call : Call
        A classified call of an LRP forward pass (parameters not requiring grad, the input
        requiring it).

    Returns
    -------
    str or None
        None for the calls of the module docstring's table that have a rule.
    """
    name = _func_name(call.func)
    if not _operands(call):  # nothing input-dependent: no relevance flows through it
        return None
    if call.kind in ("relu", "max_pool", "activation", "relu6", "sum"):
        return None
    if call.kind == "norm":
        return None if call.func in _LAYER_NORM else name
    if call.kind == "product":
        if _gate(call) is not None:
            return None
        return f"{name} with no broadcast gate"
    return name


def rule_handler(eps: float) -> Callable[[Call], Any]:
    """The :class:`Intercept` handler of an LRP forward pass (module docstring's table).

    Parameters
    ----------
    eps : float
        Stabiliser of the pass and Norm rules.

    Returns
    -------
    callable
        ``Call -> Tensor`` (or ``NotImplemented`` where the call needs no rule).

    Raises
    ------
    UnsupportedModelError
        From the handler, for a call :func:`refusal` refuses (normally caught earlier by
        :func:`check_supported`, which names the module).
    """
    def handle(call: Call) -> Any:
        reason = refusal(call)
        if reason is not None:
            raise UnsupportedModelError(f"LRP has no rule for {reason} ({call.kind})")
        kind = call.kind
        if kind in ("relu", "max_pool") or not _operands(call):
            return NotImplemented
        if kind in ("activation", "relu6"):
            return _PassRule.apply(call.input, call.unary(), eps)
        if kind == "sum":
            return norm_output(call.run(), eps)
        if kind == "norm":
            return _layer_norm_rule(call)
        gate = _gate(call)  # a product with a gate
        args = tuple(a.detach() if a is gate else a for a in call.args)
        kwargs = {k: (v.detach() if v is gate else v) for k, v in call.kwargs.items()}
        return call.func(*args, **kwargs)
    return handle


def unsupported(model: nn.Module, example: Tensor) -> Findings:
    """The calls of one forward pass of ``example[:1]`` that LRP has no rule for.

    Parameters
    ----------
    model : nn.Module
        The network (left in its mode, its parameters' ``requires_grad`` restored).
    example : Tensor, shape (N, C, H, W)
        An input like the ones explained.

    Returns
    -------
    Findings
        kind -> {function (and why) -> names of the innermost modules that called it};
        empty when every call has a rule.
    """
    return record_calls(model, example, refusal, _LRPIntercept)


def check_supported(model: nn.Module, example: Tensor, explainer: str) -> None:
    """Refuse a model with a computation LRP has no rule for, naming it and its modules.

    Parameters
    ----------
    model : nn.Module
        The network.
    example : Tensor, shape (N, C, H, W)
        An input like the ones explained (one forward pass of its first image).
    explainer : str
        Name for the message.

    Raises
    ------
    UnsupportedModelError
        If :func:`unsupported` finds anything.
    """
    findings = unsupported(model, example)
    if findings.seen:
        raise UnsupportedModelError(
            f"{explainer}: no LRP rule for {findings.describe(findings.kinds())}. LRP here has "
            "rules for Conv/Linear, BatchNorm, ReLU-family and element-wise activations, max "
            "and average pools, additions, concatenation, LayerNorm and products with a "
            "broadcast gate (squeeze-excitation); explain this model with a gradient method "
            "(saliency, gradient_x_input, integrated_gradients) or a CAM method instead.")


def low_precision(x: Tensor) -> torch.dtype | None:
    """The 16-bit dtype ``x`` (or the autocast region it is used in) computes in, or None."""
    if x.dtype in LOW_PRECISION:
        return x.dtype
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        return dtype if dtype in LOW_PRECISION else None
    return None


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
    dtype = w.dtype
    if dtype in LOW_PRECISION:  # fold in float32, round once (model.half())
        w, b = w.float(), None if b is None else b.float()
    wd = w.dtype
    scale = bn.weight.to(wd) / torch.sqrt(bn.running_var.to(wd) + bn.eps)  # type: ignore[union-attr]
    shape = (-1,) + (1,) * (w.ndim - 1)
    bias = b if b is not None else torch.zeros_like(bn.running_mean, dtype=wd)  # type: ignore[arg-type]
    folded_b = (bias - bn.running_mean.to(wd)) * scale + bn.bias.to(wd)  # type: ignore[union-attr]
    return (w * scale.view(shape)).to(dtype), folded_b.to(dtype)


def lrp(model: nn.Module, inputs: Tensor, targets: Tensor, rule_for: Callable[[nn.Module, bool], Rule],
        traced: tuple[list[nn.Module], dict[nn.Module, nn.Module]] | None = None) -> Tensor:
    """LRP relevance of the target logit at the input, shape (N, C, H, W).

    Parameters
    ----------
    model : nn.Module
        A network of the computations the module docstring lists (check it first with
        :func:`check_supported`).
    inputs : Tensor, shape (N, C, H, W)
        Model inputs, float64, float32, or 16-bit for a ``model.half()`` model (autocast
        regions are honoured in the forward pass).
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
        Relevance per input element, in :func:`working_dtype` of the inputs (float32 for
        16-bit inputs).

    Raises
    ------
    UnsupportedModelError
        If the forward pass makes a call with no rule (:func:`refusal`).
    """
    layers, folded = traced if traced is not None else trace_layers(model, inputs[:1])
    first = layers[0] if layers else None
    first_rule = rule_for(first, True) if first is not None else None
    explicit_first = first_rule is not None and first_rule.name in ("flat", "box")
    state: dict[str, Tensor] = {}
    cache: dict[int, Folded] = {}  # folded weights, once per layer and call
    handles = []

    def layer_forward(m: nn.Module, x: Tensor) -> Tensor:
        with torch._C.DisableTorchFunction():  # the rule's own arithmetic is not the model's
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

    def pool_hook(_m: nn.Module, _i: object, out: Tensor) -> Tensor:
        with torch._C.DisableTorchFunction():
            return norm_output(out, norm_eps)

    norm_eps = (first_rule.epsilon if first_rule is not None and first_rule.name != "epsilon" else 1e-6)
    try:
        # instance attributes shadow the classes' forwards until removed: a layer computes
        # only its folded, rule-carrying output and a folded BatchNorm passes its input on
        for m in layers:
            m.forward = functools.partial(layer_forward, m)  # type: ignore[method-assign]
        for bn in folded.values():
            bn.forward = _identity  # type: ignore[method-assign]
        for m in model.modules():
            if isinstance(m, AVGPOOL_TYPES):
                handles.append(m.register_forward_hook(pool_hook))
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(False)
            x = inputs.detach().clone().requires_grad_(True)
            with _LRPIntercept(rule_handler(norm_eps)):  # activations, sums, gates, LayerNorm
                logits = model(x)
            picked = logits.gather(1, targets[:, None])
            # 16-bit: the backward pass is linear in its seed, so seed it with a power of two
            # near 1 / |logit| (exact rescaling, as AMP's loss scaling): a tiny logit's carried
            # gradients would underflow float16; float32 / float64 are seeded with 1 as before
            seed = None
            if low_precision(x) is not None:
                with torch.no_grad():
                    mag = as_working(picked.detach()).abs().clamp_min(torch.finfo(torch.float32).tiny)
                    seed = torch.exp2(-torch.floor(torch.log2(mag)))
                score = (picked * seed.to(picked.dtype)).sum()
            else:
                score = picked.sum()
            if explicit_first:
                (g,) = torch.autograd.grad(score, state["z"])
            else:
                (g,) = torch.autograd.grad(score, x)
    finally:
        for h in handles:
            h.remove()
        for m in [*layers, *folded.values()]:
            if "forward" in m.__dict__:
                del m.forward
    unseed = 1.0 if seed is None else 1.0 / seed.view(-1, *([1] * (inputs.ndim - 1)))
    if not explicit_first:
        return as_working(x.detach()) * as_working(g) * unseed
    assert first is not None and first_rule is not None
    w, b = folded_params(first, folded.get(first))
    return first_layer_relevance(first_rule, first, state["x"], w.detach(),
                                 None if b is None else b.detach(),
                                 as_working(state["z"].detach()) * as_working(g)) * unseed
