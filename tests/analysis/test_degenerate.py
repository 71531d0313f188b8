"""Degenerate maps (issue #13): ties, constant and all-zero maps give the documented value,
never that of whichever tied pixel comes first in raster order.

Each metric is checked three ways: against a brute-force expectation over all tie orders,
at the documented value for a constant map, and for invariance when image, map and ground
truth are transposed together (which reorders tied pixels in raster order)."""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from torch import Tensor

from attriflow.analysis.metrics.complexity import gini
from attriflow.analysis.metrics.faithfulness import (
    auc,
    deletion_insertion_curves,
    drop_increase,
    gaussian_blur,
    tie_ranks,
    top_fraction_mask,
    top_fraction_masks,
)
from attriflow.analysis.metrics.localisation import bbox_accuracy, energy_pointing_game, pointing_game


class AffineProbability(torch.nn.Module):
    """Class-0 probability ``p = 0.5 + <w, x>`` (kept in (0, 1)), returned as log-probabilities
    so that the softmax gives ``p`` back: the score is affine in which pixels change."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: Tensor) -> Tensor:
        p = 0.5 + (x * self.w).sum(dim=(1, 2, 3))
        return torch.stack([p.log(), (1 - p).log()], dim=1)


class TransposeInvariant(torch.nn.Module):
    """A non-linear model whose output is the same on an image and on its transpose."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = (w + w.transpose(-1, -2)) / 2

    def forward(self, x: Tensor) -> Tensor:
        z = torch.tanh(3 * x * self.w).sum(dim=(1, 2, 3))
        return torch.stack([z, -z], dim=1)


def _t(a):
    """Swap the last two axes (numpy or torch)."""
    return a.transpose(-1, -2) if isinstance(a, Tensor) else np.swapaxes(a, -1, -2)


def _orderings(tied_map: np.ndarray) -> np.ndarray:
    """Every tie-free map that breaks the ties of ``tied_map`` (H, W) in one order, (M, H, W)."""
    flat = tied_map.ravel()
    groups = [np.flatnonzero(flat == v) for v in np.unique(flat)]
    out = []
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        m = flat.astype(np.float64).copy()
        for perm in perms:
            for r, idx in enumerate(perm):
                m[idx] += 1e-3 * r / len(perm)  # below the gap between groups
        out.append(m.reshape(tied_map.shape))
    return np.stack(out)


# --------------------------------------------------------------------------------------------
# pointing game


def test_tied_maxima_straddling_the_mask_give_the_fraction_inside() -> None:
    mask = np.zeros((1, 6, 6), bool)
    mask[0, 3:, 3:] = True
    m = np.zeros((1, 6, 6))
    m[0, 0, 0] = m[0, 0, 5] = m[0, 4, 4] = m[0, 5, 5] = 1.0  # 2 of 4 maxima inside; first one outside
    assert pointing_game(m, mask, 0.0)[0] == pytest.approx(0.5)
    m[0, 4, 4] = 0.9
    assert pointing_game(m, mask, 0.0)[0] == pytest.approx(1 / 3)


def test_constant_map_pointing_game_is_the_share_within_tolerance() -> None:
    mask = np.zeros((2, 10, 10), bool)
    mask[:, 2:4, 5:9] = True
    out = pointing_game(np.stack([np.zeros((10, 10)), np.full((10, 10), 3.0)]), mask, 0.0)
    np.testing.assert_allclose(out, [8 / 100, 8 / 100])
    near = pointing_game(np.zeros((1, 10, 10)), mask[:1], 1.0)[0]  # a one-pixel ring joins the region
    assert near == pytest.approx((4 * 6 - 4) / 100)


# --------------------------------------------------------------------------------------------
# Bbox accuracy and IoU


