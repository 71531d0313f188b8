"""Deletion / insertion against hand-computed curves and an independent blur."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from attriflow.analysis.metrics.faithfulness import auc, deletion_insertion_curves, gaussian_blur


class LinearTwoClass(torch.nn.Module):
    """logit_0 = <w, x> summed over channels, logit_1 = 0: p_0 = sigmoid(<w, x>)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x * self.w).sum(dim=(1, 2, 3))
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def test_auc_trapezoid() -> None:
    assert auc(torch.ones(5)).item() == pytest.approx(1.0)
    assert auc(torch.tensor([0.0, 1.0])).item() == pytest.approx(0.5)
    assert auc(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])).item() == pytest.approx(0.125)


def test_blur_equals_scipy_zero_padded_gaussian() -> None:
    x = torch.rand(2, 3, 20, 20, dtype=torch.float64)
    ours = gaussian_blur(x, 11, 5.0).numpy()
    for n in range(2):
        for c in range(3):
            ref = gaussian_filter(x[n, c].numpy(), sigma=5.0, mode="constant", cval=0.0, truncate=1.0)
            np.testing.assert_allclose(ours[n, c], ref, atol=1e-12)


def test_deletion_curve_of_a_perfect_ranking_on_a_linear_model() -> None:
    g = torch.Generator().manual_seed(0)
    h = w = 4
    weight = torch.rand(1, 1, h, w, generator=g, dtype=torch.float64) + 0.1
    x = torch.ones(1, 3, h, w, dtype=torch.float64)
    model = LinearTwoClass(weight)
    attributions = weight[:, 0]  # the true contribution ranking
    curves = deletion_insertion_curves(model, x, attributions, torch.tensor([0]), steps=16, batch_size=5)
    # by hand: remove pixels in decreasing weight order, substrate 0
    contrib = 3 * weight.flatten().sort(descending=True).values
    remaining = contrib.sum() - torch.cat([torch.zeros(1, dtype=torch.float64), contrib.cumsum(0)])
    expected = torch.sigmoid(remaining).float()
    torch.testing.assert_close(curves[0, 0], expected, rtol=0, atol=1e-6)
    assert curves.shape == (1, 2, 17)
    # a perfect ranking deletes faster than the reversed one
    worst = deletion_insertion_curves(model, x, -attributions, torch.tensor([0]), steps=16)
    assert auc(curves[0, 0]) < auc(worst[0, 0])
    # insertion ends at the clean input and starts at the blurred one
    blurred = gaussian_blur(x, 11, 5.0)
    start = torch.softmax(model(blurred), 1)[0, 0].float()
    assert curves[0, 1, 0].item() == pytest.approx(start.item(), abs=1e-6)
    assert curves[0, 1, -1].item() == pytest.approx(torch.sigmoid(contrib.sum()).item(), abs=1e-6)


def test_curves_do_not_depend_on_batch_size() -> None:
    g = torch.Generator().manual_seed(2)
    model = LinearTwoClass(torch.randn(1, 3, 8, 8, generator=g) * 0.1)
    x = torch.randn(3, 3, 8, 8, generator=g)
    maps = torch.randn(3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 0])
    a = deletion_insertion_curves(model, x, maps, t, steps=8, batch_size=1)
    b = deletion_insertion_curves(model, x, maps, t, steps=8, batch_size=1000)
    torch.testing.assert_close(a, b)
