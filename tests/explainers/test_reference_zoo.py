"""Equality with the peers on two architectures that used to fool explainers (issue #13):
DenseNet-121 (an in-place functional ReLU after the default CAM layer ``features.norm5``,
functional ReLUs, BatchNorm before convolutions, concatenations) and MobileNetV3-Small
(Hardswish, squeeze-excitation gates with Hardsigmoid, depthwise convolutions).

Where a peer is itself wrong on such a model (pytorch-grad-cam reads ``norm5``'s output
after DenseNet's ``F.relu(..., inplace=True)`` overwrote it; Captum's and zennit's module
hooks miss functional ReLUs), the peer runs on the model with that trait removed (the
in-place op made out of place; the functional ReLU made a module), which computes the same
function: the right value.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attriflow.explainers import UnsupportedModelError, get_explainer
from tests.explainers.test_reference import _captum_friendly, _close, _gradcam_postprocess


class _OutOfPlace(TorchFunctionMode):
    """Every ``inplace=True`` functional call runs out of place (same function)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if kwargs.get("inplace"):
            kwargs["inplace"] = False
        return func(*args, **kwargs)


def _recalibrated(name: str, x: torch.Tensor) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None, num_classes=10).double()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration passes
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(x)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.fixture(scope="module")
def zoo64():
    from skimage import data, transform

    imgs = [transform.resize(getattr(data, n)(), (64, 64), anti_aliasing=True) for n in ("astronaut", "chelsea")]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).double()
    x = (x - torch.tensor([0.485, 0.456, 0.406]).double()[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225]).double()[:, None, None]
    out = {}
    for name in ("densenet121", "mobilenet_v3_small"):
        net = _recalibrated(name, x)
        with torch.no_grad():
            t = net(x).argmax(1)
        out[name] = (net, x, t)
    return out


def _module_relu_densenet(net: torch.nn.Module) -> torch.nn.Module:
    """DenseNet with its functional final ReLU as a module (Captum sees modules only)."""
    twin = copy.deepcopy(net)
    twin.final_relu = torch.nn.ReLU()

    def forward(self, x):  # noqa: ANN001, ANN202
        out = self.final_relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))

    twin.forward = types.MethodType(forward, twin)
    return twin


#: the default CAM layers; DenseNet's ``features`` ends in ``norm5`` (the same tensor)
LAYERS = {"densenet121": "features", "mobilenet_v3_small": "features"}


@pytest.mark.parametrize("which", ["densenet121", "mobilenet_v3_small"])
@pytest.mark.parametrize(("ours", "ref_name"), [("grad_cam", "GradCAM"), ("grad_cam_plus_plus", "GradCAMPlusPlus"),
                                                ("xgrad_cam", "XGradCAM"), ("layer_cam", "LayerCAM")])
def test_gradient_cams_equal_pytorch_grad_cam(which, ours, ref_name, zoo64) -> None:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x, t = zoo64[which]
    layer = LAYERS[which]
    exp = get_explainer(ours)(model)
    exp.resolve(x[:1])
    assert exp.params()["resolved"]["layer"] == layer  # the default layer is the one tested
    low = exp.layer_map(x, t)
    module = dict(model.named_modules())[layer]
    with getattr(pytorch_grad_cam, ref_name)(model=model, target_layers=[module]) as cam, _OutOfPlace():
        ref = cam(input_tensor=x.clone().requires_grad_(), targets=[ClassifierOutputTarget(int(c)) for c in t])
    np.testing.assert_allclose(_gradcam_postprocess(low, tuple(x.shape[-2:])).numpy(), ref, atol=2e-5)


