"""The Shapley / surrogate family over superpixels (issue #17) against Captum 0.9.

Every map is compared with Captum's on the same superpixels, model and float64 inputs:
``feature_ablation`` with ``FeatureAblation``, ``shapley_sampling`` with
``ShapleyValueSampling`` under the same permutations (Captum draws them from the global
generator; ours from the image's own generator seeded alike). Images: scikit-image's
astronaut and coffee at 32 x 32, on which SLIC finds several superpixels.
"""

from __future__ import annotations

import captum.attr
import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.transform import resize

from attriflow.explainers import get_explainer
from attriflow.explainers._segments import SuperpixelParams, segment
from tests.conftest import TinyCNN


@pytest.fixture(scope="module")
def photos() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    raw = np.stack([resize(img, (32, 32), anti_aliasing=True)
                    for img in (skdata.astronaut(), skdata.coffee())])
    x = (torch.from_numpy(raw).permute(0, 3, 1, 2) - 0.5) / 0.25  # float64
    torch.manual_seed(0)
    return TinyCNN(classes=3).eval().double(), x, torch.tensor([0, 2])


def _captum(explainer, x, t, labels, **kw) -> torch.Tensor:
    """A Captum superpixel explainer's map of one image, one value per superpixel."""
    ref = explainer.attribute(x[None], target=int(t), feature_mask=labels[None, None], **kw)
    assert torch.equal(ref[0, 0], ref[0, 2])  # one value per superpixel, repeated over the channels
    return ref[0, 0].double()  # Captum sums Shapley gains in float32


