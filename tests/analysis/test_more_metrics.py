"""Drop/Increase, Bbox/IoU and Gini on hand-constructed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attriflow.analysis.metrics.complexity import gini
from attriflow.analysis.metrics.faithfulness import drop_increase, top_fraction_mask
from attriflow.analysis.metrics.localisation import bbox_accuracy, box_regions


class Linear2(torch.nn.Module):
    """logit_0 = <w, x>, logit_1 = 0."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x * self.w).sum(dim=(1, 2, 3))
        return torch.stack([z, torch.zeros_like(z)], 1)


def test_gini_known_values() -> None:
    uniform = np.ones((1, 8, 8))
    one_hot = np.zeros((1, 8, 8))
    one_hot[0, 3, 4] = 5.0
    assert gini(uniform)[0] == pytest.approx(0.0, abs=1e-12)
    assert gini(one_hot)[0] == pytest.approx(1 - 1 / 64)
    assert np.isnan(gini(np.zeros((1, 4, 4)))[0])


def test_drop_and_increase_by_hand() -> None:
    w = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    w[..., :2, :] = 1.0  # only the top half matters
    model = Linear2(w)
    x = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    t = torch.tensor([0])
    y = torch.sigmoid(torch.tensor(0.5 * 24.0)).item()
    # a map on the top half keeps everything that matters: no drop, no increase
    top_map = torch.zeros(1, 4, 4, dtype=torch.float64)
    top_map[:, :2] = 1.0
    for mode in ("soft", "top"):
        drop, inc = drop_increase(model, x, top_map, t, mode=mode, frac=0.5)
        assert drop.item() == pytest.approx(0.0, abs=1e-9) and inc.item() == 0
    # a map on the bottom half removes all evidence: O = 0.5
    bottom = 1 - top_map
    drop, inc = drop_increase(model, x, bottom, t, mode="top", frac=0.5)
    assert drop.item() == pytest.approx(100 * (y - 0.5) / y) and inc.item() == 0
    # for class 1, removing evidence for class 0 raises its confidence: an increase
    drop1, inc1 = drop_increase(model, x, bottom, torch.tensor([1]), mode="soft")
    assert drop1.item() == 0 and inc1.item() == 100


def test_top_fraction_mask_counts() -> None:
    m = torch.arange(16, dtype=torch.float64).view(1, 4, 4)
    mask = top_fraction_mask(m, 0.25)
    assert mask.sum() == 4 and mask[0, 3].sum() == 4


def test_bbox_accuracy_and_iou() -> None:
    regions = box_regions(np.array([[0, 0, 2, 2]]), 4, 4)
    perfect = regions.astype(float)
    acc, iou = bbox_accuracy(perfect, regions)
    assert acc[0] == 1 and iou[0] == 1
    shifted = np.zeros((1, 4, 4))
    shifted[0, 1:3, 1:3] = 1.0
    acc, iou = bbox_accuracy(shifted, regions)
    assert acc[0] == pytest.approx(1 / 4) and iou[0] == pytest.approx(1 / 7)
