"""Every non-linearity a model applies, seen where it is applied: modules and functional calls.

Methods with their own backward rules (Guided Backprop, DeconvNet, DeepLIFT, LRP) used to
patch ``nn.ReLU`` modules, so a model that calls ``F.relu`` (DenseNet, Inception, GoogLeNet,
SqueezeNet), creates ``nn.ReLU()`` inside ``forward``, or uses SiLU, GELU, gates and
LayerNorm got the plain gradient back with no word: a silently wrong map (Captum's and
zennit's module hooks have the same blind spot). Here a ``TorchFunctionMode`` sees every
torch function call of a forward pass, whoever makes it (an ``nn.ReLU`` module calls
``F.relu`` too), classifies it (:func:`classify`) and hands the classified ones to the
method's handler; :func:`scan` runs one forward pass and reports which kinds the model
applies and in which modules, so a method can refuse what it has no rule for, naming it.

Kinds (the value of :attr:`Call.kind`):

``relu``
    ``F.relu``, ``torch.relu(_)``, ``Tensor.relu(_)``, ``clamp(x, min=0)`` without a maximum.
``relu6``
    ``F.relu6`` and ``F.hardtanh`` (piecewise linear, bounded).
``activation``
    every other element-wise non-linearity: SiLU, GELU, Hardswish, Hardsigmoid, sigmoid,
    tanh, ELU, SELU, CELU, LeakyReLU, PReLU, Threshold, Softplus, Softsign, Mish, the
    shrinks, log-sigmoid (and GLU).
``max_pool``
    ``F.max_pool1d/2d/3d`` and the adaptive max pools.
``norm``
    ``F.layer_norm``, ``F.group_norm``, ``F.instance_norm``, ``F.local_response_norm``
    (``F.batch_norm`` in eval mode is affine and is not reported).
``softmax``
    ``softmax`` / ``log_softmax`` inside the network.
``product``
    a multiplication, matrix product or division of two tensors that both depend on the
    input (squeeze-excitation gates, attention); a product with a parameter or constant is
    linear and not reported.
``sum``
    an addition or subtraction of two input-dependent tensors (residual connections).
``other``
    other non-linear element-wise or order functions of an input-dependent tensor (exp,
    log, pow, sqrt, abs, clamp, maximum, sort, ...), and comparisons of one (``z > 0``: the
    masks of hand-written piecewise functions such as ``z * (z > 0)``).

An in-place call (``F.relu(x, inplace=True)``, ``x.clamp_(min=0)``) handed to a handler is
computed out of place from a copy and written back into ``x``, so a model that relies on
the in-place write (``x.relu_()`` as a statement) computes the same function.

Anything else (convolutions, linear layers, eval-mode batch norm, average pools,
reshapes, concatenation, products with parameters) is linear in the input and passes
through untouched.
"""

from __future__ import annotations

import functools
import inspect
import operator
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

Tensor_ = torch.Tensor

RELU = {F.relu, torch.relu, torch.relu_, Tensor_.relu, Tensor_.relu_}
RELU6 = {F.relu6, F.hardtanh, F.hardtanh_}
ACTIVATION = {
    F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, torch.sigmoid, torch.sigmoid_,
    Tensor_.sigmoid, Tensor_.sigmoid_, F.tanh, torch.tanh, torch.tanh_, Tensor_.tanh, Tensor_.tanh_,
    F.elu, F.elu_, F.selu, F.celu, F.leaky_relu, F.leaky_relu_, F.softplus, F.mish, F.logsigmoid,
    F.rrelu, torch.selu, torch.celu, torch.rrelu, F.prelu, torch.prelu, F.threshold, F.threshold_,
    torch.threshold, F.softsign, F.tanhshrink, F.softshrink, F.hardshrink, F.glu,
}
MAX_POOL = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
            F.adaptive_max_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
            F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices}
NORM = {F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm, F.rms_norm,
        torch.layer_norm, torch.group_norm, torch.instance_norm}
SOFTMAX = {F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax,
           Tensor_.softmax, Tensor_.log_softmax, F.scaled_dot_product_attention,
           F.multi_head_attention_forward}
