"""PAIR's path methods (issue #17): ``blur_ig`` and ``guided_ig`` against the framework-
agnostic ``saliency`` package (PAIR, 0.2.1) on the same float64 model and photographs.

PAIR's ``GuidedIG`` calls ``np.quantile(..., interpolation=...)``, a keyword NumPy 2 removed;
the test maps it to ``method=`` (the same quantile), leaving the oracle's maths as it is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data as skdata
from skimage.transform import resize

from attriflow.explainers import get_explainer
from attriflow.explainers.methods.blur_ig import gaussian_blur
from tests.conftest import TinyCNN

saliency = pytest.importorskip("saliency.core", reason="PAIR's saliency package is a test dependency")


@pytest.fixture(scope="module")
def photos() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    raw = np.stack([resize(img, (20, 24), anti_aliasing=True) for img in (skdata.astronaut(), skdata.coffee())])
    x = (torch.from_numpy(raw).permute(0, 3, 1, 2) - 0.5) / 0.25  # float64, not square
    torch.manual_seed(0)
    return TinyCNN(classes=3).eval().double(), x, torch.tensor([0, 2])


def _pair_gradients(model: torch.nn.Module, target: int):
    """PAIR's ``call_model_function``: input gradients of the target logit, channels last."""

    def call(batch, call_model_args=None, expected_keys=None):
        x = torch.from_numpy(np.asarray(batch)).permute(0, 3, 1, 2).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
        return {saliency.INPUT_OUTPUT_GRADIENTS: grad.permute(0, 2, 3, 1).numpy()}

    return call


@pytest.mark.parametrize("sigma", [0.0, 0.01, 0.7, 3.3, 12.0])
def test_gaussian_blur_is_scipys(sigma, photos) -> None:
    _, x, _ = photos
    ours = gaussian_blur(x, torch.tensor([sigma, sigma / 2], dtype=torch.float64))
    for i, s in enumerate((sigma, sigma / 2)):
        img = x[i].permute(1, 2, 0).numpy()
        ref = ndimage.gaussian_filter(img, sigma=[s, s, 0], mode="constant") if s else img
        np.testing.assert_allclose(ours[i].permute(1, 2, 0).numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("sqrt", [False, True])
def test_blur_ig_equals_pair(sqrt, photos) -> None:
    model, x, t = photos
    exp = get_explainer("blur_ig")(model, steps=12, max_sigma=8.0, sqrt=sqrt)
    ours = exp.attribute(x, t, batch_size=5)
    for i in range(len(x)):
        # batch_size=1: PAIR's batched loop credits a batch with its last step's sigma difference
        ref = saliency.BlurIG().GetMask(x[i].permute(1, 2, 0).numpy(), _pair_gradients(model, int(t[i])),
                                        steps=12, max_sigma=8.0, sqrt=sqrt, batch_size=1)
        np.testing.assert_allclose(ours[i].numpy(), ref.sum(-1), rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize(("max_dist", "baseline"), [(0.02, 0.0), (0.1, -0.5), (0.0, 0.0)])
def test_guided_ig_equals_pair(max_dist, baseline, photos, monkeypatch) -> None:
    model, x, t = photos
    quantile = np.quantile
    monkeypatch.setattr(np, "quantile",
                        lambda a, q, interpolation="linear", **kw: quantile(a, q, method=interpolation, **kw))
    exp = get_explainer("guided_ig")(model, steps=15, max_dist=max_dist, baseline=baseline)
    ours = exp.attribute(x, t, batch_size=1)
    for i in range(len(x)):
        ref = saliency.GuidedIG().GetMask(x[i].permute(1, 2, 0).numpy(), _pair_gradients(model, int(t[i])),
                                          x_baseline=np.full(x[i].permute(1, 2, 0).shape, baseline), x_steps=15,
                                          max_dist=max_dist)
        np.testing.assert_allclose(ours[i].numpy(), ref.sum(-1), rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert exp.last_forward_passes.tolist() == [15, 15]  # one gradient per step


def test_guided_ig_gives_a_nan_map_where_a_gradient_is_not_finite() -> None:
    """PAIR's loop never ends once the only features left to move have NaN gradients; ours
    stops that image's path and returns a NaN map (the pipeline flags it)."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).double().eval()
    with torch.no_grad():
        net[1].weight[0, 5] = float("nan")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert get_explainer("guided_ig")(net, steps=3).attribute(x, torch.tensor([0])).isnan().all()
