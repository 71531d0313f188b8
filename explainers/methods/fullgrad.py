"""FullGrad (Srinivas & Fleuret 2019)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from attriflow.explainers._functional import SUM, Call, Findings, Intercept, _func_name, record_calls
from attriflow.explainers._numerics import as_working, minmax_scale
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers.base import Explainer, ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.registry import register

#: pytorch-grad-cam's (and the authors') per-map guard: ``(m - min) / (max - min + 1e-7)``
EPS = 1e-7

#: Built-in functions (no Python signature) that take a bias, and its position.
_BIAS_AT = {
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                     F.conv_transpose3d, F.linear), 2),
    F.bilinear: 3,
}
#: Python functions with ``*bias*`` arguments (batch norm: also its running mean).
_PARAMETRIC = {F.batch_norm, F.instance_norm, F.layer_norm, F.group_norm, F.multi_head_attention_forward}
#: The modules whose bias FullGrad counts, and the function each applies it with.
_COUNTED: dict[type[nn.Module], set[str]] = {nn.Conv2d: {"conv2d"}, nn.BatchNorm2d: {"batch_norm"}}


class FullGradParams(BaseModel):
    """Parameters of :class:`FullGrad`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    score: ScoreKind = "logit"


def _bound(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return dict(inspect.signature(func).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return None


def _bias_kind(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """``"bias"``, ``"batch statistics"`` or ``"constant"`` for a call that adds a shift to
    a spatial (at least 3-D) input-dependent tensor, else None."""
    if func in _BIAS_AT or func in _PARAMETRIC:
        x = args[0] if args else kwargs.get("input", kwargs.get("query"))
        if not (isinstance(x, Tensor) and x.requires_grad and x.ndim >= 3):
            return None
        if func in _BIAS_AT:
            at = _BIAS_AT[func]
            return "bias" if (args[at] if len(args) > at else kwargs.get("bias")) is not None else None
        bound = _bound(func, args, kwargs) or {}
        if func is F.batch_norm:
            if bound.get("training") or bound.get("running_mean") is None:
                return "batch statistics"
            return "bias"  # a frozen batch norm always shifts: bias - mean * weight / std
        if any(v is not None for k, v in bound.items() if "bias" in k):
            return "bias"
        return None
    if func in SUM:  # additions / subtractions: with a constant operand, a bias written by hand
        operands = [*args, *(v for k, v in kwargs.items() if k != "alpha")]
        live = [t for t in operands if isinstance(t, Tensor) and t.requires_grad]
        const = [t for t in operands if not (isinstance(t, Tensor) and t.requires_grad) and t is not None
                 and not isinstance(t, bool) and isinstance(t, (Tensor, int, float))]
        if live and max(t.ndim for t in live) >= 3 and any(bool(torch.as_tensor(c).ne(0).any()) for c in const):
            return "constant"
    return None


class _BiasCalls(Intercept):
    """Hands every call that shifts a spatial tensor (:func:`_bias_kind`) to the handler."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        kind = _bias_kind(func, args, kwargs)
        if kind is not None:
            self.handler(Call(kind, func, args, kwargs))
        return func(*args, **kwargs)


def uncounted_biases(model: nn.Module, example: Tensor) -> Findings:
    """The shifts of spatial tensors in one forward pass that FullGrad cannot count: every
    one except the bias of an ``nn.Conv2d`` and the (effective) bias of an ``nn.BatchNorm2d``
    with running statistics, applied by the module itself.

    Parameters
    ----------
    model : nn.Module
        The network (one eval-mode pass of ``example[:1]``; state restored).
    example : Tensor, shape (N, C, H, W)
        An input like the ones explained.

    Returns
    -------
    Findings
        Kinds ``bias`` (a functional bias, or one of a module FullGrad does not count: a
        LayerNorm, GroupNorm, InstanceNorm, ConvTranspose2d, a Linear on a spatial tensor),
        ``batch statistics`` (a batch norm without running statistics) and ``constant``
        (a constant tensor added to a spatial activation), with the modules making them.
    """
    found = record_calls(model, example, lambda call: _func_name(call.func), mode=_BiasCalls)
    modules = dict(model.named_modules())
    kept = Findings()
    for kind, by_func in found.seen.items():
        for fname, where in by_func.items():
            left = [w for w in where if not (kind == "bias" and any(
                isinstance(modules.get(w), cls) and fname in fnames for cls, fnames in _COUNTED.items()))]
            if left:
                kept.seen.setdefault(kind, {})[fname] = left
    return kept


def bias_of(module: nn.Module) -> Tensor | None:
    """The per-channel bias FullGrad counts for ``module``, or None.

    ``nn.Conv2d``: its ``bias``. ``nn.BatchNorm2d`` with running statistics (eval mode): the
    effective bias of ``weight * (x - running_mean) / sqrt(running_var + eps) + bias``,
    ``bias - running_mean * weight / sqrt(running_var + eps)`` (``weight`` 1 and ``bias`` 0
    without affine parameters), as in the authors' code and pytorch-grad-cam.
    """
    if isinstance(module, nn.BatchNorm2d):
        if module.running_mean is None or module.running_var is None:
            return None
        weight = module.weight if module.weight is not None else torch.ones_like(module.running_mean)
        shift = module.bias if module.bias is not None else torch.zeros_like(module.running_mean)
        scale = weight / torch.sqrt(module.running_var + module.eps)
        return (-(module.running_mean * scale) + shift).detach()
    if isinstance(module, nn.Conv2d):
        return None if module.bias is None else module.bias.detach()
    return None


@register
class FullGrad(Explainer):
    """Full-gradient saliency: the input-gradient map plus the bias-gradient maps of every
    convolution and batch norm, each made positive and min-max scaled per channel.

    For inputs ``x`` (N, C, H, W) and the target score ``S`` (``params.score``), the map is

    ``sum_c psi(|x_c * dS/dx_c|) + sum_layers sum_c up(psi(|b_c * dS/dz_c|))``

    where ``z`` is the output of a layer (every call of every ``nn.Conv2d`` with a bias and
    every ``nn.BatchNorm2d`` with running statistics, found in the forward pass), ``b_c`` its
    bias (for a batch norm the effective one, ``bias - running_mean * weight /
    sqrt(running_var + eps)``), ``psi`` min-max scales each (image, channel) map to [0, 1]
    (``(m - min) / (max - min + 1e-7)``) and ``up`` is bilinear upsampling to (H, W)
    (``align_corners=False``, as ``cv2.resize``; applied after the channel sum, which it
    commutes with). Biases of the classifier's fully connected layers have no spatial
    extent and are not drawn, as in the paper. One forward and one backward pass; the
    gradients of every layer are taken in the same backward pass (tensor hooks, which see
    the layer's own output even when an in-place ReLU overwrites it).

    Equal to pytorch-grad-cam's ``FullGrad`` (``fullgrad_cam.py``, which ignores
    ``target_layers``) before its final min-max scaling (``aggregate_multi_layers``), the
    test. Differences: a module called several times counts each call (pytorch-grad-cam
    fails an assertion); a ``BatchNorm2d`` without affine parameters counts its effective
    bias ``-running_mean / sqrt(running_var + eps)`` (pytorch-grad-cam skips it, its
    ``bias`` being None); subclasses of ``nn.Conv2d`` / ``nn.BatchNorm2d`` count
    (pytorch-grad-cam matches the exact types). The authors' code (``fullgrad-saliency``)
    scales over all channels of a layer at once and upsamples with ``align_corners=True``;
    pytorch-grad-cam, and we, scale each channel. Implicit biases of smooth activations
    (SiLU, GELU; the paper's remark on non-piecewise-linear networks) are not drawn,
    by neither implementation.

    Family: gradient back-propagation, not CAM. The map sums gradients (with respect to the
    input and to every layer's bias) over the whole network; it reads no layer's
    activations and has no target layer (pytorch-grad-cam ships it among its CAMs).

    Raises
    ------
    UnsupportedModelError
        From :meth:`check` / :meth:`attribute` when a bias the decomposition must count is
        invisible to it: a bias applied functionally (``F.conv2d(x, w, b)`` in a
        ``forward``) or by a module other than ``nn.Conv2d`` / ``nn.BatchNorm2d`` on a
        spatial tensor (LayerNorm, GroupNorm, affine InstanceNorm, ConvTranspose2d, a Linear
        on channels-last maps: ConvNeXt, vision transformers), a batch norm normalising with
        batch statistics (no running statistics), or a constant tensor added to a spatial
        activation (a positional embedding, an input normalisation inside the model). The
        message names the function and the modules. pytorch-grad-cam skips all of these
        silently.

    References
    ----------
    S. Srinivas, F. Fleuret, "Full-Gradient Representation for Neural Network
    Visualization", NeurIPS 2019 (eq. 4 and Sec. 4); pytorch-grad-cam 1.5.7
    ``pytorch_grad_cam.FullGrad``.
    """

    spec = ExplainerSpec(
        name="fullgrad",
        family=Family.GRADIENT,
        access=("gradients",),
        summary="input-gradient map plus the bias-gradient maps of every conv and batch norm",
        references=("srinivas2019",),
    )
    Params = FullGradParams

    def refuse(self, example: Tensor) -> None:  # noqa: D102 - documented in the class
        found = uncounted_biases(self.model, example)
        if not found.seen:
            return
        parts = []
        for kind, why in (("bias", "applies a bias FullGrad cannot see"),
                          ("batch statistics", "normalises with batch statistics, not a fixed bias"),
                          ("constant", "adds a constant tensor (a bias written by hand)")):
            if kind in found.seen:
                parts.append(f"{why}: {found.describe({kind})}")
        raise UnsupportedModelError(
            "fullgrad counts the biases of nn.Conv2d and of nn.BatchNorm2d with running statistics "
            "(pytorch-grad-cam's FullGrad); this model " + "; it ".join(parts) + ". The full-gradient "
            "map would miss those bias-gradients (pytorch-grad-cam drops them silently); use "
            "gradient_x_input, integrated_gradients or a CAM instead")

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        size = tuple(inputs.shape[-2:])
        total: list[Tensor] = []  # the layers' maps, (N, H, W) each, summed as they arrive

        def add(grad: Tensor, bias: Tensor) -> None:
            g = as_working(grad)
            scaled = minmax_scale((g * bias.to(g.dtype)[None, :, None, None]).abs().flatten(0, 1), EPS)
            layer = scaled.view(g.shape).sum(dim=1)  # bilinear upsampling is linear: sum first
            up = F.interpolate(layer[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            if total:
                total[0] = total[0] + up
            else:
                total.append(up)

        def hook(module: nn.Module, _i: object, out: object) -> None:
            bias = bias_of(module)
            if bias is not None and isinstance(out, Tensor) and out.ndim == 4 and out.requires_grad:
                out.register_hook(lambda g, bias=bias: add(g, bias))

        counted = [m for m in self.model.modules() if isinstance(m, tuple(_COUNTED))]
        handles = [m.register_forward_hook(hook) for m in counted]
        try:
            with torch.enable_grad():
                for p in self.model.parameters():
                    p.requires_grad_(False)  # restored by attribute(); no weight gradients
                x = inputs.detach().clone().requires_grad_(True)
                scores = target_scores(self.model(x), targets, self.p.score)
                (grad,) = torch.autograd.grad(scores.sum(), x)
        finally:
            for h in handles:
                h.remove()
        g = as_working(grad)
        saliency = minmax_scale((g * inputs.to(g.dtype)).abs().flatten(0, 1), EPS).view(g.shape).sum(dim=1)
        return saliency + total[0] if total else saliency
