"""LRP beyond ReLU networks (issue 13, kinds 3 and 7): rules for element-wise activations,
squeeze-excitation gates, LayerNorm, concatenation and sums, refusal of what has no rule,
and half precision.

Conservation: on a bias-free network every rule here passes the target logit on to the
input up to its 1e-6 stabilisers (``z / (z + 1e-6)`` per unit), so in float64 with
activations of order one the input relevance sums to the logit within 1e-4 of it. Before
these rules, ``x * grad`` through SiLU missed by 20-60 %, LayerNorm (scale-invariant, so its
``x * grad`` is zero) lost everything.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attriflow.explainers import UnsupportedModelError, get_explainer

LRP = ["lrp_epsilon", "lrp_zplus", "lrp_alpha_beta", "lrp_composite"]


def _init(net: nn.Module, seed: int = 0) -> nn.Module:
    """He-initialised float64 copy in eval mode (activations of order one)."""
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
        if isinstance(m, nn.BatchNorm2d):  # an affine BatchNorm with no shift
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.zeros_(m.bias)
    return net.double().eval()


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)


class ActNet(nn.Module):
    """Conv - activation - Conv - pool - Linear, bias-free; the activation is a functional call."""

    def __init__(self, act) -> None:
        super().__init__()
        self.act = act
        self.conv1, self.conv2 = _conv(3, 8), _conv(8, 8)
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        x = self.conv2(self.act(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SENet(nn.Module):
    """Conv - ReLU - squeeze-excitation (sigmoid gate) - Conv - pool - Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = _conv(3, 8), _conv(8, 8)
        self.fc1, self.fc2 = _conv(8, 4, 1), _conv(4, 8, 1)
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        gate = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = self.conv2(x * gate)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class NeXtNet(nn.Module):
    """A ConvNeXt block (depthwise conv, LayerNorm over channels, MLP with GELU, residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, 8)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=False)
        self.norm = nn.LayerNorm(8, bias=False)
        self.pw1, self.pw2 = nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False)
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.pw2(F.gelu(self.pw1(y))).permute(0, 3, 1, 2)
        x = x + y
        return self.fc(x.mean((2, 3)))


class DenseNet(nn.Module):
    """DenseNet order: concatenation, then BatchNorm (not after a conv: stays affine) - ReLU - conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1, self.conv2 = _conv(3, 8), _conv(8, 4), _conv(12, 8)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        x = F.relu(self.conv0(x))
        x = torch.cat([x, F.relu(self.conv1(x))], 1)
        x = self.conv2(F.relu(self.bn(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ResNet(nn.Module):
    """A residual addition of two input-dependent branches (in place, as torchvision writes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1 = _conv(3, 8), _conv(8, 8)
        self.fc = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        x = F.relu(self.conv0(x))
        out = self.conv1(x)
        out += x
        return self.fc(F.adaptive_avg_pool2d(F.relu(out), 1).flatten(1))


NETS = {
    "silu": lambda: ActNet(F.silu),
    "gelu": lambda: ActNet(nn.GELU()),
    "hardswish": lambda: ActNet(nn.Hardswish()),
    "relu6": lambda: ActNet(nn.ReLU6(inplace=True)),
    "squeeze_excitation": SENet,
    "layer_norm": NeXtNet,
    "concatenation": DenseNet,
    "residual": ResNet,
}


def _inputs(scale: float = 2.0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 12, 12, generator=g, dtype=torch.float64) * scale
    return x, torch.tensor([0, 1, 2, 3])


def _conservation(model: nn.Module, method: str, x, t, **params) -> torch.Tensor:
    """Input relevance sum over the target logit, per image."""
    exp = get_explainer(method)(model, **params)
    exp.resolve(x[:1])
    r = exp.attribute(x, t).double()
    with torch.no_grad():
        logit = model(x).gather(1, t[:, None])[:, 0]
    assert logit.abs().min() > 0.05  # activations of order one: the 1e-6 stabilisers are negligible
    return r.sum((1, 2)) / logit


@pytest.mark.parametrize("name", list(NETS))
def test_lrp_epsilon_conserves_on_bias_free_nets(name) -> None:
    """LRP-0 (epsilon 0: zennit's 1e-6 floor) conserves the logit through every rule."""
    model = _init(NETS[name]())
    x, t = _inputs(scale=6.0 if name == "relu6" else 2.0)
    if name == "relu6":  # the rule matters where the input exceeds 6
        with torch.no_grad():
            assert (model.conv1(x) > 6).any()
    ratio = _conservation(model, "lrp_epsilon", x, t, epsilon=0.0)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["lrp_zplus", "lrp_composite"])
@pytest.mark.parametrize("name", ["silu", "squeeze_excitation", "layer_norm", "concatenation"])
def test_positive_rules_conserve_through_new_rules(name, method) -> None:
    """z-plus (and the composite's flat first layer) through the new rules.

    Behind SiLU, GELU or LayerNorm a unit's input is signed, and z-plus drops the relevance
    of a unit none of whose contributions is positive (``z+ = 0``): with 8 inputs about one
    unit in 256. Measured loss <= 3e-4 of the logit; held to 1e-3 (1e-4 behind ReLUs).
    """
    model = _init(NETS[name]())
    x, t = _inputs()
    ratio = _conservation(model, method, x, t)
    tol = 1e-4 if name in ("squeeze_excitation", "concatenation") else 1e-3
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=tol)


def test_gate_takes_no_relevance() -> None:
    """Signal-take-all: the squeeze-excitation branch gets no relevance, so the map does
    not change when the gate's weights do (as long as the gate's value is kept)."""
    model = _init(SENet())
    x, t = _inputs()
    exp = get_explainer("lrp_epsilon")(model, epsilon=0.0)
    r = exp.attribute(x, t)
    twin = copy.deepcopy(model)
    with torch.no_grad():  # same gate values, other path to them: fc1 scaled, fc2 unscaled
        twin.fc1.weight.mul_(2.0)
        twin.fc2.weight.mul_(0.5)
    # SiLU is not homogeneous, so the gate values differ a little; the map moves only with them
    assert not torch.equal(r, get_explainer("lrp_epsilon")(twin, epsilon=0.0).attribute(x, t))
    # with the gate detached the gradient through the branch is zero: relevance is the signal's
    with torch.no_grad():
        logit = model(x).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(r.double().sum((1, 2)) / logit, torch.ones(4, dtype=torch.float64),
                               rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------ refusals
class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv(3, 8)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.gn(self.conv(x))).mean((2, 3)))


class SquareGate(nn.Module):
    """Product of two same-shape activations: no operand is a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _conv(3, 8), _conv(3, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc((self.a(x) * torch.sigmoid(self.b(x))).mean((2, 3)))


class Attention(nn.Module):
    """Spatial self-attention: softmax of a product of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = _conv(3, 8, 1), _conv(3, 8, 1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        q, k, v = self.q(x).flatten(2), self.k(x).flatten(2), x.flatten(2)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
        return self.fc((v @ attn).mean(2))


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(inner)

    def forward(self, x):
        return self.features(x)


@pytest.mark.parametrize("method", LRP)
@pytest.mark.parametrize(("net", "names"), [
    (GroupNormNet, ["group_norm", "features.0.gn"]),
    (SquareGate, ["mul with no broadcast gate", "features.0"]),
    (Attention, ["matmul", "softmax", "features.0"]),
])
def test_refuses_what_has_no_rule(net, names, method) -> None:
    model = Wrapper(net()).eval()
    x = torch.randn(2, 3, 8, 8)
    exp = get_explainer(method)(model)
    with pytest.raises(UnsupportedModelError) as err:
        exp.resolve(x[:1])
    for name in [method, *names]:
        assert name in str(err.value), str(err.value)
    with pytest.raises(UnsupportedModelError):  # also without resolve, before any work
        get_explainer(method)(model).attribute(x, torch.tensor([0, 1]))


def test_refusal_leaves_model_as_it_was() -> None:
    model = Wrapper(GroupNormNet()).train()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(UnsupportedModelError):
        get_explainer("lrp_epsilon")(model).resolve(torch.randn(1, 3, 8, 8))
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags


# ------------------------------------------------------------------- torchvision networks
def _torchvision(arch: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of the batches below
    model.train()
    with torch.no_grad():  # BatchNorm statistics of this input distribution
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64))
    return model.eval()


def _bias_free(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for m in twin.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
    return twin


@pytest.mark.parametrize("arch", ["efficientnet_b0", "convnext_tiny"])
def test_composite_on_torchvision_nets(arch) -> None:
    """Runs, is finite, and conserves on the bias-free copy (float32: float64 depthwise
    convolutions take minutes on a CPU).

    Tolerance 2 % of the logit: behind SiLU / GELU / LayerNorm the inputs of a layer are
    signed, and z-plus drops the relevance of a unit with no positive contribution (about
    one in 2**9 units of a 3x3 depthwise convolution), in each of 16-18 blocks; measured
    0.8 % on efficientnet_b0. Before the rules here the maps were off by far more.
    """
    model = _bias_free(_torchvision(arch))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([3, 7])
    exp = get_explainer("lrp_composite")(model)
    exp.resolve(x[:1])
    r = exp.attribute(x, t).double()
    assert torch.isfinite(r).all()
    with torch.no_grad():
        logit = model(x).gather(1, t[:, None])[:, 0].double()
    assert logit.abs().min() > 0.05  # far above the 1e-6 stabilisers
    torch.testing.assert_close(r.sum((1, 2)), logit, rtol=2e-2, atol=0)


# -------------------------------------------------------------------------- half precision
def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from attriflow.analysis.metrics.sanity import spearman

    return float(np.mean(spearman(a.double().numpy(), b.float().double().numpy())))


def _fp16_net() -> nn.Module:
    """Conv-BN-ReLU, a SiLU conv, a squeeze-excitation gate and a residual sum, float32."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
            self.se = SENet()
            self.se.conv1 = nn.Conv2d(16, 8, 3, padding=1)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.body(x)
            return self.fc(self.se(x))

    torch.manual_seed(0)
    net = Net()
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 32, 32))
    return net.eval()


@pytest.mark.parametrize("method", LRP)
@pytest.mark.parametrize("how", ["autocast", "half"])
def test_fp16_matches_fp32_or_refuses(method, how) -> None:
    model = _fp16_net()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 3, 5, 9])
    fp32 = get_explainer(method)(model).attribute(x, t)
    try:
        if how == "autocast":
            with torch.autocast("cpu", dtype=torch.float16):
                low = get_explainer(method)(model).attribute(x, t)
        else:
            low = get_explainer(method)(copy.deepcopy(model).half()).attribute(x.half(), t)
    except UnsupportedModelError as err:  # the only acceptable failure: a refusal naming fp16
        assert "float16" in str(err)
        return
    assert torch.isfinite(low).all()
    assert not torch.equal(fp32, low)  # the arithmetic did change
    assert _spearman(fp32, low) >= 0.95
