"""Our metrics equal Quantus's on the same inputs where Quantus implements the same one.

Quantus (a test-only dependency) defines: Sparseness = our Gini; RelevanceMassAccuracy =
our energy-based pointing game on a region (for non-negative maps, which is what EBPG
scores after clamping); PointingGame = our pointing game with zero tolerance; PixelFlipping
with a 0 baseline and softmax = our deletion curve after its first point.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import quantus
import torch
from torch import nn

from attriflow.analysis.metrics.complexity import gini
from attriflow.analysis.metrics.faithfulness import deletion_insertion_curves, pixels_per_step
from attriflow.analysis.metrics.localisation import energy_pointing_game, pointing_game


def _call(metric, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(metric(**kwargs), dtype=np.float64)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n, h, w = 6, 16, 16
    maps = rng.random((n, h, w)) ** 3  # distinct values: no ties in rankings or maxima
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        y, x = rng.integers(0, 8, 2)
        masks[i, y : y + 8, x : x + 6] = True
    maps[0][masks[0]] += 1.0  # a hit
    maps[1][~masks[1]] += 1.0  # a miss
    return maps, masks


def test_gini_equals_quantus_sparseness(data) -> None:
    maps, _ = data
    signed = maps - 0.3  # Quantus takes |a| (abs=True) as our Gini does
    theirs = _call(quantus.Sparseness(abs=True, normalise=False, disable_warnings=True), model=None,
                   x_batch=np.zeros((len(maps), 1, 16, 16)), y_batch=np.zeros(len(maps), int),
                   a_batch=signed[:, None].copy(), channel_first=True)
    np.testing.assert_allclose(gini(signed), theirs, atol=1e-6)  # Quantus adds 1e-7 to every value


def test_energy_pointing_game_equals_quantus_relevance_mass_accuracy(data) -> None:
    maps, masks = data
    theirs = _call(quantus.RelevanceMassAccuracy(abs=False, normalise=False, disable_warnings=True), model=None,
                   x_batch=np.zeros((len(maps), 1, 16, 16)), y_batch=np.zeros(len(maps), int),
                   a_batch=maps[:, None].copy(), s_batch=masks[:, None].astype(float), channel_first=True)
    np.testing.assert_allclose(energy_pointing_game(maps, masks), theirs, rtol=1e-12)


def test_pointing_game_equals_quantus(data) -> None:
    maps, masks = data
    theirs = _call(quantus.PointingGame(abs=False, normalise=False, disable_warnings=True), model=None,
                   x_batch=np.zeros((len(maps), 1, 16, 16)), y_batch=np.zeros(len(maps), int),
                   a_batch=maps[:, None].copy(), s_batch=masks[:, None].astype(float), channel_first=True)
    ours = pointing_game(maps, masks, tolerance=0.0)
    np.testing.assert_array_equal(ours, theirs)
    assert ours[0] == 1 and ours[1] == 0


def test_deletion_curve_equals_quantus_pixel_flipping(data) -> None:
    maps, _ = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 5))
    model.eval()
    x = torch.randn(len(maps), 1, 16, 16)  # float32: Quantus casts inputs to float32
    y = model(x).argmax(1)
    steps = 8
    pps = pixels_per_step(16 * 16, steps)
    ours = deletion_insertion_curves(model, x, torch.from_numpy(maps), y, steps=steps, batch_size=64)[:, 0]
    theirs = _call(quantus.PixelFlipping(features_in_step=pps, perturb_baseline=0.0, abs=False, normalise=False,
                                         disable_warnings=True),
                   model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps[:, None].copy(),
                   channel_first=True, softmax=True, device="cpu")
    assert theirs.shape == (len(maps), ours.shape[1] - 1)
    np.testing.assert_allclose(ours[:, 1:].numpy(), theirs, rtol=1e-5, atol=1e-6)
