"""Equality with reference libraries (Captum, pytorch-grad-cam) on the same model and inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attriflow.explainers import LayerNotFoundError, default_cam_layer, get_explainer


def _close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal within ``rel`` of each map's max (issue 3's tolerance)."""
    ours, ref = ours.double(), ref.double()
    scale = ref.abs().flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    err = float(((ours - ref).abs() / scale).max())
    assert err <= rel, f"max error {err:.3g} of the map's max (tolerance {rel:g})"


MODELS = ["reference", "resnet18", "vgg11"]


@pytest.fixture(scope="module")
def models64():
    """The reference CNN and randomly initialised torchvision nets, float64, with inputs."""
    import torchvision

    from attriflow.data.embedded import MEAN, STD, make_split
    from attriflow.tasks.config import ModelConfig
    from attriflow.tasks.models import build_model

    s = make_split("test", 0, 3)
    x = torch.from_numpy(s.images).double()
    ref_x = (x - torch.tensor(MEAN).double()[:, None, None]) / torch.tensor(STD).double()[:, None, None]
    out = {"reference": (build_model(ModelConfig()).module.double(), ref_x, torch.from_numpy(s.labels))}
    for i, arch in enumerate(("resnet18", "vgg11")):
        torch.manual_seed(i)
        net = torchvision.models.get_model(arch, weights=None, num_classes=10).double().eval()
        for p in net.parameters():
            p.requires_grad_(False)
        out[arch] = (net, (x - 0.45) / 0.225, torch.tensor([1, 4, 7]))
    return out


@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize(
    ("ours", "params", "captum_cls", "kwargs", "reduce"),
    [
        ("gradient_x_input", {}, "InputXGradient", {}, "sum"),
        ("integrated_gradients", {"steps": 20}, "IntegratedGradients", {"n_steps": 20}, "sum"),
        ("integrated_gradients", {"steps": 16, "rule": "riemann_right", "baseline": 0.3},
         "IntegratedGradients", {"n_steps": 16, "method": "riemann_right", "baselines": 0.3}, "sum"),
        ("guided_backprop", {"reduce": "sum"}, "GuidedBackprop", {}, "sum"),
        ("deconvnet", {"reduce": "sum"}, "Deconvolution", {}, "sum"),
        ("guided_backprop", {}, "GuidedBackprop", {}, "max_abs"),
    ],
)
def test_gradient_family_equals_captum(which, ours, params, captum_cls, kwargs, reduce, models64) -> None:
    import captum.attr

    model, x, t = models64[which]
    mine = get_explainer(ours)(model, **params).attribute(x, t, batch_size=7)
    ref = getattr(captum.attr, captum_cls)(model).attribute(x.clone().requires_grad_(), target=t, **kwargs)
    ref = ref.sum(1) if reduce == "sum" else ref.abs().amax(1)
    _close(mine, ref)


@pytest.mark.parametrize("which", ["tiny", *MODELS])
def test_saliency_equals_captum(which, tiny_cnn, tiny_inputs, models64) -> None:
    from captum.attr import Saliency as CaptumSaliency

    model, x, t = (tiny_cnn, *tiny_inputs) if which == "tiny" else models64[which]
    ours = get_explainer("saliency")(model).attribute(x, t)
    ref = CaptumSaliency(model).attribute(x.clone().requires_grad_(), target=t, abs=True).amax(1)
    _close(ours, ref)
    signed = get_explainer("saliency")(model, reduce="sum").attribute(x, t)
    _close(signed, CaptumSaliency(model).attribute(x.clone(), target=t, abs=False).sum(1))


