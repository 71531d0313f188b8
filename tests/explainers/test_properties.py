"""Properties where no library is the oracle."""

from __future__ import annotations

import pytest
import torch

from attriflow.explainers import get_explainer


@pytest.fixture(scope="module")
def reference64():
    from attriflow.data.embedded import MEAN, STD, make_split
    from attriflow.tasks.config import ModelConfig
    from attriflow.tasks.models import build_model

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
    from attriflow.explainers import ExplainerParamError

    with pytest.raises(ExplainerParamError, match="gradient explainer"):
        get_explainer("smooth_grad")(tiny_cnn, base="grad_cam")
    with pytest.raises(ExplainerParamError, match="unknown explainer 'nope'"):
        get_explainer("smooth_grad")(tiny_cnn, base="nope")
    with pytest.raises(ExplainerParamError, match="steps"):
        get_explainer("smooth_grad")(tiny_cnn, base="integrated_gradients", base_params={"steps": 0})


class QuadrantModel(torch.nn.Module):
    """Planted signal: the class-0 logit reads only the top-left quadrant of the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 0.05 * x[:, :, :6, :6].sum(dim=(1, 2, 3)) - 2.0
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def test_rise_converges_as_masks_grow_and_finds_the_planted_region() -> None:
    """Two independent mask sets agree better with more masks; the planted region wins."""
    x = torch.ones(2, 3, 12, 12, dtype=torch.float64)
    t = torch.tensor([0, 0])

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float((a @ b) / (a.norm() * b.norm()))

    agreement = []
    for masks in (100, 800, 6400):
        rise = get_explainer("rise")(QuadrantModel(), masks=masks, grid=4)
        a = rise.attribute(x, t, seeds=torch.tensor([1, 2]), batch_size=4096)
        b = rise.attribute(x, t, seeds=torch.tensor([101, 102]), batch_size=4096)
        agreement.append(min(corr(a[i], b[i]) for i in range(2)))
    assert agreement[0] < agreement[1] < agreement[2]
    assert agreement[2] > 0.95
    inside = a[:, :6, :6].mean()
    outside = (a.sum(dim=(1, 2)) - a[:, :6, :6].sum(dim=(1, 2))).mean() / (144 - 36)
    assert inside > outside * 1.05


def test_rise_mask_mean_is_keep_probability(tiny_cnn, tiny_inputs) -> None:
    """With a constant score the map is the mean mask / keep, which tends to 1."""

    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(x), 2, dtype=x.dtype) + x.sum() * 0

    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    out = get_explainer("rise")(Constant(), masks=4000, grid=4, keep=0.3, score="prob").attribute(
        x, torch.tensor([0]), seeds=torch.tensor([5]))
    # softmax of two equal logits is 0.5 everywhere
    assert abs(out.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize(("method", "params"), [
    ("lrp_epsilon", {"epsilon": 0.0}), ("lrp_zplus", {}), ("lrp_alpha_beta", {"alpha": 1.0, "beta": 0.0}),
    ("lrp_composite", {}),
])
def test_lrp_conserves_relevance_without_biases(method, params) -> None:
    """On a bias-free ReLU network the input relevance sums to the explained logit.

    (alpha2-beta1 is not conservative where a unit has no negative contribution: there the
    positive share is counted alpha times, in zennit too; alpha1-beta0 is.)"""
    from tests.conftest import TinyCNN

    torch.manual_seed(3)
    net = TinyCNN(bias=False).double().eval()
    x = torch.rand(4, 3, 12, 12, dtype=torch.float64) + 0.1  # positive inputs: z+ sees them all
    with torch.no_grad():
        logits = net(x)
    t = logits.argmax(1)  # positive logits: the decomposition is well defined
    relevance = get_explainer(method)(net, **params).attribute(x, t).double().sum(dim=(1, 2))
    target = logits.gather(1, t[:, None])[:, 0]
    assert (target > 0).all()
    torch.testing.assert_close(relevance, target, rtol=1e-4, atol=1e-9)


def test_lrp_leaves_batchnorm_models_untouched(reference64) -> None:
    model, x, t = reference64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = model(x)
    get_explainer("lrp_composite")(model).attribute(x, t)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), out_before)
