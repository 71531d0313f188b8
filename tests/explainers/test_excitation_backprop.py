"""Excitation Backprop and Contrastive Excitation Backprop equal TorchRay's
(``torchray.attribution.excitation_backprop``) on the float64 reference CNN, ResNet-18 and
VGG-11, at an intermediate layer and at the input, and refuse what they have no rule for."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from attriflow.explainers import UnsupportedModelError, get_explainer
from tests.explainers.test_reference import _close, models64  # noqa: F401 (fixture)

#: intermediate layers (TorchRay's benchmark reads EB inside the network and resizes)
LAYERS = {"reference": "block3", "resnet18": "layer3", "vgg11": "features.15"}
#: contrast layers for TorchRay: each is crossed by every path from the layer to the logits
CONTRAST = {"reference": ("pool", "block4"), "resnet18": ("avgpool",)}


def _torchray(fn, model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """A TorchRay call on the shared model, its parameters' ``requires_grad`` restored
    (TorchRay switches them off); torchvision ResNets run on ``update_resnet`` of a copy,
    whose ``EltwiseSum`` is the residual rule we give every addition."""
    from torchray.attribution.excitation_backprop import update_resnet
    from torchvision.models.resnet import ResNet

    net = update_resnet(copy.deepcopy(model)) if isinstance(model, ResNet) else model
    flags = [p.requires_grad for p in model.parameters()]
    try:
        return fn(net, *args, **kwargs)[:, 0]
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


@pytest.mark.parametrize("which", list(LAYERS))
def test_excitation_backprop_equals_torchray(which, models64) -> None:  # noqa: F811
    from torchray.attribution.excitation_backprop import excitation_backprop

    model, x, t = models64[which]
    exp = get_explainer("excitation_backprop")(model, layer=LAYERS[which])
    ours = exp.attribute(x, t)
    ref = _torchray(excitation_backprop, model, x.clone(), t, saliency_layer=LAYERS[which], resize=True)
    _close(ours, ref, rel=1e-6)  # float32 output of float64 maths
    if which == "resnet18":  # TorchRay without update_resnet copies the signal at every "+"
        plain = excitation_backprop(model, x.clone(), t, saliency_layer=LAYERS[which], resize=True)[:, 0]
        for p in model.parameters():
            p.requires_grad_(False)  # as the fixture left them
        with pytest.raises(AssertionError):
            _close(ours, plain, rel=0.1)


def test_excitation_backprop_conserves_the_probability(models64) -> None:  # noqa: F811
    """The signal starts as the one-hot target and sums to 1 at every layer of a ReLU net."""
    model, x, t = models64["reference"]
    for layer in ("block4", "block2"):
        total = get_explainer("excitation_backprop")(model, layer=layer).layer_map(x, t).sum(dim=(1, 2))
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-9)
    contrastive = get_explainer("contrastive_excitation_backprop")(model, layer="block4")
    total = contrastive.layer_map(x, t).sum(dim=(1, 2))
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-9)


def test_excitation_backprop_at_the_input_equals_torchray(models64) -> None:  # noqa: F811
    """At the input (TorchRay's ``saliency_layer=''``) on non-negative images; a signed
    (normalised) image makes the first convolution's inputs negative: refused, naming it."""
    from torchray.attribution.excitation_backprop import excitation_backprop

    model, x, t = models64["reference"]
    pos = (x - x.amin()) / (x.amax() - x.amin())
    ours = get_explainer("excitation_backprop")(model, layer="input").attribute(pos, t)
    ref = _torchray(excitation_backprop, model, pos.clone(), t, saliency_layer="", resize=True)
    _close(ours, ref, rel=1e-6)
    with pytest.raises(UnsupportedModelError, match=r"block1.0 \(min input .*negative inputs"):
        get_explainer("excitation_backprop")(model, layer="input").attribute(x, t)


@pytest.mark.parametrize("which", ["reference", "resnet18"])  # VGG: in the zoo
def test_contrastive_excitation_backprop_equals_torchray(which, models64) -> None:  # noqa: F811
    """TorchRay subtracts the negated classifier's signal at ``contrast_layer``; every rule is
    linear in the signal, so any contrast layer crossed by all paths gives our one-pass map."""
    from torchray.attribution.excitation_backprop import contrastive_excitation_backprop

    model, x, t = models64[which]
    if which != "reference":
        x, t = x[:1], t[:1]
    exp = get_explainer("contrastive_excitation_backprop")(model, layer=LAYERS[which])
    ours = exp.attribute(x, t)
    assert exp.classifier_name(x) == "fc"
    for contrast in CONTRAST[which]:
        ref = _torchray(contrastive_excitation_backprop, model, x.clone(), t, saliency_layer=LAYERS[which],
                        contrast_layer=contrast, resize=True)
        _close(ours, ref, rel=1e-6)


def _net(*middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), *middle, nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).double().eval()


