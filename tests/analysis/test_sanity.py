"""Sanity-check numerics: SSIM and Spearman against skimage / scipy, the cascade itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from attriflow.analysis.metrics.sanity import (
    cascading_randomisation,
    collapse_depth,
    minmax,
    randomisation_units,
    similarities,
    spearman,
    ssim,
)
from attriflow.data.reference_cnn import ReferenceCNN


def test_ssim_equals_skimage() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((4, 23, 31))
    b = minmax(a + rng.normal(0, 0.4, a.shape))
    b[1] = a[1]  # identical maps: exactly 1
    ref = [structural_similarity(a[i], b[i], data_range=1.0) for i in range(4)]
    np.testing.assert_allclose(ssim(a, b), ref, rtol=1e-10, atol=1e-12)
    assert ssim(a, b)[1] == pytest.approx(1.0)


def test_spearman_equals_scipy_with_ties() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((3, 10, 10))
    b = -a + 0.3 * rng.random(a.shape)
    a[0, :4] = 0.0  # ties (a ReLU'd map)
    b[2] = np.round(b[2], 1)
    ref = [spearmanr(a[i].ravel(), b[i].ravel())[0] for i in range(3)]
    np.testing.assert_allclose(spearman(a, b), ref, rtol=1e-12)
    assert np.isnan(spearman(a[:1], np.zeros((1, 10, 10))))[0]  # a constant map has no ranks


def test_similarities_of_identical_and_inverted_maps() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2, 16, 16))
    same = similarities(a, a)
    np.testing.assert_allclose(same, 1.0, atol=1e-12)
    inv = similarities(a, -a)
    np.testing.assert_allclose(inv[:, 0], 1.0, atol=1e-12)  # |maps| agree
    np.testing.assert_allclose(inv[:, 1], -1.0, atol=1e-12)  # signed ranks reversed


def test_constant_maps_count_as_dissimilar_and_non_finite_ones_are_left_out() -> None:
    rng = np.random.default_rng(3)
    a = rng.random((3, 12, 12))
    b = a.copy()
    b[0] = 0.0  # constant: no ranks left
    b[1, 0, 0] = np.nan  # a non-finite map
    out = similarities(a, b)
    assert out[0, 0] == 0 and out[0, 1] == 0
    assert np.isnan(out[1]).all()
    np.testing.assert_allclose(out[2], 1.0)


def test_units_top_down_with_norm_layers_attached() -> None:
    assert [u for u, _ in randomisation_units(ReferenceCNN())] == ["fc", "block4", "block3", "block2", "block1"]
    layers = randomisation_units(ReferenceCNN(), "layer")
    assert layers[0] == ("fc", ["fc"]) and layers[1] == ("block4.3", ["block4.3", "block4.4"])
    assert layers[-1] == ("block1.0", ["block1.0", "block1.1"])  # conv with its BatchNorm
    resnet = randomisation_units(torchvision.models.resnet18(num_classes=3))
    assert resnet[-1] == ("conv1", ["conv1", "bn1"]) and resnet[0] == ("fc", ["fc"])
    with pytest.raises(ValueError, match="granularity"):
        randomisation_units(ReferenceCNN(), "neuron")


def test_cascade_randomises_cumulatively_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = ReferenceCNN().eval()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    units = randomisation_units(model)
    changed = []
    for depth, unit, work in cascading_randomisation(model, units, seed=3):
        state = work.state_dict()
        diff = {k.split(".")[0] for k in state if not torch.equal(state[k], trained[k])}
        changed.append(diff)
        assert diff == {u for u, _ in units[:depth]}, (depth, unit)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    again = [dict(w.state_dict()) for _, _, w in cascading_randomisation(model, units, seed=3)][-1]
    last = [dict(w.state_dict()) for _, _, w in cascading_randomisation(model, units, seed=3)][-1]
    assert all(torch.equal(again[k], last[k]) for k in again)  # seeded: reproducible


def test_collapse_depth() -> None:
    assert collapse_depth(np.array([0.9, 0.6, 0.4, 0.7])) == 3
    assert collapse_depth(np.array([0.9, 0.8])) is None
    assert collapse_depth(np.array([0.9, 0.8]), threshold=0.85) == 2
