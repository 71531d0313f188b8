"""Models that used to get silently wrong maps (issue #13): in-place ops after the target
layer, activations applied functionally, outputs that are not logits, mixed module state.

Each test compares with the right value (the same network written without the trait that
fooled the method) or asserts the method refuses with a message naming the cause.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attriflow.explainers import REGISTRY, UnsupportedModelError, get_explainer

#: Every CAM with a free ``layer`` (``cam`` needs its layer to feed a pooled linear head; SISE
#: reads several blocks)
CAMS = sorted(n for n, c in REGISTRY.items() if c.spec.family == "cam" and n not in {"cam", "sise"})
FAST = {"neuromask": {"iterations": 5}, "extremal_perturbation": {"iterations": 3, "step": 1, "sigma": 3.0},
        "rise": {"masks": 16}, "smooth_grad": {"samples": 2},
        "integrated_gradients": {"steps": 4}, "xrai": {"steps": 4}}


def _seq(inplace: bool) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(4, 5, 3, padding=1),
                         nn.ReLU(inplace=inplace), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))


@pytest.fixture(scope="module")
def inplace_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = _seq(True).double().eval()
    b = _seq(False).double().eval()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.fixture(scope="module")
def x_t() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, 10, 10, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1])


@pytest.mark.parametrize("name", CAMS)
def test_cam_of_a_layer_followed_by_an_inplace_relu_is_the_layers_own_output(name, inplace_pair, x_t) -> None:
    """Sequential(Conv, ReLU(inplace), Conv, ReLU(inplace), ...) with layer "2": the map is
    the conv's, as on the same net with out-of-place ReLUs (before: relu(conv)'s)."""
    inplace, plain = inplace_pair
    x, t = x_t
    ours = get_explainer(name)(inplace, layer="2").attribute(x, t)
    right = get_explainer(name)(plain, layer="2").attribute(x, t)
    assert right.abs().amax() > 0
    torch.testing.assert_close(ours, right, rtol=1e-6, atol=1e-9)


class FunctionalNet(nn.Module):
    """ReLUs applied as ``F.relu`` (in place) and as a module created inside ``forward``."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            x = self.pool(F.relu(self.conv1(x), inplace=True))
            x = nn.ReLU()(self.conv2(x))
        else:
            x = self.pool(self.relu1(self.conv1(x)))
            x = self.relu2(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def functional_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1)
    a = FunctionalNet(True).double().eval()
    b = FunctionalNet(False).double().eval()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet", "guided_grad_cam", "deeplift"])
def test_functional_activations_are_seen(name, functional_pair, x_t) -> None:
    """F.relu and nn.ReLU() made in forward get the method's rule, as modules do (before:
    the plain gradient, i.e. saliency / gradient x input)."""
    functional, modules = functional_pair
    x, t = x_t
    params = {"layer": "conv2"} if name == "guided_grad_cam" else {}
    ours = get_explainer(name)(functional, **params).attribute(x, t)
    right = get_explainer(name)(modules, **params).attribute(x, t)
    torch.testing.assert_close(ours, right, rtol=1e-6, atol=1e-9)
    if name == "guided_backprop":
        assert not torch.allclose(ours, get_explainer("saliency")(functional).attribute(x, t))


def test_guided_backprop_on_functional_relus_equals_captum_on_modules(functional_pair, x_t) -> None:
    from captum.attr import GuidedBackprop

    functional, modules = functional_pair
    x, t = x_t
    ours = get_explainer("guided_backprop")(functional, reduce="sum").attribute(x, t)
    ref = GuidedBackprop(modules).attribute(x.clone().requires_grad_(), target=t).sum(1)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-7)