PRODUCT = {torch.mul, Tensor_.mul, Tensor_.mul_, Tensor_.__mul__, Tensor_.__imul__, Tensor_.__rmul__,
           torch.matmul, Tensor_.matmul, Tensor_.__matmul__, torch.bmm, torch.mm, torch.einsum,
           torch.div, Tensor_.div, Tensor_.div_, Tensor_.__truediv__, Tensor_.__itruediv__,
           Tensor_.__rtruediv__, operator.mul, operator.truediv}
SUM = {torch.add, Tensor_.add, Tensor_.add_, Tensor_.__add__, Tensor_.__iadd__, Tensor_.__radd__,
       torch.sub, Tensor_.sub, Tensor_.sub_, Tensor_.__sub__, Tensor_.__isub__, Tensor_.__rsub__}
OTHER = {
    torch.exp, Tensor_.exp, torch.log, Tensor_.log, torch.pow, Tensor_.pow, Tensor_.__pow__,
    torch.sqrt, Tensor_.sqrt, torch.rsqrt, Tensor_.rsqrt, torch.abs, Tensor_.abs, Tensor_.__abs__,
    torch.clamp, Tensor_.clamp, Tensor_.clamp_, torch.clamp_min, Tensor_.clamp_min, Tensor_.clamp_min_,
    torch.clamp_max, Tensor_.clamp_max, torch.clip, Tensor_.clip, torch.maximum, torch.minimum,
    torch.max, Tensor_.max, torch.min, Tensor_.min, torch.amax, Tensor_.amax, torch.amin, Tensor_.amin,
    torch.sort, torch.topk, torch.erf, torch.sin, torch.cos, torch.reciprocal, Tensor_.reciprocal,
    torch.square, Tensor_.square, torch.norm, Tensor_.norm, torch.logsumexp, F.normalize,
    F.cosine_similarity, torch.sign, Tensor_.sign, torch.heaviside, torch.round, torch.floor, torch.ceil,
    # comparisons of activations: the masks of hand-written piecewise functions
    # (``z * (z > 0)``, ``torch.where(z > 0, z, 0)``)
    torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne, Tensor_.gt, Tensor_.lt, Tensor_.ge,
    Tensor_.le, Tensor_.eq, Tensor_.ne, Tensor_.__gt__, Tensor_.__lt__, Tensor_.__ge__, Tensor_.__le__,
    Tensor_.__eq__, Tensor_.__ne__, torch.greater, torch.less, torch.greater_equal, torch.less_equal,
}
_TABLE: dict[Any, str] = {
    **dict.fromkeys(RELU, "relu"), **dict.fromkeys(RELU6, "relu6"),
    **dict.fromkeys(ACTIVATION, "activation"), **dict.fromkeys(MAX_POOL, "max_pool"),
    **dict.fromkeys(NORM, "norm"), **dict.fromkeys(SOFTMAX, "softmax"),
    **dict.fromkeys(OTHER, "other"),
}
_BINARY: dict[Any, str] = {**dict.fromkeys(PRODUCT, "product"), **dict.fromkeys(SUM, "sum")}
#: in-place variants and their out-of-place functions
_OUT_OF_PLACE = {torch.relu_: torch.relu, Tensor_.relu_: torch.relu, F.hardtanh_: F.hardtanh,
                 Tensor_.clamp_: torch.clamp, Tensor_.clamp_min_: torch.clamp_min, Tensor_.clip_: torch.clip,
                 F.threshold_: F.threshold,
                 torch.sigmoid_: torch.sigmoid, Tensor_.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh,
                 Tensor_.tanh_: torch.tanh, F.elu_: F.elu, F.leaky_relu_: F.leaky_relu}


_CLAMPS = {torch.clamp, Tensor_.clamp, Tensor_.clamp_, torch.clamp_min, Tensor_.clamp_min, Tensor_.clamp_min_,
           torch.clip, Tensor_.clip, Tensor_.clip_}