@pytest.mark.parametrize("segmentation", ["slic", "grid"])
def test_feature_ablation_equals_captum(segmentation, photos) -> None:
    model, x, t = photos
    exp = get_explainer("feature_ablation")(model, segmentation=segmentation, segments=16, baseline=-1.0)
    exp.normalization = ((0.5,) * 3, (0.25,) * 3)
    ours = exp.attribute(x, t, batch_size=7)
    labels = segment(x, exp.p, exp.normalization)
    assert all(int(lab.max()) + 1 >= 6 for lab in labels)  # real superpixels, not one
    assert exp.last_forward_passes.tolist() == [int(lab.max()) + 2 for lab in labels]
    for i in range(len(x)):
        ref = _captum(captum.attr.FeatureAblation(model), x[i], t[i], labels[i], baselines=-1.0)
        torch.testing.assert_close(ours[i].double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("segmentation", ["slic", "grid"])
def test_shapley_sampling_equals_captum_under_the_same_permutations(segmentation, photos) -> None:
    model, x, t = photos
    exp = get_explainer("shapley_sampling")(model, segmentation=segmentation, segments=12, samples=5)
    seeds = torch.tensor([21, 22])
    ours = exp.attribute(x, t, batch_size=9, seeds=seeds)
    labels = segment(x, exp.p)
    for i in range(len(x)):
        torch.manual_seed(int(seeds[i]))
        ref = _captum(captum.attr.ShapleyValueSampling(model), x[i], t[i], labels[i], n_samples=5)
        torch.testing.assert_close(ours[i].double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # efficiency: the superpixels' values sum to f(x) - f(baseline), for every permutation
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    for i, lab in enumerate(labels):
        per_feature = torch.zeros(int(lab.max()) + 1, dtype=torch.float64).scatter_(0, lab.flatten(),
                                                                                    ours[i].double().flatten())
        assert float(per_feature.sum()) == pytest.approx(float(gap[i]), rel=1e-5)
    # a sample's map depends on its seed only, not on its batch
    alone = exp.attribute(x[1:], t[1:], batch_size=64, seeds=seeds[1:])
    torch.testing.assert_close(alone[0], ours[1], rtol=1e-6, atol=1e-7)


def test_slic_on_noise_warns_naming_the_setting() -> None:
    one = r"params.segmentation: SLIC found one superpixel in image\(s\) \[0\]"
    with pytest.warns(UserWarning, match=one):
        labels = segment(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                         SuperpixelParams(segments=12))
    assert int(labels[0].max()) == 0
    grid = segment(torch.zeros(1, 3, 15, 12), SuperpixelParams(segmentation="grid", segments=12))[0]
    assert sorted(torch.unique(grid).tolist()) == list(range(12))  # 3 x 4 equal cells
    assert (torch.bincount(grid.flatten()) == 15).all()


def _gradient_shap_draws(seed: int, samples: int, shape: tuple[int, ...], baseline_std: float, stdev: float
                         ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """The draws ``gradient_shap`` documents, in its order: per sample a baseline, a point
    on the path and (stdev > 0) the input noise, all from the image's generator."""
    g = torch.Generator().manual_seed(seed)
    base, alpha, noise = [], [], []
    for _ in range(samples):
        base.append(torch.randn(shape, generator=g) * baseline_std)
        alpha.append(torch.rand((), generator=g))
        noise.append(torch.randn(shape, generator=g) * stdev if stdev > 0 else torch.zeros(shape))
    return torch.stack(base).double(), torch.stack(alpha).double().numpy(), torch.stack(noise).double()


@pytest.mark.parametrize("stdev", [0.0, 0.3])
def test_gradient_shap_equals_captum_with_the_same_draws(stdev, photos, monkeypatch) -> None:
    model, x, t = photos
    samples, seeds = 6, [5, 9]
    exp = get_explainer("gradient_shap")(model, samples=samples, baseline_std=0.7, stdev=stdev)
    ours = exp.attribute(x, t, batch_size=4, seeds=torch.tensor(seeds))
    assert exp.last_forward_passes.tolist() == [samples, samples]
    for i, seed in enumerate(seeds):
        base, alpha, noise = _gradient_shap_draws(seed, samples, tuple(x.shape[1:]), 0.7, stdev)
        # Captum draws which baseline (np.random.choice), where on the path (np.random.uniform)
        # and the noise (torch.normal); each of our baselines is used once, in order
        monkeypatch.setattr(np.random, "choice", lambda k, size: np.arange(size))
        monkeypatch.setattr(np.random, "uniform", lambda lo, hi, size: alpha)
        monkeypatch.setattr(torch, "normal", lambda mean, std: noise)
        ref = captum.attr.GradientShap(model).attribute(x[i:i + 1], baselines=base, target=int(t[i]),
                                                        n_samples=samples, stdevs=stdev)
        monkeypatch.undo()
        torch.testing.assert_close(ours[i].double(), ref.sum(1)[0], rtol=1e-5,
                                   atol=1e-6 * float(ref.abs().max()))
    alone = exp.attribute(x[1:], t[1:], batch_size=64, seeds=torch.tensor(seeds[1:]))
    torch.testing.assert_close(alone[0], ours[1], rtol=1e-6, atol=1e-7)


def test_gradient_shap_from_the_zero_baseline_tends_to_integrated_gradients(photos) -> None:
    """With baseline_std = 0 every draw starts at the zero baseline: the mean over uniform
    path points is a Monte-Carlo estimate of Integrated Gradients (standard error ~ 1/sqrt(n))."""
    model, x, t = photos
    ig = get_explainer("integrated_gradients")(model, steps=64).attribute(x[:1], t[:1])
    gs = get_explainer("gradient_shap")(model, samples=400, baseline_std=0.0).attribute(
        x[:1], t[:1], seeds=torch.tensor([3]))
    rel = float((gs - ig).norm() / ig.norm())
    assert rel < 0.05, rel  # 0.015 here; gradient x input is 0.61 away


@pytest.mark.parametrize("segmentation", ["slic", "grid"])
def test_lime_and_kernel_shap_equal_captum_under_the_same_coalitions(segmentation, photos) -> None:
    from captum._utils.models.linear_model import SkLearnLasso

    model, x, t = photos
    seeds = torch.tensor([5, 9])
    # a small L1 weight: at Captum's 0.01 this random net's logit changes leave every coefficient 0
    lime = get_explainer("lime")(model, segmentation=segmentation, segments=12, samples=80, alpha=1e-4)
    shap = get_explainer("kernel_shap")(model, segmentation=segmentation, segments=12, samples=80,
                                        baseline=-0.5)
    ours_lime = lime.attribute(x, t, batch_size=7, seeds=seeds)
    ours_shap = shap.attribute(x, t, batch_size=11, seeds=seeds)
    labels = segment(x, lime.p)
    for i in range(len(x)):
        torch.manual_seed(int(seeds[i]))
        captum_lime = captum.attr.Lime(model, interpretable_model=SkLearnLasso(alpha=1e-4))
        ref = _captum(captum_lime, x[i], t[i], labels[i], n_samples=80)
        assert (ref != 0).float().mean() > 0.5  # a fit that selected superpixels, not all zeros
        torch.testing.assert_close(ours_lime[i].double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        torch.manual_seed(int(seeds[i]))
        ref = _captum(captum.attr.KernelShap(model), x[i], t[i], labels[i], n_samples=80, baselines=-0.5)
        torch.testing.assert_close(ours_shap[i].double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # Kernel SHAP's values sum to f(x) - f(baseline) (the full and empty coalitions' weight)
    with torch.no_grad():
        gap = (model(x) - model(torch.full_like(x, -0.5))).gather(1, t[:, None])[:, 0]
    for i, lab in enumerate(labels):
        per_feature = torch.zeros(int(lab.max()) + 1, dtype=torch.float64).scatter_(
            0, lab.flatten(), ours_shap[i].double().flatten())
        assert float(per_feature.sum()) == pytest.approx(float(gap[i]), rel=1e-3)
    alone = lime.attribute(x[1:], t[1:], batch_size=64, seeds=seeds[1:])
    torch.testing.assert_close(alone[0], ours_lime[1], rtol=1e-6, atol=1e-7)


def test_deeplift_shap_equals_captum_with_the_same_references(photos) -> None:
    """On a net without a ReLU feeding a max-pool (where Captum's hooks mis-order), against
    Captum's DeepLiftShap given our references; on TinyCNN (which has one) the maps still sum
    to f(x) - mean_k f(b_k) for per-image references through the max-pool."""
    from torch import nn

    _, x, t = photos
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 3)).double().eval()
    seeds = [4, 5]
    ours = get_explainer("deeplift_shap")(net, baselines=5, baseline_std=0.8).attribute(
        x, t, batch_size=1, seeds=torch.tensor(seeds))
    for i, seed in enumerate(seeds):
        refs = torch.randn((5, *x.shape[1:]), generator=torch.Generator().manual_seed(seed)).double() * 0.8
        ref = captum.attr.DeepLiftShap(net).attribute(x[i:i + 1], baselines=refs, target=int(t[i]))
        torch.testing.assert_close(ours[i].double(), ref.sum(1)[0], rtol=1e-5,
                                   atol=1e-6 * float(ref.abs().max()))
    model = photos[0]
    maps = get_explainer("deeplift_shap")(model, baselines=4).attribute(x, t, seeds=torch.tensor(seeds))
    for i, seed in enumerate(seeds):
        refs = torch.randn((4, *x.shape[1:]), generator=torch.Generator().manual_seed(seed)).double()
        with torch.no_grad():
            delta = model(x[i:i + 1])[0, t[i]] - model(refs)[:, t[i]].mean()
        assert float(maps[i].double().sum()) == pytest.approx(float(delta), rel=1e-5)


def test_an_underdetermined_surrogate_warns_and_one_superpixel_is_refused(photos) -> None:
    from attriflow.explainers import ExplainerParamError

    model, x, t = photos
    few = r"kernel_shap: params.samples \(10\) is not more than the superpixels"
    with pytest.warns(UserWarning, match=few):
        get_explainer("kernel_shap")(model, segmentation="grid", segments=16, samples=10).attribute(x, t)
    with pytest.warns(UserWarning, match=r"lime: params.samples \(10\) is not more than"):
        get_explainer("lime")(model, segmentation="grid", segments=16, samples=10, alpha=0.0).attribute(x, t)
    with pytest.raises(ExplainerParamError, match=r"'lime': segments: .*greater than or equal to 2"):
        get_explainer("lime")(model, segments=1)