class ActNet(nn.Module):
    """Conv - activation - [SE gate] - Conv - GAP - Linear, activations applied functionally."""

    def __init__(self, act: str, gate: bool = False) -> None:
        super().__init__()
        self.act, self.gate = act, gate
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.se = nn.Conv2d(6, 6, 1)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = getattr(F, self.act)(self.conv1(x))
        if self.gate:
            x = x * torch.sigmoid(self.se(F.adaptive_avg_pool2d(x, 1)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("act", ["silu", "gelu", "hardswish", "tanh", "relu6"])
def test_deeplift_sums_to_delta_through_functional_activations(act, x_t) -> None:
    torch.manual_seed(2)
    net = ActNet(act).double().eval()
    x, t = x_t
    maps = get_explainer("deeplift")(net, baseline=0.0).attribute(x, t)
    with torch.no_grad():
        delta = net(x).gather(1, t[:, None])[:, 0] - net(torch.zeros_like(x[:1]))[0, t]
    torch.testing.assert_close(maps.double().sum(dim=(1, 2)), delta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet", "guided_grad_cam"])
@pytest.mark.parametrize("act", ["silu", "gelu", "hardswish"])
def test_guided_rules_refuse_non_rectifier_networks(name, act, x_t) -> None:
    net = ActNet(act).double().eval()
    x, t = x_t
    with pytest.raises(UnsupportedModelError, match=rf"{name}.*{act}.*conv1|{name}.*{act}.*\(model\)"):
        get_explainer(name)(net).attribute(x, t)


def test_deeplift_refuses_gates_naming_the_product(x_t) -> None:
    net = ActNet("relu", gate=True).double().eval()
    x, t = x_t
    with pytest.raises(UnsupportedModelError, match=r"deeplift.*mul \(product\)"):
        get_explainer("deeplift")(net).attribute(x, t)


def test_refusal_comes_before_work_through_check(x_t) -> None:
    """The pipeline calls ``check`` when it builds an explainer: no shard starts."""
    net = ActNet("silu").double().eval()
    exp = get_explainer("guided_backprop")(net)
    with pytest.raises(UnsupportedModelError, match="silu"):
        exp.check(x_t[0][:1])


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module, how: str) -> None:
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        y = self.inner(x)
        if self.how == "tuple":
            return y, x.mean(dim=(2, 3))
        if self.how == "dict":
            return {"logits": y}
        return y[:, :, None]


@pytest.mark.parametrize("how", ["tuple", "dict", "nk1"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_outputs_that_are_not_logits_get_one_clear_error(name, how, tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs
    shown = {"tuple": r"tuple\(Tensor\(1, 3\), Tensor\(1, 3\)\)", "dict": r"dict\('logits': Tensor\(1, 3\)\)",
             "nk1": r"Tensor\(1, 3, 1\)"}[how]
    with pytest.raises(UnsupportedModelError, match=rf"output is {shown}.*\(N, K\)"):
        get_explainer(name)(Wrapped(tiny_cnn, how), **FAST.get(name, {})).attribute(x, t)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)
        self.explode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        if self.explode:
            raise RuntimeError("boom")
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("explode", [False, True])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_submodule_state_is_restored(name, explode, tiny_inputs) -> None:
    """Mixed training flags (a BN left in train mode under an eval root), buffers, frozen
    parameters and instance attributes come back as they were, also after a raise."""
    torch.manual_seed(0)
    net = BNNet().double()
    net.eval()
    net.bn.train()
    net.conv.weight.requires_grad_(False)
    x, t = tiny_inputs
    x = x[:2]
    with torch.no_grad():  # non-trivial running statistics
        net.bn.running_mean.uniform_(-1, 1)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    exp = get_explainer(name)(net, **FAST.get(name, {}))
    if explode:
        exp.check(x[:1])  # refusals and output checks pass; then the forward raises mid-call
        net.explode = True
        with pytest.raises(RuntimeError, match="boom"):
            exp.attribute(x, t[:2])
    else:
        exp.attribute(x, t[:2])
    assert [m.training for m in net.modules()] == [False, False, True, False, False]
    assert [p.requires_grad for p in net.parameters()] == [False, True, True, True, True, True]
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert net.relu.inplace is True
    for m in net.modules():
        assert "forward" not in vars(m)
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in net.parameters())


def test_the_pipeline_refuses_when_it_builds_the_explainer_naming_the_entry(x_t) -> None:
    """A refusal surfaces when the run builds its explainers, before any shard, prefixed
    with the config entry's name."""
    from types import SimpleNamespace

    from attriflow.tasks.runtime import _make_explainer

    loaded = SimpleNamespace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    with pytest.raises(UnsupportedModelError, match=r"explain\.explainers\[gbp\]: guided_backprop.*silu"):
        _make_explainer("guided_backprop", {}, ActNet("silu").double().eval(), loaded, x_t[0][:1], "gbp")


@pytest.mark.parametrize(("method", "params", "field"), [
    ("contrastive_excitation_backprop", {"classifier_layer": "nope"}, "params.classifier_layer"),
    ("sise", {"layers": ["conv1", "nope"]}, "params.layers[1]"),
    ("grad_cam", {"layer": "nope"}, "params.layer")])
def test_an_unknown_layer_names_the_parameter_that_holds_it(method, params, field, x_t) -> None:
    from types import SimpleNamespace

    from attriflow.explainers import LayerNotFoundError
    from attriflow.tasks.runtime import _make_explainer

    loaded = SimpleNamespace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    expected = rf"explain\.explainers\[e\]\.{re.escape(field)}: unknown layer 'nope'"
    with pytest.raises(LayerNotFoundError, match=expected):
        _make_explainer(method, params, ActNet("relu").double().eval(), loaded, x_t[0][:1], "e")


class ReluAfterLayer(nn.Module):
    """DenseNet's head: ``features`` -> F.relu -> global average -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.features(x)).mean(dim=(2, 3)))


def test_cam_refuses_a_layer_whose_average_is_not_what_the_classifier_reads(x_t) -> None:
    torch.manual_seed(0)
    net = ReluAfterLayer().double().eval()
    with torch.no_grad():
        net.features[1].bias.fill_(-0.5)  # negative activations for the ReLU to cut
    with pytest.raises(UnsupportedModelError, match=r"cam: .*'features'.*ReLU"):
        get_explainer("cam")(net).attribute(*x_t)
    # the tensor the average reads is accepted, and CAM's identity holds there
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double().eval()
    maps = get_explainer("cam")(plain, layer="1").attribute(*x_t)
    with torch.no_grad():
        logits = plain(x_t[0]).gather(1, x_t[1][:, None])[:, 0]
    torch.testing.assert_close(maps.double().mean(dim=(1, 2)) + plain[4].bias[x_t[1]], logits,
                               rtol=1e-5, atol=1e-6)


def test_cam_refuses_a_classifier_that_does_not_read_the_layers_channels(x_t) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(400, 3)).double().eval()
    with pytest.raises(UnsupportedModelError, match=r"cam: layer '1' has output \(1, 4, 10, 10\).*400"):
        get_explainer("cam")(net, layer="1").attribute(*x_t)


def test_fem_refuses_a_layer_too_small_for_its_threshold(x_t) -> None:
    """2x2 positions: no activation is 2 standard deviations above the mean (before: an
    all-zero map)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, 3)).double().eval()
    with pytest.raises(UnsupportedModelError, match=r"fem: layer '2' has 2x2 positions"):
        get_explainer("fem")(net, layer="2").attribute(*x_t)
    assert get_explainer("fem")(net, layer="1").attribute(*x_t).abs().sum() > 0  # 10x10: fine


@pytest.mark.parametrize("method", ["grad_cam", "score_cam", "cam", "fem"])
def test_a_cam_refuses_a_layer_without_spatial_output(method, x_t) -> None:
    """A classifier or flatten output has no feature maps (every shard failed with an
    IndexError), a global pool has one position (a constant map): refused, naming the shape."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).double().eval()
    for layer, shape in (("4", r"\(1, 3\)"), ("3", r"\(1, 4\)"), ("2", r"\(1, 4, 1, 1\), 1 x 1 positions")):
        with pytest.raises(UnsupportedModelError, match=rf"{method}: params.layer '{layer}' outputs shape {shape}"):
            get_explainer(method)(net, layer=layer).attribute(*x_t)
    assert get_explainer(method)(net, layer="1").attribute(*x_t).shape == x_t[0].shape[:1] + x_t[0].shape[2:]


class Spelled(nn.Module):
    """Conv - <a ReLU spelled some way> - maxpool - Conv - ReLU - mean - Linear."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.prelu, self.threshold, self.softsign = nn.PReLU(init=0.1), nn.Threshold(0.0, 0.0), nn.Softsign()
        self.fc = nn.Linear(5, 3)

    def act(self, z: torch.Tensor) -> torch.Tensor:
        how = self.how
        if how == "relu_statement":
            z.relu_()  # in place, the result unused: the model relies on the write
            return z
        if how == "clamp":
            return z.clamp(min=0)
        if how == "clamp_":
            return z.clamp_(min=0)
        if how == "where":
            return torch.where(z > 0, z, torch.zeros_like(z))
        if how == "mask":
            return z * (z > 0)
        return getattr(self, how)(z)  # prelu, threshold, softsign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = F.max_pool2d(self.act(self.conv1(x)), 2, return_indices=True)
        return self.fc(F.relu(self.conv2(h)).mean(dim=(2, 3)))


HANDLED = {"relu_statement": "relu", "clamp": "relu", "clamp_": "relu", "prelu": "activation",
           "threshold": "activation", "softsign": "activation", "where": "other", "mask": "other"}


@pytest.mark.parametrize("how", sorted(HANDLED))
def test_every_spelling_of_an_activation_is_ruled_or_refused(how, x_t) -> None:
    """Found by trying to break the rules: hand-written ReLUs used to get the plain
    gradient from guided backprop / DeepLIFT, and a max-pool returning indices broke
    DeepLIFT's forward."""
    torch.manual_seed(4)
    net = Spelled(how).double().eval()
    x, t = x_t
    with torch.no_grad():
        before = net(x)
    kind = HANDLED[how]
    for name in ("guided_backprop", "deconvnet", "deeplift"):
        refuses = kind == "other" or (kind == "activation" and name != "deeplift")
        exp = get_explainer(name)(net)
        if refuses:
            with pytest.raises(UnsupportedModelError, match=name):
                exp.attribute(x, t)
            continue
        maps = exp.attribute(x, t)
        if name == "deeplift":  # summation to delta through whichever spelling
            with torch.no_grad():
                delta = net(x).gather(1, t[:, None])[:, 0] - net(torch.zeros_like(x[:1]))[0, t]
            torch.testing.assert_close(maps.double().sum(dim=(1, 2)), delta, rtol=1e-5, atol=1e-7)
        elif kind == "relu":  # the same map as with F.relu
            ref = Spelled("clamp").double().eval()
            ref.load_state_dict(net.state_dict())
            ref.act = lambda z: F.relu(z)  # type: ignore[method-assign]
            torch.testing.assert_close(maps, get_explainer(name)(ref).attribute(x, t))
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)  # the model computes what it computed


def test_probability_of_a_single_logit_is_refused(x_t) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 1)).double().eval()
    x, _ = x_t
    t = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(UnsupportedModelError, match="single output.*'logit'"):
        get_explainer("rise")(net, masks=8).attribute(x, t)
    assert get_explainer("rise")(net, masks=8, score="logit").attribute(x, t).abs().sum() > 0


def test_targets_are_checked_against_the_model(tiny_cnn, tiny_inputs) -> None:
    x, _ = tiny_inputs
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\), got \[7\]"):
        get_explainer("saliency")(tiny_cnn).attribute(x[:1], torch.tensor([7]))
    with pytest.raises(TypeError, match="targets must be"):
        get_explainer("saliency")(tiny_cnn).attribute(x[:1], [0])  # type: ignore[arg-type]
