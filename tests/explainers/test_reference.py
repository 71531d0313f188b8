"""Equality with reference libraries (Captum, pytorch-grad-cam) on the same model and inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explainers import LayerNotFoundError, default_cam_layer, get_explainer


def _close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal within ``rel`` of each map's max (issue 3's tolerance)."""
    ours, ref = ours.double(), ref.double()
    scale = ref.abs().flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    assert ((ours - ref).abs() / scale).max() <= rel


@pytest.fixture
def reference_model():
    from tasks.config import ModelConfig
    from tasks.models import build_model

    return build_model(ModelConfig()).module.double()


@pytest.fixture
def reference_inputs():
    from data.embedded import MEAN, STD, make_split

    s = make_split("test", 0, 6)
    x = (torch.from_numpy(s.images).double() - torch.tensor(MEAN).double()[:, None, None]) / torch.tensor(STD).double()[:, None, None]
    return x, torch.from_numpy(s.labels)


@pytest.mark.parametrize("which", ["tiny", "reference"])
def test_saliency_equals_captum(which, tiny_cnn, tiny_inputs, reference_model, reference_inputs) -> None:
    from captum.attr import Saliency as CaptumSaliency

    model, (x, t) = (tiny_cnn, tiny_inputs) if which == "tiny" else (reference_model, reference_inputs)
    ours = get_explainer("saliency")(model).attribute(x, t)
    ref = CaptumSaliency(model).attribute(x.clone().requires_grad_(), target=t, abs=True).amax(1)
    _close(ours, ref)
    signed = get_explainer("saliency")(model, reduce="sum").attribute(x, t)
    _close(signed, CaptumSaliency(model).attribute(x.clone(), target=t, abs=False).sum(1))


@pytest.mark.parametrize("which", ["tiny", "reference"])
def test_grad_cam_equals_captum(which, tiny_cnn, tiny_inputs, reference_model, reference_inputs) -> None:
    from captum.attr import LayerAttribution, LayerGradCam

    model, (x, t) = (tiny_cnn, tiny_inputs) if which == "tiny" else (reference_model, reference_inputs)
    layer = "relu2" if which == "tiny" else "block3"
    ours = get_explainer("grad_cam")(model, layer=layer).attribute(x, t)
    module = dict(model.named_modules())[layer]
    low = LayerGradCam(model, module).attribute(x, target=t, relu_attributions=True)
    ref = LayerAttribution.interpolate(low, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    _close(ours, ref)


def test_grad_cam_equals_pytorch_grad_cam(tiny_cnn, tiny_inputs) -> None:
    """grad-cam min-max scales its maps; compare after the same scaling (full-resolution layer)."""
    from pytorch_grad_cam import GradCAM as RefGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x, t = tiny_inputs
    ours = get_explainer("grad_cam")(tiny_cnn, layer="relu1").attribute(x, t).double()
    with RefGradCAM(model=tiny_cnn, target_layers=[tiny_cnn.relu1]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])

    def minmax(m: torch.Tensor) -> torch.Tensor:  # grad-cam's scale_cam_image
        flat = m.flatten(1)
        lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
        return (m - lo) / (1e-7 + hi - lo)

    # grad-cam scales once per layer and once more after aggregating the layers
    np.testing.assert_allclose(minmax(minmax(ours).clamp_min(0)).numpy(), ref, atol=1e-5)


def test_default_cam_layer() -> None:
    import torchvision

    from data.reference_cnn import ReferenceCNN

    x = torch.zeros(1, 3, 64, 64)
    assert default_cam_layer(ReferenceCNN(), x) == "block4"
    assert default_cam_layer(torchvision.models.resnet18(weights=None), x) == "layer4"
    assert default_cam_layer(torchvision.models.vgg11(weights=None), x) == "features"


def test_unknown_layer_lists_valid_ones(tiny_cnn) -> None:
    with pytest.raises(LayerNotFoundError) as err:
        get_explainer("grad_cam")(tiny_cnn, layer="conv9")
    msg = str(err.value)
    assert "conv9" in msg and "relu2" in msg and "conv1" in msg