def _bbox_by_enumeration(m: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """Mean plain (tie-free) top-K scores over every equally likely subset of the tied
    pixels at the K-th value that enters the top K."""
    flat, k = m.ravel(), int(region.sum())
    threshold = np.sort(flat)[::-1][k - 1]
    tied = np.flatnonzero(flat == threshold)
    draw = k - int((flat > threshold).sum())
    accs, ious = [], []
    for chosen in itertools.combinations(tied, draw):
        tie_free = flat.astype(np.float64).copy()
        tie_free[tied] -= 0.5 * (1 + np.arange(len(tied))) / len(tied) * 1e-3  # distinct, below the rest
        tie_free[list(chosen)] = threshold  # the chosen ones stay on top of their group
        a, i = bbox_accuracy(tie_free.reshape(m.shape)[None], region[None])
        accs.append(a[0])
        ious.append(i[0])
    return float(np.mean(accs)), float(np.mean(ious))


@pytest.mark.parametrize("case", ["straddling", "constant", "all_zero"])
def test_bbox_and_iou_are_expectations_over_tie_orders(case: str) -> None:
    region = np.zeros((3, 3), bool)
    region[:2, :2] = True  # K = 4
    if case == "straddling":
        m = np.array([[2.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 3.0]])  # 4 tied at 1: 2 of them drawn
    else:
        m = np.full((3, 3), 0.0 if case == "all_zero" else 0.7)
    acc, iou = bbox_accuracy(m[None], region[None])
    ref_acc, ref_iou = _bbox_by_enumeration(m, region)
    assert acc[0] == pytest.approx(ref_acc, abs=1e-12) and iou[0] == pytest.approx(ref_iou, abs=1e-12)
    if case != "straddling":
        assert acc[0] == pytest.approx(4 / 9)  # chance level


# --------------------------------------------------------------------------------------------
# deletion and insertion


def test_tie_ranks_are_shared_by_tied_pixels() -> None:
    m = torch.tensor([[[1.0, 3.0, 1.0], [3.0, 0.0, 1.0]]])
    assert tie_ranks(m).tolist() == [[[2, 0, 2], [0, 5, 2]]]
    assert (tie_ranks(torch.zeros(2, 3, 3)) == 0).all()


def test_deletion_and_insertion_with_ties_equal_the_mean_over_tie_orders() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.rand(1, 2, 3, 3, generator=g, dtype=torch.float64) * 0.02
    model = AffineProbability(w)
    x = torch.rand(1, 2, 3, 3, generator=g, dtype=torch.float64)
    tied = np.array([[2.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 0.0, 2.0]])
    orders = torch.from_numpy(_orderings(tied))  # 3! * 3! * 3! = 216 tie-free maps
    with torch.no_grad():
        for steps in (9, 4):  # a point at every pixel, and points falling inside groups
            ours = deletion_insertion_curves(model, x, torch.from_numpy(tied)[None], torch.tensor([0]), steps=steps)
            ref = deletion_insertion_curves(model, x.expand(len(orders), -1, -1, -1), orders,
                                            torch.zeros(len(orders), dtype=torch.long), steps=steps, batch_size=512)
            torch.testing.assert_close(ours[0], ref.double().mean(0).float(), rtol=0, atol=1e-6)


def test_constant_map_curve_is_the_straight_line_between_the_ends() -> None:
    g = torch.Generator().manual_seed(1)
    model = TransposeInvariant(torch.randn(1, 3, 8, 8, generator=g))
    x = torch.randn(2, 3, 8, 8, generator=g)
    maps = torch.stack([torch.zeros(8, 8), torch.full((8, 8), 0.3)])
    curves = deletion_insertion_curves(model, x, maps, torch.tensor([0, 1]), steps=8)
    with torch.no_grad():
        p = lambda z: torch.softmax(model(z), 1)  # noqa: E731
        clean = p(x)[[0, 1], [0, 1]]
        removed = p(torch.zeros_like(x))[[0, 1], [0, 1]]
        blurred = p(gaussian_blur(x))[[0, 1], [0, 1]]
    line = torch.linspace(0, 1, 9)
    torch.testing.assert_close(curves[:, 0], clean[:, None] + line * (removed - clean)[:, None], rtol=0, atol=1e-6)
    torch.testing.assert_close(curves[:, 1], blurred[:, None] + line * (clean - blurred)[:, None], rtol=0, atol=1e-6)
    torch.testing.assert_close(auc(curves[:, 0]), (clean + removed) / 2, rtol=0, atol=1e-6)


def test_a_constant_map_costs_two_evaluations_per_curve() -> None:
    calls = []

    def predict(batch: Tensor) -> Tensor:
        calls.append(len(batch))
        return torch.zeros(len(batch), 2)

    deletion_insertion_curves(predict, torch.ones(3, 3, 8, 8), torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.long))
    assert sum(calls) == 3 * 2 * 2


