"""Randomisation units on torchvision architectures: coverage, depth and the re-draw itself."""

from __future__ import annotations

import pytest
import torch
import torchvision

from attriflow.analysis.metrics.sanity import cascading_randomisation, randomisation_units, unit_modules

FEATURES_MODELS = ("vgg11", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "convnext_tiny")
MODELS = (*FEATURES_MODELS, "resnet18")
SEEDED_CHECK = ("mobilenet_v3_small", "efficientnet_b0", "convnext_tiny")


@pytest.fixture(scope="module", params=MODELS)
def trained(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    """An untrained torchvision model moved off its initialisation, as training would.

    Norm layers start at weight 1 and bias 0, and ConvNeXt's layer_scale at 1e-6, which is
    exactly what a reset gives back. The perturbation makes each reset visible."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(request.param, weights=None, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return request.param, model


def _owners(model: torch.nn.Module, units: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Parameter name -> how many units re-initialise it."""
    others = {n for _, names in units for n in names}
    count: dict[str, int] = {}
    for _, names in units:
        for name in names:
            for sub, m in unit_modules(model, name, others):
                for p, _ in m.named_parameters(recurse=False):
                    key = f"{sub}.{p}"
                    count[key] = count.get(key, 0) + 1
    return count


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_units_cover_every_parameter_exactly_once(trained, granularity: str) -> None:
    name, model = trained
    units = randomisation_units(model, granularity)
    count = _owners(model, units)
    assert set(count) == {n for n, _ in model.named_parameters()}, name
    assert set(count.values()) == {1}, name


def test_block_cascades_have_several_depths(trained) -> None:
    name, model = trained
    units = [u for u, _ in randomisation_units(model)]
    if name == "resnet18":  # top-level children, unchanged
        assert units == ["fc", "layer4", "layer3", "layer2", "layer1", "conv1"]
    else:
        assert 5 <= len(units) <= 20, (name, units)
        assert units[0].startswith("classifier"), units  # output side first
    expected = {"vgg11": 11, "mobilenet_v3_small": 14, "efficientnet_b0": 10, "densenet121": 9,
                "convnext_tiny": 9, "resnet18": 6}
    assert len(units) == expected[name]


def test_randomising_every_unit_changes_every_tensor_deterministically(trained) -> None:
    name, model = trained
    units = randomisation_units(model)
    before = {k: v.clone() for k, v in model.named_parameters()}
    *_, (depth, _, work) = cascading_randomisation(model, units, seed=7)
    assert depth == len(units)
    after = {k: v.detach().clone() for k, v in work.named_parameters()}
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, (name, unchanged[:5])
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # trained model untouched
    assert all(torch.isfinite(v).all() for v in after.values())
    if name in SEEDED_CHECK:  # the big ones are left out for time; test_sanity checks ReferenceCNN
        *_, (_, _, again) = cascading_randomisation(model, units, seed=7)
        assert all(torch.equal(v, after[k]) for k, v in again.named_parameters()), name  # seeded


def test_convnext_layer_scale_is_redrawn_from_uniform() -> None:
    block = torchvision.models.convnext.CNBlock(8, layer_scale=1e-6, stochastic_depth_prob=0.0)
    model = torch.nn.Sequential(block)
    units = randomisation_units(model, "block", min_units=1)
    assert units == [("0", ["0"])]
    *_, (_, _, work) = cascading_randomisation(model, units, seed=0)
    scale = work[0].layer_scale
    assert scale.shape == (8, 1, 1) and scale.abs().max() <= 1 and scale.abs().min() > 1e-6