@pytest.mark.parametrize("which", ["tiny", *MODELS])
def test_grad_cam_equals_captum(which, tiny_cnn, tiny_inputs, models64) -> None:
    from captum.attr import LayerAttribution, LayerGradCam

    model, x, t = (tiny_cnn, *tiny_inputs) if which == "tiny" else models64[which]
    layer = "relu2" if which == "tiny" else CAM_LAYERS[which]
    ours = get_explainer("grad_cam")(model, layer=layer).attribute(x, t)
    module = dict(model.named_modules())[layer]
    low = LayerGradCam(model, module).attribute(x, target=t, relu_attributions=True)
    ref = LayerAttribution.interpolate(low, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    _close(ours, ref)


def test_grad_cam_equals_pytorch_grad_cam(tiny_cnn, tiny_inputs) -> None:
    """grad-cam min-max scales its maps; compare after the same scaling (full-resolution layer)."""
    from pytorch_grad_cam import GradCAM as RefGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x, t = tiny_inputs
    ours = get_explainer("grad_cam")(tiny_cnn, layer="relu1").attribute(x, t).double()
    with RefGradCAM(model=tiny_cnn, target_layers=[tiny_cnn.relu1]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])

    def minmax(m: torch.Tensor) -> torch.Tensor:  # grad-cam's scale_cam_image
        flat = m.flatten(1)
        lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
        return (m - lo) / (1e-7 + hi - lo)

    # grad-cam scales once per layer and once more after aggregating the layers
    np.testing.assert_allclose(minmax(minmax(ours).clamp_min(0)).numpy(), ref, atol=1e-5)


def test_default_cam_layer() -> None:
    import torchvision

    from attriflow.data.reference_cnn import ReferenceCNN

    x = torch.zeros(1, 3, 64, 64)
    assert default_cam_layer(ReferenceCNN(), x) == "block4"
    assert default_cam_layer(torchvision.models.resnet18(weights=None), x) == "layer4"
    assert default_cam_layer(torchvision.models.vgg11(weights=None), x) == "features"


def test_unknown_layer_lists_valid_ones(tiny_cnn) -> None:
    with pytest.raises(LayerNotFoundError) as err:
        get_explainer("grad_cam")(tiny_cnn, layer="conv9")
    msg = str(err.value)
    assert "conv9" in msg and "relu2" in msg and "conv1" in msg


CAM_LAYERS = {"reference": "block3", "resnet18": "layer3", "vgg11": "features.15"}