@pytest.mark.parametrize("name", ["excitation_backprop", "contrastive_excitation_backprop"])
def test_refusals_name_the_module(name) -> None:
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 2])
    # an activation without a rule (SiLU) in module "3"
    silu = _net(nn.Conv2d(4, 4, 3, padding=1), nn.SiLU())
    with pytest.raises(UnsupportedModelError, match=r"silu .* in 3"):
        get_explainer(name)(silu, layer="0").attribute(x, t)
    # a linear bottleneck: conv -> BatchNorm (no ReLU) -> conv "4" gets signed inputs
    bottleneck = _net(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.ReLU()).eval()
    with torch.no_grad():
        bottleneck[3].running_mean.fill_(1.0)  # makes the BatchNorm output negative somewhere
    with pytest.raises(UnsupportedModelError, match=r"4 \(min input .*negative inputs"):
        get_explainer(name)(bottleneck, layer="1").attribute(x, t)
    # a layer without feature maps
    with pytest.raises(UnsupportedModelError, match=r"params.layer '3' outputs shape \(1, 4\)"):  # at check
        get_explainer(name)(_net(), layer="3").attribute(x, t)


def test_contrastive_classifier_layer_refusals() -> None:
    model = _net()
    with pytest.raises(UnsupportedModelError, match=r"classifier_layer '1' is a ReLU"):
        get_explainer("contrastive_excitation_backprop")(model, classifier_layer="1")
    x, t = torch.rand(1, 3, 8, 8, dtype=torch.float64), torch.tensor([1])
    with pytest.raises(UnsupportedModelError, match=r"classifier_layer '0' is not between"):
        exp = get_explainer("contrastive_excitation_backprop")(model, layer="1", classifier_layer="0")
        exp.attribute(x, t)


class _Scaled(nn.Module):
    """A residual block whose branch is scaled by a constant (a layer scale)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.c0, self.c1, self.fc, self.scale = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
            nn.Linear(8, 3), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c0(x))
        h = torch.relu(h + self.scale * torch.relu(self.c1(h)))
        return self.fc(h.mean((2, 3)))


def test_a_constant_scale_is_a_diagonal_layer_and_a_negative_one_is_refused() -> None:
    """``h + s * branch``: with s > 0 the scale's share is 1 and the map still sums to 1 (a
    plain gradient would scale the signal by s); s < 0 has w+ = 0 and is refused."""
    torch.manual_seed(0)
    x, t = torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    sums = get_explainer("excitation_backprop")(_Scaled(0.2).double().eval(), layer="c0").layer_map(x, t)
    torch.testing.assert_close(sums.sum((1, 2)), torch.ones(2, dtype=torch.float64))
    with pytest.raises(UnsupportedModelError, match="factor <= 0"):
        get_explainer("excitation_backprop")(_Scaled(-0.5).double().eval(), layer="c0").attribute(x, t)
    negated = _Scaled(1.0).double().eval()
    negated.forward = lambda x: negated.fc(torch.relu(torch.relu(negated.c0(x)) + (0 - torch.relu(  # type: ignore
        negated.c1(torch.relu(negated.c0(x)))))).mean((2, 3)))
    with pytest.raises(UnsupportedModelError, match="rsub"):  # 0 - r: a negation
        get_explainer("excitation_backprop")(negated, layer="c0").attribute(x, t)


def test_frozen_batch_norm_takes_batch_norms_rule() -> None:
    """torchvision's FrozenBatchNorm2d (``x * scale + shift``, signed scales) gives the map of
    the equal nn.BatchNorm2d, which EB passes through."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(4, eps=bn.eps)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(frozen, name).copy_(getattr(bn, name).detach())
    plain = _net(nn.Conv2d(4, 4, 3, padding=1), bn, nn.ReLU())  # 0 conv, 1 relu, 2 conv, 3 bn, 4 relu
    twin = copy.deepcopy(plain)
    twin[3] = frozen.double()
    x, t = torch.rand(2, 3, 12, 12, dtype=torch.float64), torch.tensor([0, 1])
    torch.testing.assert_close(plain(x), twin(x))
    exp = get_explainer("excitation_backprop")
    torch.testing.assert_close(exp(twin, layer="1").attribute(x, t), exp(plain, layer="1").attribute(x, t))


def test_batch_statistics_are_refused() -> None:
    """A BatchNorm without running statistics makes each image's shares depend on its batch."""
    model = _net(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    for name in ("excitation_backprop", "contrastive_excitation_backprop"):
        with pytest.raises(UnsupportedModelError, match="batch statistics"):
            get_explainer(name)(model, layer="1").attribute(x, torch.tensor([0, 1]))


@pytest.mark.parametrize(("params", "words"), [({"layer": "1"}, "negative inputs"),
                                               ({"layer": "7"}, "no (N, C, h, w) feature maps")])
def test_refusals_of_the_backward_pass_come_at_check(params, words) -> None:
    """A linear bottleneck (1 x 1 conv without ReLU) and a map layer without feature maps are
    found by the one-image trial of ``check``, which the run calls before any shard."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    with pytest.raises(UnsupportedModelError, match=re.escape(words)):
        get_explainer("excitation_backprop")(model, **params).check(torch.randn(1, 3, 8, 8))