# --------------------------------------------------------------------------------------------
# Average Drop / Increase, top-k masks


def test_top_fraction_masks_with_a_tie_at_the_threshold() -> None:
    m = torch.tensor([[[3.0, 1.0, 1.0], [1.0, 1.0, 0.0]]])  # k = 3: 1 above, 2 of 4 tied
    lower, upper, weight = top_fraction_masks(m, 0.5)
    assert lower.sum() == 1 and upper.sum() == 5 and weight.item() == pytest.approx(0.5)
    expected = top_fraction_mask(m, 0.5)
    assert expected.sum().item() == pytest.approx(3.0)
    torch.testing.assert_close(expected, torch.tensor([[[1.0, 0.5, 0.5], [0.5, 0.5, 0.0]]]))
    torch.testing.assert_close(top_fraction_mask(torch.zeros(1, 4, 5), 0.15), torch.full((1, 4, 5), 3 / 20))


def test_top_drop_with_ties_is_the_mean_over_tie_orders() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.rand(1, 1, 3, 3, generator=g, dtype=torch.float64) * 0.03  # positive: O <= Y always
    x = torch.rand(1, 1, 3, 3, generator=g, dtype=torch.float64)
    model = AffineProbability(w)
    tied = np.array([[2.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # k = 3: 1 above, 2 of 4 tied
    orders = torch.from_numpy(_orderings(tied))
    drop, inc = drop_increase(model, x, torch.from_numpy(tied)[None], torch.tensor([0]), mode="top", frac=3 / 9)
    ref, _ = drop_increase(model, x.expand(len(orders), -1, -1, -1), orders, torch.zeros(len(orders), dtype=torch.long),
                           mode="top", frac=3 / 9)
    assert drop.item() == pytest.approx(ref.mean().item(), abs=1e-4) and inc.item() == 0
    with pytest.raises(ValueError, match="mode"):
        drop_increase(model, x, torch.from_numpy(tied)[None], torch.tensor([0]), mode="hard")


def test_constant_maps_in_drop_and_increase() -> None:
    g = torch.Generator().manual_seed(3)
    model = AffineProbability(torch.rand(1, 1, 4, 5, generator=g, dtype=torch.float64) * 0.02)
    x = torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64)
    maps = torch.stack([torch.zeros(4, 5, dtype=torch.float64), torch.full((4, 5), 2.0, dtype=torch.float64)])
    t = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        y = model(x).exp()[:, 0]
        blank = model(torch.zeros_like(x)).exp()[:, 0]
    soft, _ = drop_increase(model, x, maps, t, mode="soft")  # weights 0: the mean-colour image
    torch.testing.assert_close(soft, 100 * (y - blank).clamp_min(0) / y, rtol=1e-5, atol=1e-4)
    top, _ = drop_increase(model, x, maps, t, mode="top", frac=0.15)  # 3 of 20 pixels: weight 3/20
    o = blank + 3 / 20 * (y - blank)
    torch.testing.assert_close(top, 100 * (y - o).clamp_min(0) / y, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Gini and EBPG


def test_gini_and_ebpg_of_constant_maps() -> None:
    region = np.zeros((2, 4, 4), bool)
    region[:, :2] = True
    maps = np.stack([np.zeros((4, 4)), np.full((4, 4), -2.0)])
    assert np.isnan(gini(maps[:1])).all() and gini(maps[1:])[0] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(energy_pointing_game(maps, region)).all()  # no positive energy: 0/0
    assert energy_pointing_game(-maps[1:], region[1:])[0] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# transposing everything together changes nothing


def test_transposing_image_map_and_mask_together_changes_no_metric() -> None:
    rng = np.random.default_rng(4)
    n, s = 4, 8
    maps = rng.integers(0, 3, (n, s, s)).astype(np.float64)  # many ties, maxima included
    maps[1] = 0.0  # all-zero
    maps[2] = 1.5  # constant
    masks = np.zeros((n, s, s), bool)
    masks[:, 1:4, 2:7] = True  # not symmetric: the transpose moves it
    g = torch.Generator().manual_seed(4)
    model = TransposeInvariant(torch.randn(1, 3, s, s, generator=g))
    x = torch.randn(n, 3, s, s, generator=g)
    t = torch.tensor([0, 1, 0, 1])

    def metrics(x_: Tensor, m_: np.ndarray, g_: np.ndarray) -> list[np.ndarray]:
        mt = torch.from_numpy(np.ascontiguousarray(m_))
        curves = deletion_insertion_curves(model, x_.contiguous(), mt, t, steps=16)
        out = [curves.numpy(), gini(m_), energy_pointing_game(m_, g_), *bbox_accuracy(m_, g_)]
        out += [pointing_game(m_, g_, tol) for tol in (0.0, 1.5)]
        for mode in ("soft", "top"):
            out += [v.numpy() for v in drop_increase(model, x_.contiguous(), mt, t, mode=mode, frac=0.15)]
        return out

    plain = metrics(x, maps, masks)
    moved = metrics(_t(x), _t(maps), _t(masks))
    for a, b in zip(plain, moved):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert 0 < plain[6][0] < 1  # tied maxima straddle the mask: a fraction, not 0 or 1


# --------------------------------------------------------------------------------------------
# the report and its figures take documented NaN scores


def test_report_and_figures_take_nan_scores_of_degenerate_maps() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attriflow.analysis.plots import plot_curves, plot_map_grid, plot_metric_distributions, score_frame
    from attriflow.analysis.report import metric_summary, render_markdown

    rng = np.random.default_rng(5)
    e, n, s = 2, 6, 8
    metrics = ["deletion_auc", "insertion_auc", "gini", "energy_pointing_game"]
    attribution = rng.random((e, n, s, s))
    attribution[0, :3] = 0.0  # all-zero maps: Gini and EBPG are NaN, not flagged
    attribution[1, 0] = np.nan  # a flagged map
    score = rng.random((e, n, len(metrics)))
    score[0, :3, 2:] = np.nan
    score[1, 0] = np.nan
    score[:, :, 3] = np.nan  # then no finite EBPG at all for one explainer
    score[1, 1:, 3] = 0.4
    curve = rng.random((e, n, len(metrics), 5))
    curve[:, :, 2:] = np.nan
    curve[1, 0] = np.nan
    manifest = {"name": "degenerate", "seed": 0, "taxonomy": [["gradient", "white-box / gradient"]],
                "config": {"report": {"bootstrap": 50, "confidence": 0.9}},
                "explainers": {k: {"method": k, "family": "gradient", "params": {}} for k in ("a", "b")}}
    ds = xr.Dataset(
        {"score": (("explainer", "sample", "metric"), score),
         "curve": (("explainer", "sample", "metric", "point"), curve),
         "attribution": (("explainer", "sample", "y", "x"), attribution),
         "flagged": (("explainer", "sample"), np.isnan(attribution).any(axis=(2, 3))),
         "sample_name": (("sample",), [f"s{i}" for i in range(n)])},
        coords={"explainer": ["a", "b"], "family": ("explainer", ["gradient", "gradient"]), "metric": metrics,
                "higher_is_better": ("metric", [False, True, True, True]),
                "category": ("metric", ["faithfulness", "faithfulness", "complexity", "localisation"])},
        attrs={"manifest": json.dumps(manifest)},
    )
    summary = metric_summary(ds)
    gini_a = summary[(summary["explainer"] == "a") & (summary["metric"] == "gini")].iloc[0]
    assert gini_a["n"] == 3 and np.isfinite(gini_a["mean"])  # the NaN ones are left out
    ebpg_a = summary[(summary["explainer"] == "a") & (summary["metric"] == "energy_pointing_game")].iloc[0]
    assert ebpg_a["n"] == 0 and np.isnan(ebpg_a["mean"])
    assert "degenerate" in render_markdown(ds)
    assert np.isfinite(score_frame(ds)["value"]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no all-NaN warnings either
        for fig in (plot_metric_distributions(ds), plot_curves(ds), plot_map_grid(ds)):
            plt.close(fig)