def test_pytorch_grad_cam_itself_is_wrong_on_densenet_norm5(zoo64) -> None:
    """Why the oracle above runs out of place: without it the peer's Grad-CAM differs."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x, t = zoo64["densenet121"]
    module = model.features.norm5
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    with pytorch_grad_cam.GradCAM(model=model, target_layers=[module]) as cam:
        fooled = cam(input_tensor=x.clone().requires_grad_(), targets=targets)
    with pytorch_grad_cam.GradCAM(model=model, target_layers=[module]) as cam, _OutOfPlace():
        right = cam(input_tensor=x.clone().requires_grad_(), targets=targets)
    assert np.abs(fooled - right).max() > 0.05


@pytest.mark.parametrize("which", ["densenet121", "mobilenet_v3_small"])
@pytest.mark.parametrize(("ours", "captum_cls", "params", "kwargs"), [
    ("saliency", "Saliency", {"reduce": "sum"}, {"abs": False}),
    ("gradient_x_input", "InputXGradient", {}, {}),
    ("integrated_gradients", "IntegratedGradients", {"steps": 8}, {"n_steps": 8}),
])
def test_gradient_family_equals_captum(which, ours, captum_cls, params, kwargs, zoo64) -> None:
    import captum.attr

    model, x, t = zoo64[which]
    mine = get_explainer(ours)(model, **params).attribute(x, t)
    ref = getattr(captum.attr, captum_cls)(model).attribute(x.clone().requires_grad_(), target=t, **kwargs)
    _close(mine, ref.detach().sum(1))


@pytest.mark.parametrize("ours", ["guided_backprop", "deconvnet"])
def test_guided_rules_on_densenet_equal_captum_on_its_module_twin(ours, zoo64) -> None:
    import captum.attr

    model, x, t = zoo64["densenet121"]
    mine = get_explainer(ours)(model, reduce="sum").attribute(x, t)
    cls = {"guided_backprop": captum.attr.GuidedBackprop, "deconvnet": captum.attr.Deconvolution}[ours]
    ref = cls(_module_relu_densenet(model)).attribute(x.clone().requires_grad_(), target=t).sum(1)
    _close(mine, ref.detach())
    # Captum on DenseNet itself misses the functional ReLU: a different map
    fooled = cls(model).attribute(x.clone().requires_grad_(), target=t).sum(1)
    assert ((fooled - ref).abs().amax() / ref.abs().amax()) > 1e-3


def test_deeplift_on_densenet_equals_captum_on_its_module_twin(zoo64) -> None:
    from captum.attr import DeepLift

    model, x, t = zoo64["densenet121"]
    twin = _captum_friendly(_module_relu_densenet(model))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Captum's max_unpool2d races between threads on overlapping windows
    try:
        ref = DeepLift(twin).attribute(x.clone().requires_grad_(), baselines=0.0, target=t).sum(1)
    finally:
        torch.set_num_threads(threads)
    captum_like = get_explainer("deeplift")(model, maxpool_overlap="overwrite").attribute(x, t)
    _close(captum_like, ref.detach())
    ours = get_explainer("deeplift")(model).attribute(x, t)
    with torch.no_grad():
        delta = (model(x) - model(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(ours.double().sum(dim=(1, 2)), delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ours", ["deeplift", "guided_backprop", "deconvnet", "guided_grad_cam"])
def test_mobilenet_v3_is_refused_where_the_rules_do_not_reach(ours, zoo64) -> None:
    """Captum runs these on MobileNetV3 without a word (Hardswish and the SE gates get the
    plain gradient); we refuse, naming the function and a module."""
    model, x, t = zoo64["mobilenet_v3_small"]
    named = (r"mul \(product\) in features\.1\.block\.1" if ours == "deeplift"
             else r"hardswish \(activation\) in features\.0\.2")
    with pytest.raises(UnsupportedModelError, match=named):
        get_explainer(ours)(model).attribute(x, t)


def _densenet_oracle(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """zennit's view of our DenseNet: each BatchNorm that reads a convolution's output
    folded into it (conv0 / norm0, each dense layer's conv1 / norm2), and the functional
    ReLU and average pool of ``DenseNet.forward`` as modules (zennit sees modules only; its
    Norm rule then applies to the pool, as ours does)."""
    from attriflow.explainers._lrp import trace_layers

    folded = _module_relu_densenet(model)
    folded.final_pool = torch.nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x):  # noqa: ANN001, ANN202
        return self.classifier(torch.flatten(self.final_pool(self.final_relu(self.features(x))), 1))

    folded.forward = types.MethodType(forward, folded)
    for m in folded.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False  # zennit's module hooks need the ReLU's input intact
    _, pairs = trace_layers(model, x[:1])
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(folded.named_modules())
    for conv, bn in pairs.items():
        c = modules[names[id(conv)]]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        c.weight = torch.nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
        c.bias = torch.nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
        parent, _, attr = names[id(bn)].rpartition(".")
        setattr(modules[parent], attr, torch.nn.Identity())
    return folded


@pytest.mark.parametrize(("ours", "params", "conv_rule"), [
    ("lrp_epsilon", {"epsilon": 0.01}, "epsilon"),
    ("lrp_zplus", {}, "zplus"),
])
def test_lrp_on_densenet_equals_zennit(ours, params, conv_rule, zoo64) -> None:
    """On the shift-free network (every bias, BatchNorm shift and running mean zero), where
    both are exact LRP. The BatchNorms that read concatenations are affine layers: in
    zennit they get the epsilon rule, which is what our gradient through an affine map
    computes. With shifts the two route the relevance a BatchNorm's shift absorbs
    differently (zennit has no BatchNorm rule of its own; its Epsilon on an un-folded
    BatchNorm divides by outputs near zero), so that case is compared by conservation in
    the zoo test instead."""
    from zennit.attribution import Gradient
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon, ZPlus
    from zennit.types import BatchNorm, Convolution
    from zennit.types import Linear as ZLinear

    model, x, t = zoo64["densenet121"]
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
    mine = get_explainer(ours)(model, **params).attribute(x, t)
    oracle = _densenet_oracle(model, x)
    with torch.no_grad():
        torch.testing.assert_close(oracle(x), model(x))
    conv = Epsilon(0.01) if conv_rule == "epsilon" else ZPlus()
    dense = Epsilon(0.01) if conv_rule == "epsilon" else ZPlus()
    composite = LayerMapComposite(layer_map=layer_map_base() + [
        (Convolution, conv), (ZLinear, dense), (BatchNorm, Epsilon(1e-6))])
    with Gradient(model=oracle, composite=composite) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(), lambda out: torch.eye(out.shape[1]).to(out)[t] * out)
    _close(mine, relevance.sum(1), rel=1e-4)
