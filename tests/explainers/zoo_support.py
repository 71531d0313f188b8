"""The zoo of issue #13: every registered explainer on one small member of every torchvision
classification family, each outcome checked against the method's own property.

Used by ``tests/explainers/test_zoo.py`` (the test) and ``benchmarks/zoo.py`` (which runs
that test and writes ``benchmarks/ZOO.md``); the table is rendered by :func:`render_table`
from the outcomes the test collected, so the published table is the test's own verdict.

What counts
-----------
For each (architecture, explainer) pair exactly one of:

* ``ok (...)``: a float32 map of shape (N, H, W), finite, no image's map all zero, that
  passes the method's check in :data:`CASES` (the parenthesis names the check);
* ``refused: ...``: ``UnsupportedModelError`` whose message names a module type, module
  name or operation of the model (any other exception is a failure);
* ``FAIL: ...``: anything else; the test fails.

Models are built with random weights (``weights=None``, seeded), ``num_classes=10``, float32,
with BatchNorm statistics recalibrated on the inputs (three train-mode passes without
gradients, ``momentum=None``: a cumulative average), then ``eval()``. At raw initialisation
deep BatchNorm nets give logits near 1e-13 and every map underflows.

Reference implementations (pytorch-grad-cam, the in-test oracles) run under
:class:`OutOfPlace`, which makes in-place activations out of place: a hook on a layer
followed by ``F.relu(inplace=True)`` (DenseNet's ``features.norm5``) otherwise records the
post-ReLU tensor, and pytorch-grad-cam's maps are wrong there.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from attriflow.explainers import REGISTRY, Explainer, UnsupportedModelError, get_explainer
from attriflow.explainers._hooks import spatial_layers

# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Arch:
    """One architecture of the zoo: the family it stands for and how it is built."""

    name: str
    family: str
    config: str  # the constructor call, as written in the table
    build: Callable[[], nn.Module]
    size: int = 64


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)

    return build


def _resnet(layers: list[int], **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models.resnet import Bottleneck, ResNet

        return ResNet(Bottleneck, layers, num_classes=10, **kwargs)

    return build


#: One (smallest) member per family. ResNeXt-50 and Wide-ResNet-50 cost 4-5x ResNet-18 per
#: pass; their one-block-per-stage versions keep what makes them different (grouped 32x4d
#: bottlenecks; 2x-wide bottlenecks) at a fifth of the cost.
ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("resnet18", "ResNet", "resnet18()", _tv("resnet18")),
    Arch("resnext_32x4d_1111", "ResNeXt", "ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4)",
         _resnet([1, 1, 1, 1], groups=32, width_per_group=4)),
    Arch("wide_resnet_1111_2", "Wide-ResNet", "ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=128)",
         _resnet([1, 1, 1, 1], width_per_group=128)),
    Arch("vgg11", "VGG", "vgg11()", _tv("vgg11")),
    Arch("vgg11_bn", "VGG-BN", "vgg11_bn()", _tv("vgg11_bn")),
    Arch("alexnet", "AlexNet", "alexnet()", _tv("alexnet")),
    Arch("squeezenet1_1", "SqueezeNet", "squeezenet1_1()", _tv("squeezenet1_1")),
    Arch("densenet121", "DenseNet", "densenet121()", _tv("densenet121")),
    Arch("googlenet", "GoogLeNet", "googlenet(aux_logits=False, init_weights=True)",
         _tv("googlenet", aux_logits=False, init_weights=True)),
    Arch("inception_v3", "Inception-v3", "inception_v3(aux_logits=False, init_weights=True)",
         _tv("inception_v3", aux_logits=False, init_weights=True), size=80),
    Arch("mobilenet_v2", "MobileNetV2", "mobilenet_v2()", _tv("mobilenet_v2")),
    Arch("mobilenet_v3_small", "MobileNetV3", "mobilenet_v3_small()", _tv("mobilenet_v3_small")),
    Arch("mnasnet0_5", "MNASNet", "mnasnet0_5()", _tv("mnasnet0_5")),
    Arch("shufflenet_v2_x0_5", "ShuffleNetV2", "shufflenet_v2_x0_5()", _tv("shufflenet_v2_x0_5")),
    Arch("efficientnet_b0", "EfficientNet", "efficientnet_b0()", _tv("efficientnet_b0")),
    Arch("efficientnet_v2_s", "EfficientNetV2", "efficientnet_v2_s()", _tv("efficientnet_v2_s")),
    Arch("regnet_x_400mf", "RegNet", "regnet_x_400mf()", _tv("regnet_x_400mf")),
    Arch("convnext_tiny", "ConvNeXt", "convnext_tiny()", _tv("convnext_tiny")),
]}

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def images(size: int) -> Tensor:
    """Astronaut and Chelsea (scikit-image's bundled photos), resized, ImageNet-normalised."""
    from skimage import data
    from skimage.transform import resize

    out = []
    for img in (data.astronaut(), data.chelsea()):
        side = min(img.shape[:2])
        sq = img[:side, (img.shape[1] - side) // 2 : (img.shape[1] - side) // 2 + side]
        small = resize(sq, (size, size), anti_aliasing=True)  # float64 in [0, 1]
        out.append(torch.from_numpy(small).permute(2, 0, 1).float())
    x = torch.stack(out)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def recalibrate_batchnorm(model: nn.Module, x: Tensor, passes: int = 3) -> None:
    """Replace every BatchNorm's running statistics by their cumulative average over a few
    train-mode passes of ``x`` (and its mirror image), then put the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for k in range(passes):
            model(x if k % 2 == 0 else x.flip(-1))
    model.eval()


@dataclass
class Zoo:
    """One built architecture with its inputs and the checks' shared (lazy) state."""

    arch: Arch
    model: nn.Module
    x: Tensor
    t: Tensor  # the model's predictions
    runner_up: Tensor  # the second-highest class of each image
    build_s: float
    _cache: dict[str, Any] = field(default_factory=dict)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def build(name: str) -> Zoo:
    """Build, recalibrate (on two images) and freeze architecture ``name``; the first image
    is explained, for the model's prediction."""
    arch = ARCHS[name]
    start = time.perf_counter()
    torch.manual_seed(0)
    model = arch.build().float()
    both = images(arch.size)
    recalibrate_batchnorm(model, both)
    x = both[:1]  # explained: the first image (the suite's time budget)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        logits = model(x)
    top = logits.topk(2, dim=1).indices
    return Zoo(arch, model, x, top[:, 0].clone(), top[:, 1].clone(), time.perf_counter() - start)


# --------------------------------------------------------------------------- reference helpers

_INPLACE_METHODS = {
    torch.Tensor.relu_: torch.relu,
    torch.relu_: torch.relu,
    torch.Tensor.__iadd__: torch.Tensor.__add__,
    torch.Tensor.add_: torch.Tensor.add,
    torch.Tensor.mul_: torch.Tensor.mul,
}


class OutOfPlace(TorchFunctionMode):
    """Within the block every in-place activation and in-place add is computed out of place
    (same values; a hooked layer output is then never overwritten)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, D105
        kwargs = dict(kwargs or {})
        if kwargs.get("inplace"):
            kwargs["inplace"] = False
        func = _INPLACE_METHODS.get(func, func)
        return func(*args, **kwargs)


def overwritten_in_place(model: nn.Module, layer: str, x: Tensor) -> bool:
    """True when the output of ``layer`` is modified in place later in the forward pass."""
    seen: list[tuple[Tensor, int]] = []
    module = dict(model.named_modules())[layer.split("#")[0]]
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append((out, out._version)))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    return any(out._version != v for out, v in seen)


#: Element-wise operations the guided/deconv oracle has a rule for, and those it has not.
_UNRULED = {
    "silu": (F.silu, torch.nn.functional.silu),
    "gelu": (F.gelu,),
    "hardswish": (F.hardswish,),
    "hardsigmoid": (F.hardsigmoid,),
    "sigmoid": (torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid),
    "tanh": (torch.tanh, torch.Tensor.tanh, F.tanh),
    "elu": (F.elu,),
    "leaky_relu": (F.leaky_relu,),
    "mish": (F.mish,),
    "softplus": (F.softplus,),
    "layer_norm": (F.layer_norm,),
}
_UNRULED_FUNCS = {f: name for name, fs in _UNRULED.items() for f in fs}
_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class _OracleReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, mode: str, upper: float | None) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.mode, ctx.upper = mode, upper
        return x.clamp(0, upper)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        (x,) = ctx.saved_tensors
        if ctx.mode == "deconv":
            return grad.clamp_min(0), None, None
        live = x > 0 if ctx.upper is None else (x > 0) & (x < ctx.upper)
        g = grad.clamp_min(0) if ctx.mode == "guided" else grad
        return g * live, None, None


class ReluRules(TorchFunctionMode):
    """Every ReLU, module or functional (``F.relu``, ``torch.relu_``), and ReLU6 gets the
    ``guided`` / ``deconv`` / ``plain`` backward; other non-linearities are recorded in
    ``unruled`` (the oracle has no rule for them)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.unruled: set[str] = set()
        self.relu6 = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, D105
        kwargs = dict(kwargs or {})
        if func in _RELU_FUNCS:
            return _OracleReLU.apply(args[0], self.mode, None)
        if func is F.hardtanh or func is F.relu6:
            lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
            hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
            if func is F.relu6:
                lo, hi = 0.0, 6.0
            if lo == 0.0:
                self.relu6 = True
                return _OracleReLU.apply(args[0], self.mode, float(hi))
            self.unruled.add("hardtanh")
        elif func in _UNRULED_FUNCS:
            self.unruled.add(_UNRULED_FUNCS[func])
        if kwargs.get("inplace"):
            kwargs["inplace"] = False
        return _INPLACE_METHODS.get(func, func)(*args, **kwargs)


def oracle_gradient(model: nn.Module, x: Tensor, t: Tensor, mode: str) -> tuple[Tensor, set[str], bool]:
    """Input gradient of the target logits with every ReLU's backward replaced by ``mode``;
    also the non-linearities without a rule and whether a ReLU6 was met."""
    rules = ReluRules(mode)
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad(), rules:
        out = model(xg)
        (grad,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), xg)
    return grad, rules.unruled, rules.relu6


def close(ours: Tensor, ref: Tensor, rel: float) -> float:
    """Largest error relative to each reference map's max; raises above ``rel``."""
    ours, ref = ours.detach().double(), ref.detach().double()
    scale = ref.abs().flatten(1).amax(1).clamp_min(1e-30).view(-1, *[1] * (ref.ndim - 1))
    err = float(((ours - ref).abs() / scale).max())
    assert err <= rel, f"differs from the reference by {err:.2g} of its max (tolerance {rel:g})"
    return err


def minmax(m: Tensor) -> Tensor:
    """pytorch-grad-cam's ``scale_cam_image`` without the resize."""
    flat = m.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return (m - lo) / (1e-7 + hi - lo)


def cheap_layer(z: Zoo, max_channels: int = 64) -> str:
    """Deepest module with a spatial output of at most ``max_channels`` channels (Score-CAM
    and Ablation-CAM make one pass per channel; so do their pytorch-grad-cam peers)."""
    def find() -> str:
        layers = [(n, shape) for n, shape in spatial_layers(z.model, z.x[:1]) if not channels_last(z, n)]
        narrow = [n for n, shape in layers if shape[1] <= max_channels]
        return narrow[-1] if narrow else min(reversed(layers), key=lambda ls: ls[1][1])[0]

    return str(z.cached(f"cheap_layer{max_channels}", find))


def channels_last(z: Zoo, name: str) -> bool:
    """Whether module ``name`` computes on (N, H, W, C) tensors (ConvNeXt's Linear and
    LayerNorm between its permutes): not a layer of channels for a CAM."""
    module = dict(z.model.named_modules())[name]
    return isinstance(module, (nn.Linear, nn.LayerNorm, nn.GELU)) or type(module).__name__ == "Permute" and \
        list(getattr(module, "dims", [])) == [0, 2, 3, 1]


def fem_layer(z: Zoo) -> str:
    """Deepest module with a spatial output of at least 3x3 positions."""
    def find() -> str:
        layers = spatial_layers(z.model, z.x[:1])
        return [n for n, shape in layers if shape[-1] * shape[-2] >= 9 and not channels_last(z, n)][-1]

    return str(z.cached("fem_layer", find))


def logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def bias_free(z: Zoo) -> nn.Module:
    """A copy with every bias and BatchNorm shift zeroed (``bias = 0``, ``running_mean = 0``):
    the layers then are linear, so a conservative LRP rule must sum to the logit."""
    def make() -> nn.Module:
        net = copy.deepcopy(z.model)
        with torch.no_grad():
            for m in net.modules():
                if getattr(m, "bias", None) is not None and isinstance(m.bias, Tensor):
                    m.bias.zero_()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    m.running_mean.zero_()
        return net

    return z.cached("bias_free", make)


# --------------------------------------------------------------------------- checks

Check = Callable[[Zoo, Explainer, Tensor], str]


def check_target_dependent(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """No oracle: the first image's map must change when the runner-up class is explained
    instead (same seed)."""
    seeds = {"seeds": torch.tensor([11])} if exp.spec.stochastic else {}  # the first image's seed
    other = exp.attribute(z.x[:1], z.runner_up[:1], **seeds)
    assert torch.isfinite(other).all(), "non-finite map for the runner-up class"
    # bit-identical maps for two targets under one seed: the target never reached the map
    # (NeuroMask on a net whose softmax is nearly uniform, as random AlexNet's, moves little)
    assert not torch.equal(other[0], out[0]), "the map does not change when another class is explained"
    return "finite, target-dependent"


def check_baseline(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """A sanity baseline reads no model: its map equals its definition computed here
    (``sobel``: scikit-image's ``filters.sobel`` of the channel mean; ``centred_gaussian``:
    the closed form; ``random_map``: the same draws again from the first image's seed)."""
    if exp.spec.name == "sobel":
        from skimage.filters import sobel

        ref = torch.from_numpy(np.stack([sobel(x.mean(0).double().numpy()) for x in z.x])).float()
        close(out, ref, 1e-5)
        return "skimage sobel"
    if exp.spec.name == "centred_gaussian":
        h, w = out.shape[-2:]
        yy, xx = np.mgrid[:h, :w]
        ref = np.exp(-0.5 * (((yy - (h - 1) / 2) / (0.25 * h)) ** 2 + ((xx - (w - 1) / 2) / (0.25 * w)) ** 2))
        close(out, torch.from_numpy(ref).float().expand_as(out), 1e-6)
        return "closed form"
    assert exp.spec.name == "random_map", exp.spec.name
    again = torch.rand(out.shape[-2:], generator=torch.Generator().manual_seed(11))
    assert torch.equal(out[0], again), "the first image's map is not its seed's draws"
    return "seeded draws"


def captum_check(cls_name: str, reduce: str, **kwargs: Any) -> Check:
    def check(z: Zoo, exp: Explainer, out: Tensor) -> str:
        import captum.attr

        ref = getattr(captum.attr, cls_name)(z.model).attribute(z.x.clone().requires_grad_(), target=z.t,
                                                                 **kwargs)
        ref = ref.sum(1) if reduce == "sum" else ref.abs().amax(1)
        close(out, ref, 1e-3)
        return "captum"

    return check


def guided_check(mode: str) -> Check:
    """Equality with the oracle that applies the rule to every ReLU, module or functional;
    where the model has non-linearities with no such rule the explainer must refuse."""
    def check(z: Zoo, exp: Explainer, out: Tensor) -> str:
        grad, unruled, relu6 = oracle_gradient(z.model, z.x, z.t, mode)
        assert not unruled, (
            f"ran on a model with {', '.join(sorted(unruled))}, for which {mode} back-propagation has "
            "no rule (expected UnsupportedModelError)")
        plain, _, _ = oracle_gradient(z.model, z.x, z.t, "plain")
        close(out, grad.abs().amax(1), 1e-3)
        assert not torch.allclose(grad, plain), "the rule changed nothing (equals the plain gradient)"
        return "oracle, ReLU6 rule" if relu6 else "oracle"

    return check


def check_deeplift(z: Zoo, exp: Explainer, out: Tensor) -> str:
    fx = logits(z.model, z.x).gather(1, z.t[:, None])[:, 0].double()
    delta = fx - logits(z.model, torch.zeros_like(z.x)).gather(1, z.t[:, None])[:, 0].double()
    total = out.double().sum(dim=(1, 2))
    err = float(((total - delta).abs() / (delta.abs() + 1e-3 * fx.abs())).max())
    assert err <= 1e-3, f"summation to delta: sum {total.tolist()} vs {delta.tolist()} ({err:.2g} off)"
    return f"summation-to-delta {err:.0e}"


def check_deeplift_shap(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """Summation to delta against the mean reference: sum = f(x) - mean_k f(b_k), with the
    references the first image's seed draws."""
    refs = torch.randn((exp.p.baselines, *z.x.shape[1:]), generator=torch.Generator().manual_seed(11))
    refs = refs.to(z.x) * exp.p.baseline_std
    t = z.t[:1]
    fx = logits(z.model, z.x[:1]).gather(1, t[:, None])[:, 0].double()
    delta = fx - logits(z.model, refs)[:, int(t)].double().mean()
    total = out[:1].double().sum(dim=(1, 2))
    err = float(((total - delta).abs() / (delta.abs() + 1e-3 * fx.abs())).max())
    assert err <= 1e-3, f"summation to delta: sum {total.tolist()} vs {delta.tolist()} ({err:.2g} off)"
    return f"summation-to-delta {err:.0e}"


def conservation_check(params: dict[str, Any], rtol: float, positive_rule: bool = False) -> Check:
    """Run the rule (with ``params``) on the bias-free copy in float64 (a bias-free deep net's
    activations grow large: float32 sums lose the digits): the map sums to the logit.

    ``positive_rule`` (z+ and alpha1-beta0 convolutions): where a convolution's output is not
    rectified (the linear bottlenecks of MobileNet, MNASNet, ShuffleNet, EfficientNet), units
    with no positive contribution still receive relevance from the next layer and z+ cannot
    pass it on: the rule drops it, by its definition (zennit's ZPlus does the same). There
    the check is that relevance is only dropped, never created: 0 < sum <= logit, and the
    cell shows the share kept."""
    def check(z: Zoo, exp: Explainer, out: Tensor) -> str:
        net = z.cached("bias_free64", lambda: copy.deepcopy(bias_free(z)).double())
        x = z.x.double()
        lg = logits(net, x)
        t = lg.argmax(1)
        target = lg.gather(1, t[:, None])[:, 0]
        rel = get_explainer(exp.spec.name)(net, **params).attribute(x, t).double()
        assert torch.isfinite(rel).all(), "non-finite map on the bias-free copy"
        total = rel.sum(dim=(1, 2))
        err = float(((total - target).abs() / target.abs()).max())
        if err <= rtol:
            return f"conservation {err:.0e}"
        kept = total / target
        assert positive_rule and bool(((kept > 0) & (kept <= 1 + rtol)).all()), (
            f"conservation on the bias-free copy: sum {total.tolist()} vs logit "
            f"{target.tolist()} ({err:.2g} off, tolerance {rtol:g})")
        return f"keeps {float(kept.min()):.0%}-{float(kept.max()):.0%}: z+ drops unrectified units"

    return check


def _layer(exp: Explainer, x: Tensor) -> str:
    inner = getattr(exp, "cam", exp)
    return str(inner.layer_name(x))


def gradcam_peer(ref_name: str) -> Check:
    """pytorch-grad-cam on the same layer (run with in-place ops made out of place); it
    min-max scales per layer and after aggregation, and minmax of our bilinear upsampling
    equals that (min-max commutes with the linear upsampling)."""
    def check(z: Zoo, exp: Explainer, out: Tensor) -> str:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        x, t = z.x, z.t
        layer = _layer(exp, x)
        module = dict(z.model.named_modules())[layer.split("#")[0]]
        with OutOfPlace(), getattr(pytorch_grad_cam, ref_name)(model=z.model, target_layers=[module]) as cam:
            cam.batch_size = 64
            ref = cam(input_tensor=x.clone().requires_grad_(), targets=[ClassifierOutputTarget(int(c)) for c in t])
        # pytorch-grad-cam clamps at 0, min-max scales at the layer's resolution, upsamples
        # (cv2) and scales again; ours returns the bilinear upsampling of the layer map
        inner = getattr(exp, "cam", exp)
        low = inner.layer_map(x, t).double()
        close(out, _up(low, x.shape[-2:]), 1e-5)
        scaled = minmax(_up(minmax(low.clamp_min(0)), x.shape[-2:]).clamp_min(0))
        np.testing.assert_allclose(scaled.numpy(), ref, atol=2e-3,
                                   err_msg=f"differs from pytorch-grad-cam {ref_name} at {layer}")
        note = "grad-cam, out-of-place" if overwritten_in_place(z.model, layer, x) else "grad-cam"
        return f"{note} @{layer}"

    return check


def _acts(z: Zoo, layer: str, x: Tensor) -> Tensor:
    store: dict[str, Tensor] = {}
    module = dict(z.model.named_modules())[layer.split("#")[0]]
    handle = module.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o.detach().clone()))
    try:
        with torch.no_grad(), OutOfPlace():
            z.model(x)
    finally:
        handle.remove()
    return store["a"]


def _up(low: Tensor, size: torch.Size) -> Tensor:
    return F.interpolate(low[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def check_eigen_cam(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """pytorch-grad-cam's SVD projection of the activations, up to its LAPACK sign."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    layer = _layer(exp, z.x)
    ref = _up(torch.from_numpy(get_2d_projection(_acts(z, layer, z.x).double().numpy())), z.x.shape[-2:])
    for i in range(len(z.x)):
        sign = 1.0 if float((out[i].double() * ref[i]).sum()) >= 0 else -1.0
        close(out[i : i + 1], sign * ref[i : i + 1], 1e-3)
    return f"grad-cam projection ±, @{layer}"


def check_projection_cam(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """Eigen-Grad-CAM: pytorch-grad-cam's SVD projection of gradients x activations;
    KPCA-CAM: its kernel-PCA projection of the activations; both up to sign."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection, get_2d_projection_kernel

    layer = _layer(exp, z.x)
    acts, grads = get_explainer("grad_cam")(z.model, layer=layer).activations(z.x, z.t)
    if exp.spec.name == "eigen_grad_cam":
        low = get_2d_projection((grads * acts).double().numpy())
    else:
        low = get_2d_projection_kernel(acts.double().numpy(), exp.p.kernel, exp.p.gamma)
    ref = _up(torch.from_numpy(low).double(), z.x.shape[-2:])
    for i in range(len(z.x)):
        sign = 1.0 if float((out[i].double() * ref[i]).sum()) >= 0 else -1.0
        close(out[i : i + 1], sign * ref[i : i + 1], 1e-3)
    return f"grad-cam projection ±, @{layer}"


def check_fem(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """The formula by hand: sum_k mean_k [A_k >= mean_k + 2 std_k] (pytorch-grad-cam's FEM
    weights by the fraction above threshold instead, a different method)."""
    layer = _layer(exp, z.x)
    a = _acts(z, layer, z.x).double()
    mu = a.mean(dim=(2, 3), keepdim=True)
    sd = a.std(dim=(2, 3), keepdim=True, unbiased=False)
    low = (mu * (a >= mu + 2 * sd)).sum(1)
    close(out, _up(low.clamp_min(0) if exp.p.relu else low, z.x.shape[-2:]), 1e-3)
    return f"by hand @{layer}"


def check_cam(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """On a ``layer -> global average pool -> linear`` head the map's mean plus the bias is
    the logit; anything between the layer and the pool breaks that."""
    low = exp.layer_map(z.x, z.t).double()  # type: ignore[attr-defined]
    fc = exp.fc  # type: ignore[attr-defined]
    bias = fc.bias.detach().double()[z.t] if fc.bias is not None else 0.0
    lg = logits(z.model, z.x).gather(1, z.t[:, None])[:, 0].double()
    got = low.mean(dim=(1, 2)) + bias
    err = float(((got - lg).abs() / lg.abs()).max())
    assert err <= 1e-4, f"mean(map) + bias = {got.tolist()} but the logits are {lg.tolist()}: not a GAP-linear head"
    close(out, _up(low, z.x.shape[-2:]), 1e-4)
    return "GAP identity"


def check_guided_grad_cam(z: Zoo, exp: Explainer, out: Tensor) -> str:
    grad, unruled, _ = oracle_gradient(z.model, z.x, z.t, "guided")
    assert not unruled, (f"ran on a model with {', '.join(sorted(unruled))}, for which guided "
                         "back-propagation has no rule (expected UnsupportedModelError)")
    layer = _layer(exp, z.x)
    module = dict(z.model.named_modules())[layer.split("#")[0]]
    store: dict[str, Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
    try:
        with torch.enable_grad(), OutOfPlace():
            scores = z.model(z.x.clone().requires_grad_(True)).gather(1, z.t[:, None]).sum()
            (g,) = torch.autograd.grad(scores, store["a"])
    finally:
        handle.remove()
    a = store["a"].detach()
    low = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1).clamp_min(0)
    ref = (grad * _up(low, z.x.shape[-2:])[:, None]).abs().amax(1)
    close(out, ref, 1e-3)
    return f"oracle x Grad-CAM @{layer}"


def check_ablation_cam(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """pytorch-grad-cam where the layer is rectified (its minimum is 0, the ablation value);
    on a signed layer its AblationLayer recomputes ``min(output) - 1e7`` after each channel
    it ablates, so the value drifts by 1e7 per channel of the batch: there the oracle is the
    method by hand, one whole-network evaluation per channel with the channel set to
    ``min - 1e7`` by a forward hook (16 channels' copies of the image per pass)."""
    layer = _layer(exp, z.x)
    a = _acts(z, layer, z.x)
    if float(a.min()) == 0.0:
        return gradcam_peer("AblationCAM")(z, exp, out)
    module = dict(z.model.named_modules())[layer]
    y = logits(z.model, z.x)[0, z.t[0]]
    weights = []
    channels = a.shape[1]
    for first in range(0, channels, 16):  # 16 copies of the image per pass, copy j ablating one channel
        ks = list(range(first, min(first + 16, channels)))

        def ablate(_m: nn.Module, _i: object, o: Tensor, ks: list[int] = ks) -> Tensor:
            o = o.clone()
            for j, k in enumerate(ks):
                o[j, k] = a.min() - 1e7
            return o

        handle = module.register_forward_hook(ablate)
        try:
            weights.extend((y - logits(z.model, z.x[:1].expand(len(ks), *z.x.shape[1:]))[:, z.t[0]]) / y)
        finally:
            handle.remove()
    low = (torch.stack(weights)[:, None, None] * a[0]).sum(0)[None]
    low = low.clamp_min(0) if exp.p.relu else low
    close(out, _up(low, z.x.shape[-2:]), 1e-6)
    return f"by hand (signed layer) @{layer}"


def check_occlusion(z: Zoo, exp: Explainer, out: Tensor) -> str:
    from captum.attr import Occlusion

    w = exp.p.window
    s = exp.p.stride
    ref = Occlusion(z.model).attribute(z.x, target=z.t, sliding_window_shapes=(3, w, w), strides=(3, s, s),
                                       baselines=0.0, perturbations_per_eval=64)
    close(out, ref[:, 0], 1e-3)
    return "captum"


def check_superpixels(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """= Captum's FeatureAblation / ShapleyValueSampling / Lime / KernelShap on the same (grid)
    superpixels; the permutations and coalitions are the first image's seed's, drawn by
    Captum from the global generator."""
    import captum.attr

    from attriflow.explainers._segments import segment

    labels = segment(z.x[:1], exp.p)[0]
    kw: dict[str, Any] = {"feature_mask": labels[None, None], "target": z.t[:1], "perturbations_per_eval": 16}
    peer = {"feature_ablation": "FeatureAblation", "shapley_sampling": "ShapleyValueSampling", "lime": "Lime",
            "kernel_shap": "KernelShap"}[exp.spec.name]
    if exp.spec.name != "feature_ablation":  # the first image's seed: the same permutations or coalitions
        torch.manual_seed(11)
        kw["n_samples"] = exp.p.samples
    if exp.spec.name == "lime":
        from captum._utils.models.linear_model import SkLearnLasso, SkLearnLinearRegression

        surrogate = SkLearnLasso(alpha=exp.p.alpha) if exp.p.alpha > 0 else SkLearnLinearRegression()
        explainer = captum.attr.Lime(z.model, interpretable_model=surrogate)
    else:
        explainer = getattr(captum.attr, peer)(z.model)
    ref = explainer.attribute(z.x[:1], **kw)
    close(out[:1], ref[:, 0], 1e-3)
    return "captum"


def check_gradient_shap(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """= Captum's GradientShap given the same draws (the first image's seed, in the order
    ``gradient_shap`` documents): its baseline choice, path points and noise replaced by ours."""
    import captum.attr

    g = torch.Generator().manual_seed(11)
    shape = tuple(z.x.shape[1:])
    base, alpha = [], []
    for _ in range(exp.p.samples):
        base.append(torch.randn(shape, generator=g) * exp.p.baseline_std)
        alpha.append(torch.rand((), generator=g))
    saved = np.random.choice, np.random.uniform
    np.random.choice = lambda k, size: np.arange(size)  # type: ignore[assignment]
    np.random.uniform = lambda lo, hi, size: torch.stack(alpha).double().numpy()  # type: ignore[assignment]
    try:
        ref = captum.attr.GradientShap(z.model).attribute(z.x[:1], baselines=torch.stack(base).to(z.x),
                                                          target=z.t[:1], n_samples=exp.p.samples)
    finally:
        np.random.choice, np.random.uniform = saved
    close(out[:1], ref.sum(1), 1e-3)
    return "captum"


def check_pair(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """= PAIR's BlurIG / GuidedIG (summed over channels) / XRAI (``saliency`` 0.2.1) on the first image."""
    import saliency.core as saliency

    def call(batch, call_model_args=None, expected_keys=None):
        x = torch.from_numpy(np.asarray(batch)).permute(0, 3, 1, 2).to(z.x.dtype).contiguous()
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(z.model(x)[:, int(z.t[0])].sum(), x)
        return {saliency.INPUT_OUTPUT_GRADIENTS: grad.permute(0, 2, 3, 1).double().numpy()}

    img = z.x[0].permute(1, 2, 0).double().numpy()
    if exp.spec.name == "blur_ig":
        ref = saliency.BlurIG().GetMask(img, call, steps=exp.p.steps, max_sigma=exp.p.max_sigma, batch_size=1)
    elif exp.spec.name == "xrai":  # our regions (= PAIR's, test_xrai.py; its own take 1.5 s an image)
        from attriflow.explainers.methods.xrai import _masks_of

        params = saliency.XRAIParameters(steps=exp.p.steps, algorithm=exp.p.algorithm)
        ref = saliency.XRAI().GetMask(img, call, segments=list(_masks_of(img)), batch_size=16,
                                      extra_parameters=params)[..., None]
    else:
        quantile = np.quantile  # PAIR passes NumPy 1's interpolation= keyword
        np.quantile = lambda a, q, interpolation="linear", **kw: quantile(a, q, method=interpolation, **kw)
        try:
            ref = saliency.GuidedIG().GetMask(img, call, x_steps=exp.p.steps, max_dist=exp.p.max_dist)
        finally:
            np.quantile = quantile
    close(out[:1], torch.from_numpy(ref.sum(-1))[None], 1e-3)
    return "PAIR"


class _TorchFloat64Ones:
    """``torch`` for TorchRay's extremal-perturbation module, except that ``ones`` (its mask
    parameters ``pmask`` and area reference) defaults to float64."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def ones(*size: Any, **kwargs: Any) -> Tensor:
        kwargs.setdefault("dtype", torch.float64)
        return torch.ones(*size, **kwargs)


class _FunctionalTapsToInput:
    """``torch.nn.functional`` for ``torchray.utils.imsmooth``, except that ``conv2d`` casts the
    float32 Gaussian taps to the image's dtype (their values unchanged)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)

    @staticmethod
    def conv2d(x: Tensor, weight: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return F.conv2d(x, weight.to(x.dtype), *args, **kwargs)


def torchray_extremal_perturbation(model: nn.Module, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
    """TorchRay's ``extremal_perturbation(model, x[i:i+1], int(t[i]), **kwargs)`` mask per image,
    shape (N, H, W). For float64 inputs TorchRay runs in float64: as written it keeps its mask
    parameters in float32 (``torch.ones``) and cannot convolve a float64 image with its float32
    blur taps, so those two are made float64 (the taps' float32 values kept). The model's
    ``requires_grad`` flags, which TorchRay switches off, are restored."""
    import torchray.attribution.extremal_perturbation as ep
    import torchray.utils

    flags = [p.requires_grad for p in model.parameters()]
    saved = ep.torch, torchray.utils.F
    if x.dtype == torch.float64:
        ep.torch, torchray.utils.F = _TorchFloat64Ones(), _FunctionalTapsToInput()
    try:
        masks = [ep.extremal_perturbation(model, x[i : i + 1], int(t[i]), **kwargs)[0] for i in range(len(x))]
    finally:
        ep.torch, torchray.utils.F = saved
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return torch.cat(masks)[:, 0]


def check_extremal_perturbation(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """= TorchRay's ``extremal_perturbation`` (float64) with the same settings."""
    from torchray.attribution.extremal_perturbation import contrastive_reward, simple_reward

    p = exp.p
    fixed = (p.max_blur, p.learning_rate, p.momentum, p.regul_weight, p.regul_growth)
    assert fixed == (20, 0.01, 0.9, 300, 1.0035), "TorchRay fixes max_blur, learning_rate, momentum, regul_*"
    ref = torchray_extremal_perturbation(z.model, z.x[:1], z.t[:1], areas=[p.area], max_iter=p.iterations,
                                         variant=p.variant, perturbation=p.perturbation, step=p.step,
                                         sigma=p.sigma, num_levels=p.num_levels, jitter=p.jitter,
                                         smooth=p.smooth, reward_func=contrastive_reward
                                         if p.reward == "contrastive" else simple_reward)
    close(out[:1], ref, 1e-6)
    return "TorchRay"


@dataclass(frozen=True)
class Case:
    """How one explainer is run in the zoo and what its map must satisfy."""

    check: Check
    params: Callable[[Zoo], dict[str, Any]] = lambda z: {}
    one_image: bool = False  # per-channel methods: the first image only (cost)
    double: bool = False  # run (and check) on a float64 copy of the model and inputs
    note: str = ""  # what the check asserts, for the table's legend


def _cheap(extra: dict[str, Any] | None = None, max_channels: int = 64) -> Callable[[Zoo], dict[str, Any]]:
    return lambda z: {"layer": cheap_layer(z, max_channels), **(extra or {})}


CASES: dict[str, Case] = {
    "saliency": Case(captum_check("Saliency", "max_abs", abs=True), note="= Captum Saliency (max |grad|)"),
    "gradient_x_input": Case(captum_check("InputXGradient", "sum"), note="= Captum InputXGradient"),
    "integrated_gradients": Case(captum_check("IntegratedGradients", "sum", n_steps=8), lambda z: {"steps": 8},
                                 note="8 Gauss-Legendre steps; = Captum IntegratedGradients (same steps and "
                                      "rule). Completeness is not asserted: along the path from 0 to x these "
                                      "random nets vary 50-100x more than f(x) - f(0), and the sum misses the gap "
                                      "by several times the gap even at 128 steps"),
    "smooth_grad": Case(check_target_dependent, lambda z: {"samples": 3}, one_image=True,
                        note="first image, 3 samples; no oracle (own noise): finite, non-zero, changes with the target"),
    "guided_backprop": Case(guided_check("guided"),
                            note="= an oracle that guides every ReLU, module or functional (Captum sees only "
                                 "nn.ReLU; equal to Captum on nets whose ReLUs are all modules), and != the "
                                 "plain gradient; must refuse where other non-linearities are met"),
    "deconvnet": Case(guided_check("deconv"), note="as guided_backprop, with the deconvnet rule"),
    "deeplift": Case(check_deeplift, note="summation to delta: sum = f(x) - f(0) within 1e-3"),
    "lrp_epsilon": Case(conservation_check({"epsilon": 1e-6}, 1e-3),
                        note="default epsilon on the model; epsilon=1e-6 on the bias-free copy sums to the "
                             "logit within 1e-3"),
    "lrp_zplus": Case(conservation_check({}, 1e-3, positive_rule=True),
                      note="bias-free copy (float64) sums to the logit within 1e-3, or, on linear "
                           "bottlenecks, keeps a share in (0, 1] (z+ drops relevance at unrectified units)"),
    "lrp_alpha_beta": Case(conservation_check({"alpha": 1.0, "beta": 0.0}, 1e-3, positive_rule=True),
                           note="default alpha2-beta1 on the model; alpha1-beta0 (the conservative member) "
                                "on the bias-free copy sums to the logit within 1e-3 (or keeps a share "
                                "in (0, 1] on linear bottlenecks, as lrp_zplus)"),
    "lrp_composite": Case(conservation_check({}, 1e-3, positive_rule=True),
                          note="epsilon-plus-flat on the bias-free copy sums to the logit within 1e-3 "
                               "(or keeps a share in (0, 1] on linear bottlenecks, as lrp_zplus)"),
    "cam": Case(check_cam, note="mean(map) + bias = logit (true only for layer -> GAP -> linear); refusal expected "
                                "elsewhere"),
    "grad_cam": Case(gradcam_peer("GradCAM"), note="= pytorch-grad-cam after its min-max scaling"),
    "grad_cam_plus_plus": Case(gradcam_peer("GradCAMPlusPlus"), note="= pytorch-grad-cam"),
    "xgrad_cam": Case(gradcam_peer("XGradCAM"), note="= pytorch-grad-cam"),
    "layer_cam": Case(gradcam_peer("LayerCAM"), note="= pytorch-grad-cam"),
    "eigen_cam": Case(check_eigen_cam, lambda z: {"relu": False},
                      note="relu=False; = pytorch-grad-cam's get_2d_projection up to sign"),
    "fem": Case(check_fem, lambda z: {"layer": fem_layer(z), "relu": False},
                note="relu=False; deepest layer with at least 3x3 positions (FEM refuses 2x2 layers, where no "
                     "activation can pass its threshold: the default layer at 64 px); = the formula by hand "
                     "on the captured activations"),
    "hires_cam": Case(gradcam_peer("HiResCAM"), note="= pytorch-grad-cam"),
    "grad_cam_elementwise": Case(gradcam_peer("GradCAMElementWise"), note="= pytorch-grad-cam"),
    "eigen_grad_cam": Case(check_projection_cam, lambda z: {"relu": False},
                           note="relu=False; = grad-cam's get_2d_projection of grads x acts up to sign"),
    "kpca_cam": Case(check_projection_cam, lambda z: {"relu": False}, one_image=True,
                     note="first image, relu=False; = pytorch-grad-cam's kernel-PCA projection up to sign"),
    "guided_grad_cam": Case(check_guided_grad_cam, note="= guided oracle x bilinear Grad-CAM"),
    "score_cam": Case(gradcam_peer("ScoreCAM"),
                      _cheap({"score": "logit", "channel_softmax": True, "align_corners": True}), one_image=True,
                      note="first image; deepest layer with <= 64 channels; pytorch-grad-cam's settings; "
                           "= pytorch-grad-cam"),
    "ablation_cam": Case(check_ablation_cam, _cheap({"relu": False}, 24), one_image=True, double=True,
                         note="first image, float64 (on a signed layer the ablation value, min - 1e7, makes "
                              "float32 scores of 1e7 whose rounding both implementations differ in); deepest "
                              "layer with <= 24 channels; relu=False (at a shallow layer "
                              "of a random net every ablation may raise the score: the ReLU'd map is then "
                              "legitimately zero); = pytorch-grad-cam after its ReLU and min-max scaling on "
                              "rectified layers; on signed layers (pytorch-grad-cam's ablation value drifts "
                              "there) = the method by hand, one hooked whole-network pass per channel"),
    "sise": Case(check_target_dependent, lambda z: {"mu": 0.5}, one_image=True,
                 note="first image, mu=0.5 (fewer kept maps); no oracle: finite, non-zero, changes with the target"),
    "occlusion": Case(check_occlusion, lambda z: {"window": z.arch.size // 4, "stride": z.arch.size // 4},
                      one_image=True, note="first image, window = stride = size/4; = Captum Occlusion"),
    "rise": Case(check_target_dependent, lambda z: {"masks": 32}, one_image=True,
                 note="first image, 32 masks; no oracle: finite, non-zero, changes with the target"),
    "neuromask": Case(check_target_dependent, lambda z: {"iterations": 10}, one_image=True,
                      note="first image, 10 iterations; no oracle: finite, non-zero, changes with the target"),
    "extremal_perturbation": Case(check_extremal_perturbation, lambda z: {"iterations": 3}, one_image=True,
                                  double=True, note="first image, float64, 3 iterations (TorchRay's other "
                                                    "defaults: area 0.1, step 7, sigma 21, blur 20); = "
                                                    "TorchRay extremal_perturbation"),
    "feature_ablation": Case(check_superpixels, lambda z: {"segmentation": "grid", "segments": 6}, one_image=True,
                             note="first image, 6 grid cells; = Captum FeatureAblation"),
    "shapley_sampling": Case(check_superpixels, lambda z: {"segmentation": "grid", "segments": 4, "samples": 2},
                             one_image=True, note="first image, 4 grid cells, 2 permutations; = Captum "
                                                  "ShapleyValueSampling under the same permutations"),
    "gradient_shap": Case(check_gradient_shap, lambda z: {"samples": 3}, one_image=True, double=True,
                          note="first image, float64 (at Gaussian baselines these random nets' float32 "
                               "gradients change with the memory layout by up to their max), 3 draws; = "
                               "Captum GradientShap given the same draws"),
    "lime": Case(check_superpixels, lambda z: {"segmentation": "grid", "segments": 4, "samples": 12, "alpha": 0.0},
                 one_image=True, note="first image, 4 grid cells, 12 coalitions, unpenalised surrogate; = Captum Lime"),
    "kernel_shap": Case(check_superpixels, lambda z: {"segmentation": "grid", "segments": 4, "samples": 12},
                        one_image=True, note="first image, 4 grid cells, 12 coalitions; = Captum KernelShap"),
    "blur_ig": Case(check_pair, lambda z: {"steps": 4, "max_sigma": 4.0}, one_image=True, double=True,
                    note="first image, float64 (a sum of terms that cancel: float32 rounding of the "
                         "blurred path moves random nets' maps by 0.4-5 % of their max), 4 steps to sigma 4; "
                         "= PAIR BlurIG"),
    "guided_ig": Case(check_pair, lambda z: {"steps": 4}, one_image=True, double=True,
                      note="first image, float64 (the adaptive path follows the order of the gradients, "
                           "which float32 rounding changes), 4 steps; = PAIR GuidedIG"),
    "xrai": Case(check_pair, lambda z: {"steps": 2}, one_image=True, double=True,
                 note="first image, float64, 2 steps per baseline (its ends); = PAIR XRAI (its IG from "
                      "the image's min and max, summed in float32, and its greedy regions) given our "
                      "Felzenszwalb regions, which test_xrai.py proves equal to PAIR's"),
    "deeplift_shap": Case(check_deeplift_shap, lambda z: {"baselines": 2}, one_image=True,
                          note="first image, 2 references; sum = f(x) - mean f(reference) within 1e-3"),
    "random_map": Case(check_baseline, note="sanity baseline: the first image's seeded draws"),
    "centred_gaussian": Case(check_baseline, note="sanity baseline: = the closed form"),
    "sobel": Case(check_baseline, note="sanity baseline: = scikit-image's filters.sobel of the channel mean"),
}


def check_fullgrad(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """pytorch-grad-cam's FullGrad (all conv and batch-norm biases, no target layer); it
    min-max scales the sum at the end, which ours is not."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with pytorch_grad_cam.FullGrad(model=z.model, target_layers=[]) as cam:
        targets = [ClassifierOutputTarget(int(c)) for c in z.t]
        ref = cam(input_tensor=z.x.clone().requires_grad_(), targets=targets)
    np.testing.assert_allclose(minmax(out.double()).numpy(), ref, atol=2e-3, err_msg="differs from FullGrad")
    return "grad-cam"


def check_finer_cam(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """pytorch-grad-cam's FinerCAM (GradCAM base) with ``target_idx`` = each image's target,
    on the same layer, after its min-max scaling (as :func:`gradcam_peer`)."""
    import pytorch_grad_cam

    layer = _layer(exp, z.x)
    module = dict(z.model.named_modules())[layer.split("#")[0]]
    refs, how = [], "FinerCAM"
    for i in range(len(z.x)):
        xi, c, ranks = z.x[i : i + 1].clone().requires_grad_(), int(z.t[i]), list(exp.p.comparison_categories)
        with torch.no_grad():
            logits = z.model(z.x[i : i + 1])[0].double()
        order = np.argsort(np.abs(logits.numpy() - logits[c].item()))
        classes = [int(order[r]) for r in ranks if r < len(logits)]
        if float(torch.softmax(logits, 0)[classes].sum()) > 1e-6:
            with OutOfPlace(), pytorch_grad_cam.FinerCAM(model=z.model, target_layers=[module]) as cam:
                refs.append(cam(xi, alpha=exp.p.alpha, target_idx=c, comparison_categories=ranks))
            continue
        # a saturated softmax: FinerCAM's 1e-9 guard dominates (its map is 0); GradCAM of the
        # weighted mean of differences, the definition ours keeps (finer_cam's docstring)
        how = "GradCAM of the weighted mean (saturated softmax)"

        def score(out: Tensor, c: int = c, classes: list[int] = classes) -> Tensor:
            w = torch.softmax(out[classes], dim=0)
            return (w * (out[c] - exp.p.alpha * out[classes])).sum()

        with OutOfPlace(), pytorch_grad_cam.GradCAM(model=z.model, target_layers=[module]) as cam:
            refs.append(cam(input_tensor=xi, targets=[score]))
    low = exp.layer_map(z.x, z.t).double()
    close(out, _up(low, z.x.shape[-2:]), 1e-5)
    scaled = minmax(_up(minmax(low.clamp_min(0)), z.x.shape[-2:]).clamp_min(0))
    np.testing.assert_allclose(scaled.numpy(), np.concatenate(refs), atol=2e-3,
                               err_msg=f"differs from pytorch-grad-cam {how} at {layer}")
    return f"grad-cam {how} @{layer}"


def check_shapley_cam(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """pytorch-grad-cam's ShapleyCAM on the same layer; where the layer's gradient does not
    depend on its activations (layer -> pool -> linear: the Hessian is 0) ShapleyCAM's
    ``autograd.grad(grads, activations)`` raises, and its GradCAM (what it reduces to) is the
    reference."""
    try:
        return gradcam_peer("ShapleyCAM")(z, exp, out)
    except RuntimeError as err:
        if "does not require grad" not in str(err):
            raise
    return gradcam_peer("GradCAM")(z, exp, out) + " (H = 0: = GradCAM)"


CASES.update({
    "fullgrad": Case(check_fullgrad, one_image=True,
                     note="= pytorch-grad-cam FullGrad after its final min-max scaling; refuses where a bias "
                          "it cannot count is applied (ConvNeXt's LayerNorm and channels-last Linear)"),
    "shapley_cam": Case(check_shapley_cam, one_image=True,
                        note="= pytorch-grad-cam ShapleyCAM (logit target: the Hessian term is zero on ReLU "
                             "nets, not on SiLU / Hardswish / GELU ones), or its GradCAM where the layer "
                             "feeds a linear head (ShapleyCAM raises there: its gradient has no graph)"),
    "finer_cam": Case(check_finer_cam,
                      note="= pytorch-grad-cam FinerCAM (target_idx = the prediction, its defaults alpha=1, "
                           "comparison_categories=(1, 2, 3)); where the compared classes' softmax mass is "
                           "below 1e-6 (FinerCAM's 1e-9 guard dominates), = its GradCAM of the weighted mean "
                           "of differences"),
})


def _reduces(model: nn.Module, x: Tensor) -> bool:
    """Whether the forward pass pools with ``mean`` / ``sum`` (ShuffleNetV2's ``x.mean([2, 3])``),
    which EB treats as an average pool and TorchRay leaves unpatched."""
    seen: list[Any] = []
    reductions = {torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum}

    class Seen(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, D105
            if func in reductions:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Seen():
        model(x[:1])
    return bool(seen)


def check_excitation(z: Zoo, exp: Explainer, out: Tensor) -> str:
    """TorchRay's ``excitation_backprop`` / ``contrastive_excitation_backprop`` (contrast
    subtracted at the map's layer) on the same float64 model: torchvision ResNets through
    its ``update_resnet``, whose ``EltwiseSum`` is our rule for every residual addition.
    Where TorchRay's answer is not EB or it cannot run (RegNet's plain ``+``, which it lets
    copy the signal to both branches; ShuffleNetV2's ``x.mean`` pool, which it leaves
    unpatched; a layer overwritten in place; Inception's keyword pools): EB's conservation
    instead, the layer map sums to 1 (the contrastive one, unclamped, to 0: both signals
    sum to 1)."""
    from torchray.attribution.excitation_backprop import (
        contrastive_excitation_backprop,
        excitation_backprop,
        update_resnet,
    )
    from torchvision.models.resnet import ResNet

    from attriflow.explainers._functional import scan

    layer = exp.layer_name(z.x)
    contrastive = exp.spec.name == "contrastive_excitation_backprop"
    resnet = isinstance(z.model, ResNet)

    def conservation(why: str) -> str:
        total = exp.layer_map(z.x, z.t).double().sum(dim=(1, 2))
        want = 0.0 if contrastive else 1.0
        err = float((total - want).abs().max())
        assert err <= 1e-6, f"layer map sums to {total.tolist()}, not {want} (EB conservation)"
        return f"sums to {want:g} ({err:.0e}; {why}) @{layer}"

    # TorchRay's probe makes the layer's output a leaf, which an in-place op after it (DenseNet's
    # F.relu(inplace=True) after ``features``) cannot modify: there too, the conservation
    if overwritten_in_place(z.model, layer, z.x):
        return conservation("in-place after the layer")
    if not resnet and "sum" in scan(z.model, z.x).kinds():
        return conservation("plain + in TorchRay")
    if _reduces(z.model, z.x):
        return conservation("x.mean() pool: plain gradient in TorchRay")
    net = z.cached("torchray_eb", lambda: update_resnet(copy.deepcopy(z.model)) if resnet else z.model)
    x = z.x.clone()
    try:
        if contrastive:
            ref = contrastive_excitation_backprop(net, x, z.t, saliency_layer=layer, contrast_layer=layer,
                                                  classifier_layer=exp.classifier_name(z.x), resize=True)
        else:
            ref = excitation_backprop(net, x, z.t, saliency_layer=layer, resize=True)
    except TypeError:  # TorchRay's patched pools take no keywords: Inception's F.avg_pool2d(x, kernel_size=3)
        return conservation("TorchRay fails on keyword pools")
    if contrastive and float(ref.abs().max()) <= 1e-12:
        # a 1x1-conv classifier read at its input (SqueezeNet): P and C both sum to the
        # position's signal there, so every position's difference is 0 up to rounding
        assert float(out.abs().max()) <= 1e-12, "TorchRay's map is 0 up to rounding, ours is not"
        return f"torchray: 0 up to rounding (1x1-conv classifier) @{layer}"
    close(out, ref[:, 0], 1e-5)
    return f"torchray{' update_resnet' if resnet else ''} @{layer}"


CASES.update({
    "excitation_backprop": Case(check_excitation, one_image=True, double=True,
                                note="first image, float64; = TorchRay (ResNets: on update_resnet); where "
                                     "TorchRay is not EB or cannot run (RegNet's plain +, ShuffleNet's mean "
                                     "pool, DenseNet's in-place ReLU, Inception's keyword pools) the layer "
                                     "map sums to 1; refuses linear "
                                     "bottlenecks (a Conv fed negative inputs) and activations without "
                                     "a rule"),
    "contrastive_excitation_backprop": Case(check_excitation, one_image=True, double=True,
                                            note="first image, float64; = TorchRay (contrast at the layer; "
                                                 "ResNets: on update_resnet); RegNet: the unclamped layer "
                                                 "map sums to 0"),
})


# --------------------------------------------------------------------------- one pair


@dataclass
class Outcome:
    """What one pair did: the table cell, whether it passed, the detail, and its cost."""

    cell: str
    passed: bool
    detail: str = ""
    run_s: float = 0.0  # the explainer's own attribute() call
    check_s: float = 0.0  # the check (references, extra runs)
    cpu_s: float = 0.0  # process CPU time of both (the machine may be shared)


def names_something(message: str, model: nn.Module) -> bool:
    """True when ``message`` names a module type or module of ``model`` or an operation."""
    low = message.lower()
    words = {type(m).__name__.lower() for m in model.modules()}
    words |= {n.lower() for n, _ in model.named_modules() if len(n) >= 3}
    words |= {"relu", "silu", "gelu", "sigmoid", "hardswish", "hardsigmoid", "layer_norm", "layernorm",
              "relu6", "hardtanh", "in-place", "inplace", "functional", "f.relu", "f.silu", "f.gelu"}
    return any(w in low for w in words)


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 3] + "..."


def run_pair(z: Zoo, name: str) -> Outcome:
    """Run explainer ``name`` on ``z`` and judge the result (never raises for the pair's own
    errors: they become a failed outcome)."""
    cpu = time.process_time()
    outcome = _run_pair(z, name)
    outcome.cpu_s = time.process_time() - cpu
    return outcome


def _run_pair(z: Zoo, name: str) -> Outcome:
    case = CASES[name]
    if case.one_image:  # the checks see the same single image (the cache is shared)
        z = replace(z, x=z.x[:1], t=z.t[:1], runner_up=z.runner_up[:1])
    if case.double:
        z = replace(z, model=z.cached("model64", lambda: copy.deepcopy(z.model).double()), x=z.x.double())
    x, t = z.x, z.t
    start = time.perf_counter()
    try:
        exp = get_explainer(name)(z.model, **case.params(z))
        out = exp.attribute(x, t, **({"seeds": torch.tensor([11, 12])[: len(x)]} if exp.spec.stochastic else {}))
    except UnsupportedModelError as err:
        msg = str(err)
        run_s = time.perf_counter() - start
        if not msg.strip() or not names_something(msg, z.model):
            return Outcome(f"FAIL: refusal names nothing ({_short(msg, 30)})", False, msg, run_s)
        return Outcome(f"refused: {_short(msg, 60)}", True, msg, run_s)
    except Exception as err:  # noqa: BLE001 - every other exception is the pair's failure
        return Outcome(f"FAIL: {type(err).__name__}: {_short(str(err), 50)}", False,
                       f"{type(err).__name__}: {err}", time.perf_counter() - start)
    run_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        assert out.shape == (len(x), *x.shape[-2:]), f"shape {tuple(out.shape)}"
        assert out.dtype == torch.float32, f"dtype {out.dtype}"
        assert torch.isfinite(out).all(), "non-finite map"
        zero = [i for i in range(len(out)) if not bool(out[i].abs().amax() > 0)]
        assert not zero, f"all-zero map for image(s) {zero}"
        note = case.check(z, exp, out)
    except AssertionError as err:
        return Outcome(f"FAIL: {_short(str(err), 60)}", False, str(err), run_s, time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - a reference that cannot run is reported, not hidden
        return Outcome(f"FAIL: check error {type(err).__name__}: {_short(str(err), 40)}", False,
                       f"check raised {type(err).__name__}: {err}", run_s, time.perf_counter() - start)
    return Outcome(f"ok ({note})", True, "", run_s, time.perf_counter() - start)


# --------------------------------------------------------------------------- the table


def render_table(outcomes: dict[tuple[str, str], Outcome], build_s: dict[str, float], total_s: float) -> str:
    """Markdown: outcome per (architecture, explainer), then seconds per pair."""
    names = sorted(REGISTRY)
    archs = [a for a in ARCHS if any(k[0] == a for k in outcomes)]
    lines = [
        "# Explainer zoo: every explainer on every torchvision family",
        "",
        "Generated by `tests/explainers/test_zoo.py` (`python benchmarks/zoo.py` reruns it and rewrites this "
        "file). Random weights (seeded), BatchNorm recalibrated on two images (scikit-image's astronaut "
        "and chelsea) at 64x64 (Inception-v3: 80x80), float32; the maps explain the first image "
        "(astronaut) for the model's prediction. A cell is `ok (check)`, `refused: reason` (UnsupportedModelError naming the module or "
        "operation) or `FAIL: reason` (the test fails).",
        "",
        f"Wall time of the run: {total_s:.0f} s (model building {sum(build_s.values()):.0f} s of it); CPU time "
        f"of the pairs: {sum(o.cpu_s for o in outcomes.values()):.0f} s.",
        "",
        "## Outcomes",
        "",
        "| architecture | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for a in archs:
        cells = [outcomes[(a, n)].cell if (a, n) in outcomes else "not run" for n in names]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    counts = {"ok": 0, "refused": 0, "FAIL": 0}
    for o in outcomes.values():
        counts[o.cell.split(" ")[0].rstrip(":")] = counts.get(o.cell.split(" ")[0].rstrip(":"), 0) + 1
    lines += ["", f"{counts['ok']} ok, {counts['refused']} refused, {counts['FAIL']} failed of {len(outcomes)} pairs.",
              "", "## Architectures", "", "| architecture | family | constructor (torchvision, weights=None, "
              "num_classes=10) | input | build + recalibration (s) |", "|---|---|---|---|---|"]
    for a in archs:
        arch = ARCHS[a]
        lines.append(f"| {a} | {arch.family} | `{arch.config}` | {arch.size}x{arch.size} | {build_s.get(a, 0):.1f} |")
    lines += ["", "## What each check asserts", "", "Every `ok` map is float32, (N, H, W), finite and non-zero "
              "for every image. Reference implementations run with in-place activations made out of place "
              "(`OutOfPlace` in `tests/explainers/zoo_support.py`); `out-of-place` in a cell marks a layer whose "
              "output the model overwrites in place, where pytorch-grad-cam run on the model as it is would be "
              "wrong.", "", "| explainer | parameters and check |", "|---|---|"]
    for n in names:
        lines.append(f"| `{n}` | {CASES[n].note} |")
    lines += ["", "## CPU seconds per pair (explainer + check; process time, two threads)", "",
              "| architecture | " + " | ".join(f"`{n}`" for n in names) + " | total |",
              "|---|" + "---|" * (len(names) + 1)]
    for a in archs:
        secs = [outcomes[(a, n)].cpu_s if (a, n) in outcomes else 0.0 for n in names]
        lines.append(f"| {a} | " + " | ".join(f"{s:.1f}" for s in secs) + f" | {sum(secs):.0f} |")
    return "\n".join(lines) + "\n"
