"""XRAI against PAIR's ``saliency`` 0.2.1 (``saliency.core.XRAI``): the whole method on a
float64 model, and the region stage (segmentation and greedy search) given the same base
attribution, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data as skdata
from skimage.transform import resize

from attriflow.explainers import UnsupportedModelError, get_explainer
from attriflow.explainers.methods.xrai import felzenszwalb_masks, xrai_regions
from tests.conftest import TinyCNN
from tests.explainers.test_paths import _pair_gradients

saliency = pytest.importorskip("saliency.core", reason="PAIR's saliency package is a test dependency")
pair_xrai = saliency.xrai


#: A normalisation that differs between channels, so that segmenting the model input instead of
#: the image would give other regions.
NORM = ((0.4, 0.5, 0.6), (0.2, 0.5, 0.3))


@pytest.fixture(scope="module")
def photos() -> tuple[torch.nn.Module, np.ndarray, torch.Tensor, torch.Tensor]:
    """A float64 TinyCNN and two photographs at 40 x 48 (HWC in [0, 1]), normalised by
    ``NORM`` (the reference CNN of test_reference.py's ``models64`` takes seconds per float64
    gradient pass on the CPU)."""
    raw = np.stack([resize(img, (40, 48), anti_aliasing=True)
                    for img in (skdata.astronaut(), skdata.coffee())])
    mean, std = (np.asarray(v) for v in NORM)
    x = torch.from_numpy((raw - mean) / std).permute(0, 3, 1, 2).contiguous()
    torch.manual_seed(0)
    return TinyCNN(classes=3).eval().double(), raw, x, torch.tensor([0, 2])


@pytest.fixture(scope="module")
def masks(photos) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ours and PAIR's (``_get_segments_felzenszwalb``) regions of the second photograph."""
    raw = photos[1][1]
    return felzenszwalb_masks(raw), pair_xrai._get_segments_felzenszwalb(raw)


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).numpy()


def test_segments_equal_pairs(masks) -> None:
    ours, pair = masks
    assert len(pair) > 20
    assert np.array_equal(ours, np.stack(pair))


@pytest.mark.parametrize(("algorithm", "normalised", "i"), [("full", False, 0), ("fast", True, 1)])
def test_xrai_equals_pair(algorithm, normalised, i, photos, masks) -> None:
    """Our map = PAIR's ``XRAI().GetMask`` with its default (min and max) baselines. PAIR
    segments the array it is given; with ``normalization`` set we segment the image with it
    undone, so PAIR then gets the segments of that image (its own ``_get_segments_felzenszwalb``,
    the ``masks`` fixture), which differ from those of the model input."""
    model, raw, x, t = photos
    exp = get_explainer("xrai")(model, steps=6, algorithm=algorithm)
    if normalised:
        exp.normalization = NORM
    ours = exp.attribute(x[i:i + 1], t[i:i + 1], batch_size=5)[0].numpy()
    segments = masks[1] if normalised else None
    if normalised:
        assert i == 1 and not np.array_equal(felzenszwalb_masks(_hwc(x[i])), masks[0])
    ref = saliency.XRAI().GetMask(_hwc(x[i]), _pair_gradients(model, int(t[i])), segments=segments,
                                  batch_size=4,
                                  extra_parameters=saliency.XRAIParameters(steps=6, algorithm=algorithm))
    assert len(np.unique(ref)) > 3  # several regions
    # PAIR sums the IG gradients in float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize(("algorithm", "area_threshold", "min_pixel_diff"),
                         [("full", 1.0, 50), ("full", 0.3, 1), ("fast", 1.0, 50)])
def test_region_stage_equals_pair(algorithm, area_threshold, min_pixel_diff, photos, masks) -> None:
    """Given the same base attribution (smoothed noise, HWC) and regions, PAIR's
    ``GetMaskWithDetails`` and ours agree bit for bit: the map and the region ranks
    (``return_xrai_segments``)."""
    img = photos[1][1]
    rng = np.random.default_rng(3)
    base = ndimage.gaussian_filter(rng.standard_normal(img.shape), (2, 2, 0))
    params = saliency.XRAIParameters(algorithm=algorithm, area_threshold=area_threshold,
                                     return_xrai_segments=True)
    params.experimental_params["min_pixel_diff"] = min_pixel_diff
    ref = saliency.XRAI().GetMaskWithDetails(img, None, segments=masks[1], base_attribution=base,
                                             extra_parameters=params)
    gains, ranks = xrai_regions(base.max(-1), masks[0], algorithm, area_threshold, min_pixel_diff)
    assert np.array_equal(gains, ref.attribution_mask)
    assert np.array_equal(ranks, ref.segments)
    assert ranks.max() > 3


def test_nan_gradient_gives_a_nan_map() -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).double().eval()
    with torch.no_grad():
        net[1].weight[0, 5] = float("nan")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert get_explainer("xrai")(net, steps=2).attribute(x, torch.tensor([0])).isnan().all()


def test_constant_image_gets_a_zero_map_and_bad_normalization_is_refused(tiny_cnn) -> None:
    """Both baselines equal a constant image, so IG is 0 (PAIR's segmentation divides 0 by 0
    there); a normalisation with the wrong number of channels is refused, naming it."""
    exp = get_explainer("xrai")(tiny_cnn, steps=2)
    out = exp.attribute(torch.full((1, 3, 10, 10), 0.3, dtype=torch.float64), torch.tensor([1]))
    assert torch.equal(out, torch.zeros(1, 10, 10))
    exp.normalization = ((0.5,), (0.25,))
    with pytest.raises(UnsupportedModelError, match="normalization"):
        exp.attribute(torch.zeros(1, 3, 10, 10, dtype=torch.float64), torch.tensor([1]))
    assert exp.cost() == {"forward": 4, "backward": 4}