def _gradcam_postprocess(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """pytorch-grad-cam's pipeline on a layer map: ReLU, min-max, resize, ReLU, min-max."""

    def minmax(m: torch.Tensor) -> torch.Tensor:
        flat = m.flatten(1)
        lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
        return (m - lo) / (1e-7 + hi - lo)

    up = F.interpolate(minmax(low.clamp_min(0))[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax(up.clamp_min(0))


@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize(
    ("ours", "params", "ref_name"),
    [
        ("grad_cam", {}, "GradCAM"),
        ("grad_cam_plus_plus", {}, "GradCAMPlusPlus"),
        ("xgrad_cam", {}, "XGradCAM"),
        ("layer_cam", {}, "LayerCAM"),
        ("hires_cam", {}, "HiResCAM"),
        ("grad_cam_elementwise", {}, "GradCAMElementWise"),
        ("score_cam", {"score": "logit", "channel_softmax": True, "align_corners": True}, "ScoreCAM"),
    ],
)
def test_cam_family_equals_pytorch_grad_cam(which, ours, params, ref_name, models64) -> None:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x, t = models64[which]
    layer = CAM_LAYERS[which]
    if ours == "score_cam":  # one forward per channel: use a narrower layer and two images
        layer = {"reference": "block3", "resnet18": "layer2", "vgg11": "features.4"}[which]
        x, t = x[:2], t[:2]
    exp = get_explainer(ours)(model, layer=layer, **params)
    low = exp.layer_map(x, t)
    module = dict(model.named_modules())[layer]
    with getattr(pytorch_grad_cam, ref_name)(model=model, target_layers=[module]) as cam:
        if ref_name == "ScoreCAM":
            cam.batch_size = 64
        ref = cam(input_tensor=x.clone().requires_grad_(), targets=[ClassifierOutputTarget(int(c)) for c in t])
    expected = _gradcam_postprocess(low, tuple(x.shape[-2:])).numpy()
    np.testing.assert_allclose(expected, ref, atol=2e-5)
    # and the upsampled map we return is exactly the bilinear upsampling of the layer map
    full = exp.attribute(x, t)
    torch.testing.assert_close(full, F.interpolate(low[:, None], size=x.shape[-2:], mode="bilinear",
                                                   align_corners=False)[:, 0].float())


@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize("ours", ["eigen_grad_cam", "kpca_cam"])
def test_projection_cams_equal_pytorch_grad_cam_up_to_sign(which, ours, models64) -> None:
    """Eigen-Grad-CAM (the first principal component of gradients x activations) and
    KPCA-CAM (the first kernel principal component of the activations), against the
    projections pytorch-grad-cam computes; their signs are arbitrary, ours oriented."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection, get_2d_projection_kernel

    model, x, t = models64[which]
    layer = CAM_LAYERS[which]
    exp = get_explainer(ours)(model, layer=layer, relu=False)
    low = exp.layer_map(x, t)
    acts, grads = get_explainer("grad_cam")(model, layer=layer).activations(x, t)
    if ours == "eigen_grad_cam":
        ref = torch.from_numpy(get_2d_projection((grads * acts).numpy())).double()
    else:
        ref = torch.from_numpy(get_2d_projection_kernel(acts.numpy(), "sigmoid", None)).double()
    for i in range(len(x)):
        sign = 1.0 if (low[i] * ref[i]).sum() >= 0 else -1.0
        _close(low[i : i + 1], sign * ref[i : i + 1], rel=1e-4)


@pytest.mark.parametrize("which", MODELS)
def test_eigen_cam_equals_pytorch_grad_cam_projection(which, models64) -> None:
    """grad-cam's SVD sign is LAPACK's; ours is fixed by correlation, so compare up to sign."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from attriflow.explainers._hooks import capture_outputs

    model, x, t = models64[which]
    layer = CAM_LAYERS[which]
    ours = get_explainer("eigen_cam")(model, layer=layer, relu=False).layer_map(x, t)
    with capture_outputs(model, [layer]) as acts, torch.no_grad():
        model(x)
    ref = torch.from_numpy(get_2d_projection(acts[layer].numpy())).double()
    for i in range(len(x)):
        sign = 1.0 if (ours[i] * ref[i]).sum() >= 0 else -1.0
        _close(ours[i : i + 1], sign * ref[i : i + 1], rel=1e-4)
        total = acts[layer][i].sum(0)
        assert ((ours[i] - ours[i].mean()) * (total - total.mean())).sum() >= 0


@pytest.mark.parametrize("which", MODELS)
def test_hires_cam_without_relu_is_torchrays_linear_approximation(which, models64) -> None:
    """TorchRay's Linear Approximation (``sum_c A * dS/dA`` at a layer, bilinear upsampling)
    is HiResCAM with ``relu=False``: one method, tested against both peers."""
    from torchray.attribution.linear_approx import linear_approx

    model, x, t = models64[which]
    layer = CAM_LAYERS[which]
    ours = get_explainer("hires_cam")(model, layer=layer, relu=False).attribute(x, t)
    flags = [p.requires_grad for p in model.parameters()]
    try:
        ref = linear_approx(model, x.clone(), t, saliency_layer=layer, resize=True)
    finally:  # TorchRay switches the shared model's weight gradients off
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    _close(ours, ref[:, 0], rel=1e-5)


def test_cam_equals_grad_cam_without_relu_on_a_gap_head(models64) -> None:
    model, x, t = models64["reference"]
    cam = get_explainer("cam")(model, layer="block4").attribute(x, t)
    grad = get_explainer("grad_cam")(model, layer="block4", relu=False).attribute(x, t)
    _close(cam, grad * 8 * 8)


@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize(("upsample", "reduce"), [("nearest", "sum"), ("nearest", "max_abs")])
def test_guided_grad_cam_equals_captum(which, upsample, reduce, models64) -> None:
    from captum.attr import GuidedGradCam

    model, x, t = models64[which]
    layer = CAM_LAYERS[which]
    ours = get_explainer("guided_grad_cam")(model, layer=layer, upsample=upsample, reduce=reduce).attribute(x, t)
    module = dict(model.named_modules())[layer]
    ref = GuidedGradCam(model, module).attribute(x.clone().requires_grad_(), target=t, interpolate_mode=upsample)
    _close(ours, ref.sum(1) if reduce == "sum" else ref.abs().amax(1))


def test_fem_by_hand(tiny_cnn, tiny_inputs) -> None:
    from attriflow.explainers._hooks import capture_outputs

    x, t = tiny_inputs
    ours = get_explainer("fem")(tiny_cnn, layer="relu2").layer_map(x, t)
    with capture_outputs(tiny_cnn, ["relu2"]) as acts, torch.no_grad():
        tiny_cnn(x)
    a = acts["relu2"].numpy()
    expected = np.zeros(a.shape[0:1] + a.shape[2:])
    for n in range(a.shape[0]):
        for k in range(a.shape[1]):
            mu, sd = a[n, k].mean(), a[n, k].std()
            expected[n] += mu * (a[n, k] >= mu + 2 * sd)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize(("window", "stride"), [(16, 8), (12, 10)])
def test_occlusion_equals_captum(which, window, stride, models64) -> None:
    from captum.attr import Occlusion as CaptumOcclusion

    model, x, t = models64[which]
    x, t = x[:2], t[:2]
    ours = get_explainer("occlusion")(model, window=window, stride=stride).attribute(x, t, batch_size=23)
    ref = CaptumOcclusion(model).attribute(x, target=t, sliding_window_shapes=(3, window, window),
                                           strides=(3, stride, stride), baselines=0.0,
                                           perturbations_per_eval=16)
    assert torch.allclose(ref[:, 0], ref[:, 2])
    _close(ours, ref[:, 0])


def _zennit_lrp(model, x, t, rules: str, first: str | None, epsilon: float, low=None, high=None, canonizers=()):
    from zennit.attribution import Gradient
    from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite, layer_map_base
    from zennit.rules import AlphaBeta, Epsilon, Flat, ZBox, ZPlus
    from zennit.types import Convolution
    from zennit.types import Linear as ZLinear

    make = {"epsilon": lambda: Epsilon(epsilon), "zplus": lambda: ZPlus(), "alpha_beta": lambda: AlphaBeta(2.0, 1.0)}
    conv_rule, dense_rule = rules.split("/")
    layer_map = layer_map_base() + [(Convolution, make[conv_rule]()), (ZLinear, make[dense_rule]())]
    if first is None:
        composite = LayerMapComposite(layer_map=layer_map, canonizers=list(canonizers))
    else:
        rule = Flat() if first == "flat" else ZBox(low, high)
        composite = SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=[(Convolution, rule)],
                                                  canonizers=list(canonizers))
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(), lambda out: torch.eye(out.shape[1]).to(out)[t] * out)
    return relevance.sum(1)


def _folded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with every BatchNorm folded exactly into the convolution before it (test-side
    oracle; zennit's own merge leaves ``x / sqrt(1 + eps)`` in the BatchNorm)."""
    import copy

    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    names = list(modules)
    for i, name in enumerate(names):
        bn = modules[name]
        if not isinstance(bn, torch.nn.BatchNorm2d):
            continue
        conv = next(modules[n] for n in reversed(names[:i]) if isinstance(modules[n], torch.nn.Conv2d))
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight = torch.nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
        conv.bias = torch.nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else folded, attr, torch.nn.Identity())
    return folded


def _canonizers(which):
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    return {"reference": [SequentialMergeBatchNorm()], "resnet18": [ResNetCanonizer()], "vgg11": []}[which]


@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize(
    ("ours", "params", "rules", "first", "epsilon"),
    [
        ("lrp_epsilon", {"epsilon": 0.25}, "epsilon/epsilon", None, 0.25),
        ("lrp_epsilon", {"epsilon": 0.01}, "epsilon/epsilon", None, 0.01),
        ("lrp_zplus", {}, "zplus/zplus", None, 1e-6),
        ("lrp_alpha_beta", {}, "alpha_beta/alpha_beta", None, 1e-6),
        ("lrp_composite", {}, "zplus/epsilon", "flat", 1e-6),
        ("lrp_composite", {"preset": "epsilon_alpha2_beta1_flat"}, "alpha_beta/epsilon", "flat", 1e-6),
        ("lrp_composite", {"preset": "epsilon_plus_box", "low": -2.5, "high": 2.5}, "zplus/epsilon", "box", 1e-6),
    ],
)
def test_lrp_equals_zennit(which, ours, params, rules, first, epsilon, models64) -> None:
    model, x, t = models64[which]
    mine = get_explainer(ours)(model, **params).attribute(x, t)
    folded = _folded_copy(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
    ref = _zennit_lrp(folded, x, t, rules, first, epsilon, -2.5, 2.5, _canonizers(which))
    _close(mine, ref, rel=1e-4)


def _captum_friendly(model: torch.nn.Module) -> torch.nn.Module:
    """A copy Captum's DeepLift handles: ResNet blocks get two ReLU modules (Captum fails on
    the shared one) and max-pools read a fresh tensor (see below)."""
    import copy
    import types

    from torchvision.models.resnet import BasicBlock

    twin = copy.deepcopy(model)
    # Captum hooks the tensor a ReLU writes and the tensor a max-pool reads; when they are
    # one tensor (ReLU -> MaxPool), the ReLU's hook sees the gradient before the max-pool
    # rule rewrites it and the maps stop summing to f(x) - f(x0). A fresh tensor between
    # the two restores Captum's intended rule without changing the function.
    for pool in (m for m in twin.modules() if isinstance(m, torch.nn.MaxPool2d)):
        pool.register_forward_pre_hook(lambda _m, inp: (inp[0] * 1.0,))
    for block in (m for m in twin.modules() if isinstance(m, BasicBlock)):
        block.relu_out = torch.nn.ReLU()

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu_out(self.bn2(self.conv2(out)) + identity)

        block.forward = types.MethodType(forward, block)
    return twin


@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize("baseline", [0.0, 0.5])
def test_deeplift_equals_captum(which, baseline, models64) -> None:
    from captum.attr import DeepLift

    model, x, t = models64[which]
    ours = get_explainer("deeplift")(model, baseline=baseline).attribute(x, t)
    twin = _captum_friendly(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Captum's max_unpool2d races between threads on overlapping windows
    try:
        ref = DeepLift(twin).attribute(x.clone().requires_grad_(), baselines=baseline, target=t).sum(1)
    finally:
        torch.set_num_threads(threads)
    captum_like = get_explainer("deeplift")(model, baseline=baseline, maxpool_overlap="overwrite")
    _close(captum_like.attribute(x, t), ref)
    if which != "resnet18":  # no overlapping max-pool windows: both rules agree
        _close(ours, ref)
    # summation to delta (Captum's overwrite rule loses it on ResNet's overlapping stem pool)
    with torch.no_grad():
        delta = (model(x) - model(torch.full_like(x, baseline))).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(ours.double().sum(dim=(1, 2)), delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["reference", "resnet18"])  # (grad-cam's side is slow: a full pass per channel)
def test_ablation_cam_equals_pytorch_grad_cam(which, models64) -> None:
    """Ours runs only the layers after the target layer per ablation (torch.fx cut);
    pytorch-grad-cam re-runs the network: same maps. Also the whole-network fallback."""
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x, t = models64[which]
    layer = {"reference": "block3", "resnet18": "layer2"}[which]
    x, t = x[:2], t[:2]
    exp = get_explainer("ablation_cam")(model, layer=layer)
    full = exp.attribute(x, t, batch_size=64)
    low = exp.layer_map(x, t)
    torch.testing.assert_close(full, F.interpolate(low[:, None], size=x.shape[-2:], mode="bilinear",
                                                   align_corners=False)[:, 0].to(full.dtype))
    assert exp.__dict__["_suffixes"][layer] is not None  # the fast path was taken
    module = dict(model.named_modules())[layer]
    with AblationCAM(model=model, target_layers=[module]) as cam:
        cam.batch_size = 64
        ref = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(int(c)) for c in t])
    np.testing.assert_allclose(_gradcam_postprocess(low, tuple(x.shape[-2:])).numpy(), ref, atol=2e-5)
    slow = get_explainer("ablation_cam")(model, layer=layer)
    slow.__dict__["_suffixes"] = {layer: None}  # as for a model torch.fx cannot trace
    slow.attribute(x[:1], t[:1], batch_size=64)
    torch.testing.assert_close(slow.layer_map(x, t), low, rtol=1e-5, atol=1e-6)
