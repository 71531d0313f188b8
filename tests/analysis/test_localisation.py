"""Pointing games on hand-constructed cases."""

from __future__ import annotations

import numpy as np

from attriflow.analysis.metrics.localisation import (
    box_regions,
    default_tolerance,
    energy_pointing_game,
    pointing_game,
)


def test_map_equal_to_the_mask_scores_one() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((5, 20, 20), bool)
    for i in range(5):
        y, x = rng.integers(0, 15, 2)
        masks[i, y : y + 5, x : x + 5] = True
    maps = masks.astype(np.float32)
    assert np.all(pointing_game(maps, masks, 0.0) == 1)
    assert np.allclose(energy_pointing_game(maps, masks), 1.0)


def test_uniform_map_ebpg_is_the_area_fraction() -> None:
    regions = box_regions(np.array([[2, 3, 10, 13], [0, 0, 20, 5]]), 20, 20)
    out = energy_pointing_game(np.ones((2, 20, 20)), regions)
    np.testing.assert_allclose(out, [8 * 10 / 400, 20 * 5 / 400])


def test_pointing_tolerance_and_missing_ground_truth() -> None:
    masks = np.zeros((3, 10, 10), bool)
    masks[:2, 0, 0] = True
    maps = np.zeros((3, 10, 10))
    maps[0, 0, 3] = 1  # 3 px away
    maps[1, 0, 5] = 1  # 5 px away
    maps[2, 4, 4] = 1  # no ground truth
    out = pointing_game(maps, masks, tolerance=4.0)
    assert out[0] == 1 and out[1] == 0 and np.isnan(out[2])
    assert np.isnan(energy_pointing_game(-np.ones((1, 10, 10)), masks[:1]))[0]
    assert abs(default_tolerance(224) - 15) < 1e-12 and abs(default_tolerance(64) - 15 * 64 / 224) < 1e-12
