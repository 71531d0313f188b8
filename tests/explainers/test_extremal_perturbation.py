"""Extremal Perturbations: equal to TorchRay's ``extremal_perturbation``, and its area constraint holds."""

from __future__ import annotations

import pytest
import torch

from attriflow.explainers import UnsupportedModelError, get_explainer
from attriflow.explainers.methods.extremal_perturbation import SmoothMask, perturbation_pyramid
from tests.explainers.zoo_support import torchray_extremal_perturbation

#: 64-pixel images: TorchRay's 224-pixel proportions (32 grid cells, sigma = 3 steps) are
#: step 2 / sigma 6; its blur (max_blur 20) cannot be changed through ``extremal_perturbation``.
SMALL = {"step": 2, "sigma": 6.0}


@pytest.fixture(scope="module")
def models64() -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """test_reference's float64 models on their 64-pixel images, without VGG-11 (its float64
    classifier alone takes seconds to build; the zoo checks VGG against TorchRay)."""
    import torchvision

    from attriflow.data.embedded import MEAN, STD, make_split
    from attriflow.tasks.config import ModelConfig
    from attriflow.tasks.models import build_model

    x = torch.from_numpy(make_split("test", 0, 3).images).double()
    ref_x = (x - torch.tensor(MEAN).double()[:, None, None]) / torch.tensor(STD).double()[:, None, None]
    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=10).double().eval()
    return {"reference": (build_model(ModelConfig()).module.double(), ref_x, torch.tensor([3, 5, 8])),
            "resnet18": (net, (x - 0.45) / 0.225, torch.tensor([1, 4, 7]))}


def _ours(model, x, t, **params) -> torch.Tensor:
    exp = get_explainer("extremal_perturbation")(model, **params)
    return exp._attribute(x, t, None)  # float64 throughout (``attribute`` returns float32)


@pytest.mark.parametrize(("which", "variant", "images"),
                         [("reference", "preserve", 2), ("reference", "delete", 1),
                          ("resnet18", "delete", 1)])
def test_equals_torchray_in_float64(which, variant, images, models64) -> None:
    model, x, t = models64[which]
    x, t = x[:images], t[:images]
    ref = torchray_extremal_perturbation(model, x, t, areas=[0.1], max_iter=4, variant=variant,
                                         step=SMALL["step"], sigma=SMALL["sigma"])
    ours = _ours(model, x, t, area=0.1, iterations=4, variant=variant, **SMALL)
    assert ref.dtype == ours.dtype == torch.float64
    assert float((ref - ref[:, :1, :1]).abs().amax()) > 1e-3, "the masks moved"
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("settings", [
    {"variant": "dual", "perturbation": "fade", "reward": "contrastive", "area": 0.3},
    {"smooth": 0.05, "jitter": False, "num_levels": 4, "step": 2, "sigma": 6.0},
])
def test_other_settings_equal_torchray(settings, tiny_cnn, tiny_inputs) -> None:
    from torchray.attribution.extremal_perturbation import contrastive_reward, simple_reward

    x, t = tiny_inputs
    x, t = x[:2], t[:2]
    params = {"step": 1, "sigma": 3.0, "iterations": 6, **settings}
    ref = torchray_extremal_perturbation(
        tiny_cnn, x, t, areas=[params.get("area", 0.1)], max_iter=6, step=params["step"],
        sigma=params["sigma"], variant=params.get("variant", "preserve"),
        perturbation=params.get("perturbation", "blur"), smooth=params.get("smooth", 0),
        reward_func=contrastive_reward if params.get("reward") == "contrastive" else simple_reward,
        jitter=params.get("jitter", True), num_levels=params.get("num_levels", 8))
    assert float(ref.amax() - ref.amin()) > 0.01, "a mask with no structure"
    torch.testing.assert_close(_ours(tiny_cnn, x, t, **params), ref, rtol=0, atol=1e-13)


def test_float32_equals_torchray_as_written(tiny_cnn, tiny_inputs) -> None:
    """Unpatched TorchRay on a float32 model: our float32 constants are its own."""
    model = tiny_cnn.float()
    x, t = tiny_inputs[0][:2].float(), tiny_inputs[1][:2]
    ref = torchray_extremal_perturbation(model, x, t, max_iter=6, step=1, sigma=3)
    ours = get_explainer("extremal_perturbation")(model, iterations=6, step=1, sigma=3.0).attribute(x, t)
    assert ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("kind", "levels", "max_blur"), [("blur", 4, 5.0), ("fade", 5, 20.0)])
def test_pyramid_equals_torchrays_perturbation(kind, levels, max_blur) -> None:
    from torchray.attribution.extremal_perturbation import Perturbation

    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = Perturbation(x, num_levels=levels, max_blur=max_blur, type=kind).pyramid
    torch.testing.assert_close(perturbation_pyramid(x, kind, levels, max_blur)[0], ref, rtol=0, atol=1e-6)


def test_mask_takes_the_target_area(tiny_cnn, tiny_inputs, monkeypatch) -> None:
    """After enough iterations the area term wins: the whole mask (margin included, the one
    TorchRay constrains) has about ``area`` ones, from all ones at the start."""
    full: list[torch.Tensor] = []
    generate = SmoothMask.generate

    def recording(self, params):
        crop, whole = generate(self, params)
        full.append(whole.detach())
        return crop, whole

    monkeypatch.setattr(SmoothMask, "generate", recording)
    x, t = tiny_inputs
    x, t = x[:2], t[:2]
    for area in (0.2, 0.5):
        exp = get_explainer("extremal_perturbation")(tiny_cnn, area=area, iterations=60, step=2, sigma=2.0)
        exp.attribute(x, t)
        whole = full[-1].flatten(1)
        assert float(full[0].mean()) > area + 0.2  # the start: parameters all 1
        assert ((whole.mean(1) - area).abs() < 0.05).all(), (area, whole.mean(1))
        reference = (torch.arange(whole.shape[1]) >= int(whole.shape[1] * (1 - area))).double()
        assert (((whole.sort(1)[0] - reference) ** 2).mean(1) < 0.05).all()


def test_refuses_a_sigma_too_small_for_the_step(tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs
    with pytest.raises(UnsupportedModelError, match="sigma"):
        get_explainer("extremal_perturbation")(tiny_cnn, step=7, sigma=3.0).attribute(x, t)


def test_warns_when_the_mask_empties(tiny_cnn, tiny_inputs) -> None:
    """TorchRay's step 7 / sigma 21 on a 12-pixel image: one step drives the mask to 0."""
    x, t = tiny_inputs
    with pytest.warns(UserWarning, match="all 0"):
        out = get_explainer("extremal_perturbation")(tiny_cnn, iterations=3).attribute(x[:1], t[:1])
    assert not out.any()


def test_cost_and_model_untouched(tiny_cnn, tiny_inputs) -> None:
    cls = get_explainer("extremal_perturbation")
    assert cls(tiny_cnn).cost() == {"forward": 799, "backward": 799}
    assert cls(tiny_cnn, variant="dual", iterations=5).cost() == {"forward": 8, "backward": 8}
    flags = [p.requires_grad for p in tiny_cnn.parameters()]
    cls(tiny_cnn, iterations=2, step=1, sigma=3.0).attribute(*tiny_inputs)
    assert [p.requires_grad for p in tiny_cnn.parameters()] == flags
