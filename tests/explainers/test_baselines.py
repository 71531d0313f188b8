"""The sanity baselines (issue #17, family ``baseline``): maps that read no model.

Each is checked against its definition computed independently: ``sobel`` against
scikit-image on a real photograph, ``centred_gaussian`` against SciPy's normal density,
``random_map`` by a Kolmogorov-Smirnov test of uniformity and its seeding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats
from skimage import data as skdata
from skimage.filters import sobel as skimage_sobel
from skimage.transform import resize

from attriflow.explainers import Family, get_explainer, list_explainers
from tests.conftest import TinyCNN

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def photo() -> tuple[torch.nn.Module, torch.Tensor, np.ndarray]:
    """The astronaut at 48 x 40 (not square), normalised as an ImageNet model expects."""
    raw = resize(skdata.astronaut(), (48, 40), anti_aliasing=True).astype(np.float32)  # (H, W, 3) in [0, 1]
    mean, std = (torch.tensor(v)[:, None, None] for v in (MEAN, STD))
    x = (torch.from_numpy(raw).permute(2, 0, 1) - mean) / std
    torch.manual_seed(0)
    return TinyCNN(classes=3).eval(), x[None].repeat(2, 1, 1, 1), raw


def test_the_baseline_family_holds_the_three() -> None:
    names = [c.spec.name for c in list_explainers(Family.BASELINE)]
    assert names == ["centred_gaussian", "random_map", "sobel"]
    for cls in list_explainers(Family.BASELINE):
        assert cls.spec.access == () and not cls.spec.needs_internals
        assert cls.estimate_cost(cls.Params()) == {"forward": 0, "backward": 0}


def test_sobel_is_scikit_images_edge_magnitude_of_the_image_the_researcher_sees(photo) -> None:
    model, x, raw = photo
    exp = get_explainer("sobel")(model)
    exp.normalization = (MEAN, STD)
    got = exp.attribute(x, torch.tensor([0, 1]))
    want = skimage_sobel(raw.mean(2).astype(np.float64))
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-6 * want.max())
    assert torch.equal(got[0], got[1])  # the target plays no part
    # without the normalisation the edges are those of the model input, weighted by 1 / std
    plain = get_explainer("sobel")(model).attribute(x[:1], torch.tensor([0]))
    np.testing.assert_allclose(plain[0].numpy(), skimage_sobel(x[0].mean(0).double().numpy()), atol=1e-5)


def test_centred_gaussian_is_the_normal_density_at_the_centre(photo) -> None:
    model, x, _ = photo
    got = get_explainer("centred_gaussian")(model, sigma=0.2).attribute(x, torch.tensor([0, 2]))
    h, w = x.shape[-2:]
    want = np.outer(stats.norm.pdf(np.arange(h), (h - 1) / 2, 0.2 * h) / stats.norm.pdf(0, 0, 0.2 * h),
                    stats.norm.pdf(np.arange(w), (w - 1) / 2, 0.2 * w) / stats.norm.pdf(0, 0, 0.2 * w))
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[0], got[1])


def test_random_map_is_uniform_seeded_per_sample_and_ignores_the_model(photo) -> None:
    model, x, _ = photo
    x4 = x.repeat(2, 1, 1, 1)
    seeds = torch.tensor([5, 6, 7, 5])
    maps = get_explainer("random_map")(model).attribute(x4, torch.tensor([0, 1, 2, 0]), seeds=seeds,
                                                        batch_size=3)
    assert torch.equal(maps[0], maps[3]) and not torch.equal(maps[0], maps[1])
    other = TinyCNN(classes=3).eval()  # another model, another target, a batch of one: same draws
    alone = get_explainer("random_map")(other).attribute(x4[1:2], torch.tensor([2]), seeds=seeds[1:2])
    assert torch.equal(alone[0], maps[1])
    values = maps[:3].flatten().double().numpy()
    assert stats.kstest(values, "uniform").pvalue > 1e-3  # 5,760 draws from U[0, 1)
    assert abs(stats.spearmanr(maps[0].flatten(), maps[1].flatten())[0]) < 0.1  # independent per sample


def test_report_costs_a_baseline_no_pass(photo) -> None:
    import xarray as xr

    from attriflow.analysis.report import cost_table

    manifest = {"explainers": {"sobel": {"cost": {"forward": 0, "backward": 0}},
                               "saliency": {"cost": {"forward": 1, "backward": 1}}}}
    ds = xr.Dataset({"forward_passes": (("explainer", "sample"), np.array([[0, 0], [1, 0]])),
                     "backward_passes": (("explainer", "sample"), np.array([[0, 0], [1, 0]]))},
                    coords={"explainer": ["sobel", "saliency"],
                            "family": ("explainer", ["baseline", "gradient"])},
                    attrs={"manifest": json.dumps(manifest)})
    cost = cost_table(ds).set_index("explainer")
    assert cost.loc["sobel", "forward_per_image"] == 0.0 and cost.loc["sobel", "backward_per_image"] == 0.0
    assert cost.loc["saliency", "forward_per_image"] == 1.0  # the unexplained sample is left out
