"""Properties where no library is the oracle."""

from __future__ import annotations

import pytest
import torch

from explainers import get_explainer


@pytest.fixture(scope="module")
def reference64():
    from data.embedded import MEAN, STD, make_split
    from tasks.config import ModelConfig
    from tasks.models import build_model

    s = make_split("test", 0, 4)
    x = torch.from_numpy(s.images).double()
    x = (x - torch.tensor(MEAN).double()[:, None, None]) / torch.tensor(STD).double()[:, None, None]
    return build_model(ModelConfig()).module.double(), x, torch.from_numpy(s.labels)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_completeness(rule, reference64) -> None:
    model, x, t = reference64
    attr = get_explainer("integrated_gradients")(model, steps=256, rule=rule).attribute(x, t, batch_size=128)
    with torch.no_grad():
        gap = model(x).gather(1, t[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, t[:, None])[:, 0]
    total = attr.double().sum(dim=(1, 2))
    assert torch.all((total - gap).abs() <= 0.01 * gap.abs()), (total, gap)


def test_smooth_grad_without_noise_is_the_base_method(reference64) -> None:
    model, x, t = reference64
    for base, params in (("saliency", {}), ("integrated_gradients", {"steps": 8})):
        smooth = get_explainer("smooth_grad")(model, base=base, base_params=params, noise_level=0.0, samples=3)
        plain = get_explainer(base)(model, **params).attribute(x, t)
        torch.testing.assert_close(smooth.attribute(x, t, seeds=torch.arange(4)), plain, rtol=1e-5, atol=1e-7)


def test_smooth_grad_noise_depends_on_sample_seed_only(reference64) -> None:
    model, x, t = reference64
    sg = get_explainer("smooth_grad")(model, samples=6)
    a = sg.attribute(x, t, seeds=torch.tensor([1, 2, 3, 4]))
    b = sg.attribute(x[2:], t[2:], seeds=torch.tensor([3, 4]), batch_size=5)
    c = sg.attribute(x, t, seeds=torch.tensor([9, 2, 3, 4]))
    torch.testing.assert_close(a[2:], b, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(a[0], c[0]) and torch.allclose(a[1:], c[1:])
    var = get_explainer("smooth_grad")(model, samples=6, variant="vargrad").attribute(x, t, seeds=torch.arange(4))
    assert (var >= -1e-6).all() and var.abs().sum() > 0


def test_smooth_grad_rejects_non_gradient_bases(tiny_cnn) -> None:
    from explainers import ExplainerParamError

    with pytest.raises(ExplainerParamError, match="gradient explainer"):
        get_explainer("smooth_grad")(tiny_cnn, base="grad_cam")
    with pytest.raises(ExplainerParamError, match="unknown explainer 'nope'"):
        get_explainer("smooth_grad")(tiny_cnn, base="nope")
    with pytest.raises(ExplainerParamError, match="steps"):
        get_explainer("smooth_grad")(tiny_cnn, base="integrated_gradients", base_params={"steps": 0})