def _clamp_is_relu(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``clamp(x, min=0)`` / ``clamp_min(x, 0)`` without an upper bound: a ReLU."""
    if func in (torch.clamp_min, Tensor_.clamp_min, Tensor_.clamp_min_):
        low, high = (args[1] if len(args) > 1 else kwargs.get("min")), None
    else:
        low = args[1] if len(args) > 1 else kwargs.get("min")
        high = args[2] if len(args) > 2 else kwargs.get("max")
    return high is None and isinstance(low, (int, float)) and not isinstance(low, bool) and low == 0


def _tensors(args: tuple[Any, ...]) -> list[Tensor]:
    return [a for a in args if isinstance(a, Tensor)]


def _depends(t: Any) -> bool:
    """Whether ``t`` is a tensor computed from the (gradient-tracking) input."""
    return isinstance(t, Tensor) and t.requires_grad


def classify(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> str | None:
    """The kind of a torch function call (module docstring), or None for a linear one.

    Parameters
    ----------
    func : callable
        The function as ``__torch_function__`` receives it.
    args, kwargs
        Its arguments. Binary kinds (``product``, ``sum``) are reported only when both
        operands are tensors that require grad, i.e. depend on the input in a pass whose
        parameters do not require grad; ``other`` only for an input-dependent argument.

    Returns
    -------
    str or None
    """
    kind = _TABLE.get(func)
    if func in _CLAMPS and _depends(args[0] if args else None) and _clamp_is_relu(func, args, kwargs or {}):
        return "relu"
    if kind == "relu6" and hardtanh_bounds(Call(kind, func, args, kwargs or {}))[0] != 0:
        return "activation"  # a hardtanh that is not a rectifier
    if kind == "other":
        return kind if any(_depends(t) for t in _tensors(args)) else None
    if kind is not None:
        return kind
    binary = _BINARY.get(func)
    if binary is not None:
        operands = [*args, *(kwargs or {}).values()]
        if sum(_depends(t) for t in operands) >= 2:
            return binary
        if binary == "product" and func in (torch.div, Tensor_.div, Tensor_.div_, Tensor_.__truediv__,
                                            Tensor_.__itruediv__, operator.truediv):
            return "product" if len(args) > 1 and _depends(args[1]) else None  # x / f(x)
        if func is Tensor_.__rtruediv__ and _depends(args[0]):
            return "product"  # c / f(x)
    return None


@functools.cache
def _signature(func: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


@dataclass
class Call:
    """One classified torch function call inside an intercepting pass."""

    kind: str
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def input(self) -> Tensor:
        """The first tensor argument."""
        return _tensors(self.args)[0]

    @property
    def in_place(self) -> bool:
        """Whether the call writes its result into its first argument."""
        if self.func in _OUT_OF_PLACE:
            return True
        if self.kwargs.get("inplace") is True:
            return True
        sig = _signature(self.func)
        if sig is None or "inplace" not in sig.parameters:
            return False
        try:
            return sig.bind_partial(*self.args, **self.kwargs).arguments.get("inplace") is True
        except TypeError:
            return False

    def run(self) -> Any:
        """The call as the model made it."""
        return self.func(*self.args, **self.kwargs)

    def unary(self) -> Callable[[Tensor], Tensor]:
        """The call as an out-of-place function of its first argument, other arguments
        bound (``F.hardtanh(x, 0, 6, True)`` -> ``t -> F.hardtanh(t, 0, 6)``)."""
        func = _OUT_OF_PLACE.get(self.func, self.func)
        sig = _signature(func)
        rest, kwargs = self.args[1:], dict(self.kwargs)
        if sig is not None:
            bound = sig.bind_partial(*self.args, **self.kwargs)
            if "inplace" in bound.arguments:
                bound.arguments["inplace"] = False
            names = list(sig.parameters)
            arguments = dict(bound.arguments)
            arguments.pop(names[0], None)
            return functools.partial(func, **arguments)
        return lambda t: func(t, *rest, **kwargs)


def hardtanh_bounds(call: Call) -> tuple[float, float]:
    """(min_val, max_val) of a ``relu6`` / ``hardtanh`` call."""
    if call.func is F.relu6:
        return 0.0, 6.0
    args = call.args + (None,) * 3
    low = call.kwargs.get("min_val", args[1] if args[1] is not None else -1.0)
    high = call.kwargs.get("max_val", args[2] if args[2] is not None else 1.0)
    return float(low), float(high)


Handler = Callable[[Call], Any]


class Intercept(TorchFunctionMode):
    """Route classified calls to ``handler``; it returns the call's result (or
    ``NotImplemented`` to run the call as made). Calls inside the handler are not
    intercepted (a torch function mode is off while its ``__torch_function__`` runs)."""

    def __init__(self, handler: Handler, kinds: set[str] | None = None) -> None:
        super().__init__()
        self.handler = handler
        self.kinds = kinds

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        kind = classify(func, args, kwargs)
        if kind is not None and (self.kinds is None or kind in self.kinds):
            call = Call(kind, func, args, kwargs)
            if not call.in_place:
                out = self.handler(call)
                if out is not NotImplemented:
                    return out
            else:  # the handler computes out of place from a copy; the result is then
                # written back, so code that relies on the in-place write sees it
                target = call.input
                copy = Call(kind, func, (target.clone(), *args[1:]), kwargs)
                out = self.handler(copy)
                if out is not NotImplemented:
                    return target.copy_(out)
        return func(*args, **kwargs)


@dataclass
class Findings:
    """What one forward pass of a model applies: kind -> {function name -> module names}."""

    seen: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def kinds(self) -> set[str]:
        """The kinds found."""
        return set(self.seen)

    def describe(self, kinds: set[str] | list[str]) -> str:
        """``"silu in features.1.0.block.0.2, ... (16 calls); sigmoid in ..."`` for ``kinds``."""
        parts = []
        for kind in sorted(kinds):
            for fname, where in sorted(self.seen.get(kind, {}).items()):
                uniq = list(dict.fromkeys(where))
                shown = ", ".join(uniq[:3]) + (f", ... ({len(where)} calls)" if len(uniq) > 3 else "")
                parts.append(f"{fname} ({kind}) in {shown}")
        return "; ".join(parts)


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name.strip("_") if name.startswith("__") else name


_scan_cache: dict[tuple[int, tuple[int, ...], torch.dtype], tuple[Any, Findings]] = {}


def scan(model: nn.Module, example: Tensor) -> Findings:
    """Classified calls of one forward pass of ``example[:1]``, by kind and module.

    The pass runs with gradients enabled on the input and disabled on the parameters (so
    "depends on the input" is ``requires_grad``); the parameters' flags and every module's
    training flag are restored. Cached per model (by identity, while it lives), input shape
    and dtype.

    Parameters
    ----------
    model : nn.Module
        The network.
    example : Tensor, shape (N, C, H, W)
        An input like the ones explained.

    Returns
    -------
    Findings
        Module names are the innermost named module whose forward made the call
        (``"(model)"`` for the top level).
    """
    key = (id(model), tuple(example.shape[1:]), example.dtype)
    hit = _scan_cache.get(key)
    if hit is not None and hit[0]() is model:
        return hit[1]
    findings = record_calls(model, example, lambda call: _func_name(call.func))
    _scan_cache[key] = (weakref.ref(model), findings)
    return findings


def record_calls(model: nn.Module, example: Tensor, label: Callable[[Call], str | None],
                 mode: Callable[[Handler], Intercept] = Intercept) -> Findings:
    """One forward pass of ``example[:1]`` in ``mode``, recording each classified call under
    its kind and ``label(call)`` (skipped when None) with the innermost module making it.

    The input tracks gradients and the parameters do not (their flags restored, as every
    module's training flag: the pass runs in eval mode).
    """
    names = {m: n or "(model)" for n, m in model.named_modules()}
    stack: list[str] = []
    findings = Findings()

    def handler(call: Call) -> Any:
        name = label(call)
        if name is not None:
            where = stack[-1] if stack else "(model)"
            findings.seen.setdefault(call.kind, {}).setdefault(name, []).append(where)
        return NotImplemented

    def enter(_m: nn.Module, _i: object, n: str) -> None:
        stack.append(n)

    def leave(_m: nn.Module, _i: object, _o: object) -> None:
        if stack:
            stack.pop()

    handles = []
    flags = [p.requires_grad for p in model.parameters()]
    training = [(m, m.training) for m in model.modules()]
    try:
        for m, n in names.items():
            handles.append(m.register_forward_pre_hook(functools.partial(enter, n=n)))
            handles.append(m.register_forward_hook(leave))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        x = example[:1].detach().clone().requires_grad_(True)
        with torch.enable_grad(), mode(handler):
            model(x)
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        for m, flag in training:
            m.training = flag
    return findings


@contextmanager
def intercept(handler: Handler, kinds: set[str] | None = None) -> Iterator[None]:
    """Inside the block, classified calls of ``kinds`` (all when None) go to ``handler``."""
    with Intercept(handler, kinds):
        yield
