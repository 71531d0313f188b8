"""``eigen_smooth`` and ``aug_smooth`` of every CAM, against pytorch-grad-cam's options of the same
names (``BaseCAM.__call__``) on float64 models."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attriflow.explainers import REGISTRY, ExplainerParamError, get_explainer
from attriflow.explainers._cam import CAMExplainer
from attriflow.explainers.base import ExplainerSpec, Family
from tests.explainers.test_reference import _gradcam_postprocess

LAYERS = {"reference": "block2", "resnet18": "layer3"}

#: ours -> pytorch-grad-cam's class
PEERS = {"grad_cam": "GradCAM", "hires_cam": "HiResCAM", "grad_cam_plus_plus": "GradCAMPlusPlus",
         "layer_cam": "LayerCAM", "xgrad_cam": "XGradCAM", "grad_cam_elementwise": "GradCAMElementWise"}


@pytest.fixture(scope="module")
def nets64():
    """The reference CNN and a randomly initialised ResNet-18, float64, with three inputs each
    (the recipe of test_reference's ``models64``, without VGG)."""
    import torchvision

    from attriflow.data.embedded import MEAN, STD, make_split
    from attriflow.tasks.config import ModelConfig
    from attriflow.tasks.models import build_model

    s = make_split("test", 0, 3)
    x = torch.from_numpy(s.images).double()
    ref_x = (x - torch.tensor(MEAN).double()[:, None, None]) / torch.tensor(STD).double()[:, None, None]
    reference = build_model(ModelConfig()).module.double().eval()
    out = {"reference": (reference, ref_x, torch.from_numpy(s.labels))}
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).double().eval()
    out["resnet18"] = (net, (x - 0.45) / 0.225, torch.tensor([1, 4, 7]))
    return out


def _peer(name: str, model: torch.nn.Module, layer: str, x: torch.Tensor, t: torch.Tensor,
          **options: bool) -> np.ndarray:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = dict(model.named_modules())[layer]
    with getattr(pytorch_grad_cam, PEERS[name])(model=model, target_layers=[module]) as cam:
        targets = [ClassifierOutputTarget(int(c)) for c in t]
        return cam(input_tensor=x.clone().requires_grad_(), targets=targets, **options)


#: every method on the reference CNN (16 x 16 positions > 32 channels: the covariance branch of
#: ``first_component``), two on ResNet-18 (4 x 4 positions < 256 channels: the Gram branch)
EIGEN_CASES = [(n, "reference") for n in PEERS] + [("grad_cam", "resnet18"),
                                                   ("grad_cam_plus_plus", "resnet18")]


@pytest.mark.parametrize(("name", "which"), EIGEN_CASES)
def test_eigen_smooth_equals_pytorch_grad_cam_up_to_sign(name, which, nets64) -> None:
    """The first principal component of the weighted activations (``get_2d_projection``):
    pytorch-grad-cam keeps LAPACK's sign, ours is oriented, so each image's map must equal
    grad-cam's output after its post-processing with one of the two signs, not both."""
    model, x, t = nets64[which]
    x, t = x[:2], t[:2]
    layer = LAYERS[which]
    low = get_explainer(name)(model, layer=layer, eigen_smooth=True, relu=False).layer_map(x, t)
    ref = _peer(name, model, layer, x, t, eigen_smooth=True)
    size = tuple(x.shape[-2:])
    plain = get_explainer(name)(model, layer=layer, relu=False).layer_map(x, t)
    for i in range(len(x)):
        errs = [float(np.abs(_gradcam_postprocess(s * low[i : i + 1], size).numpy() - ref[i : i + 1]).max())
                for s in (1.0, -1.0)]
        assert min(errs) <= 2e-5 < max(errs), errs
        # oriented: correlates positively with the unsmoothed map (the channel sum)
        assert ((low[i] - low[i].mean()) * (plain[i] - plain[i].mean())).sum() >= 0


@pytest.mark.parametrize("name", list(PEERS))
def test_aug_smooth_equals_pytorch_grad_cam(name, nets64) -> None:
    """Six copies (flip x 0.9, 1, 1.1), each map min-max scaled, flipped back, averaged:
    pytorch-grad-cam's output itself (already scaled), to its float32 precision."""
    model, x, t = nets64["reference"]
    x, t = x[:1], t[:1]
    layer = LAYERS["reference"]
    exp = get_explainer(name)(model, layer=layer, aug_smooth=True)
    ours = exp.attribute(x, t)
    ref = _peer(name, model, layer, x, t, aug_smooth=True)
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-5)
    plain = _gradcam_postprocess(get_explainer(name)(model, layer=layer).layer_map(x, t), tuple(x.shape[-2:]))
    assert float((ours - plain.float()).abs().max()) > 1e-3  # the augmentation changed the map
    assert exp.cost() == {"forward": 6, "backward": 6}
    if name == "grad_cam":  # independent of the batch size (the six copies are split into passes)
        torch.testing.assert_close(exp.attribute(x, t, batch_size=4), ours, rtol=1e-6, atol=1e-7)


def test_smoothing_of_forward_only_cams_counts_passes(nets64) -> None:
    """Score-CAM (its map, weights x activations, projected and augmented) on a narrow layer:
    equal to pytorch-grad-cam's ``eigen_smooth`` up to sign; with ``aug_smooth`` the passes
    of the six copies are counted per image."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, x, t = nets64["reference"]
    x, t = x[:1, :, :32, :32], t[:1]  # 16 channels at 16 x 16: 17 passes per map
    params = {"layer": "block1", "score": "logit", "channel_softmax": True, "align_corners": True}
    low = get_explainer("score_cam")(model, eigen_smooth=True, relu=False, **params).layer_map(x, t)
    module = dict(model.named_modules())["block1"]
    with pytorch_grad_cam.ScoreCAM(model=model, target_layers=[module]) as cam:
        cam.batch_size = 64
        targets = [ClassifierOutputTarget(int(c)) for c in t]
        ref = cam(input_tensor=x.clone().requires_grad_(), targets=targets, eigen_smooth=True)
    for i in range(len(x)):
        errs = [float(np.abs(_gradcam_postprocess(s * low[i : i + 1], tuple(x.shape[-2:])).numpy()
                             - ref[i : i + 1]).max()) for s in (1.0, -1.0)]
        assert min(errs) <= 2e-5 < max(errs), errs
    exp = get_explainer("score_cam")(model, aug_smooth=True, **params)
    exp.attribute(x, t)
    width = int(exp.activations(x[:1], t[:1])[0].shape[1])
    assert exp.last_forward_passes.tolist() == [6 * (1 + width)]
    assert exp.cost()["forward"] == "6 x (1 + channels(layer))"


def test_hires_cam_eigen_smooth_is_eigen_grad_cam(nets64) -> None:
    """Both are the oriented first principal component of gradients x activations."""
    model, x, t = nets64["resnet18"]
    x, t = x[:2], t[:2]
    ours = get_explainer("hires_cam")(model, layer="layer3", eigen_smooth=True).attribute(x, t)
    torch.testing.assert_close(ours, get_explainer("eigen_grad_cam")(model, layer="layer3").attribute(x, t))


def test_every_cam_supports_or_refuses_the_options(tiny_cnn, tiny_inputs) -> None:
    """Each registered CAM either computes both options or refuses ``eigen_smooth`` at
    construction, naming itself and why; ``aug_smooth`` needs the ReLU."""
    x, t = tiny_inputs
    cams = sorted(n for n, c in REGISTRY.items() if issubclass(c, CAMExplainer))
    assert {"grad_cam", "eigen_cam", "score_cam", "ablation_cam", "fem"} <= set(cams)
    for name in cams:
        cls = get_explainer(name)
        if cls.has_weighted():
            out = cls(tiny_cnn, eigen_smooth=True, aug_smooth=True, relu=True).attribute(x[:2], t[:2])
            assert out.shape == (2, 12, 12) and torch.isfinite(out).all()
            assert 0 <= float(out.min()) and float(out.max()) <= 1
        else:
            with pytest.raises(ExplainerParamError, match=rf"{name}.*eigen_smooth=True.*principal component"):
                cls(tiny_cnn, eigen_smooth=True)
        with pytest.raises(ExplainerParamError, match=rf"{name}.*aug_smooth=True needs relu=True"):
            cls(tiny_cnn, aug_smooth=True, relu=False)
    for name in ("eigen_cam", "kpca_cam", "eigen_grad_cam"):
        assert not get_explainer(name).has_weighted()
    for name in ("guided_grad_cam", "sise"):  # not CAMExplainers: the options do not exist there
        with pytest.raises(ExplainerParamError, match="eigen_smooth"):
            get_explainer(name)(tiny_cnn, eigen_smooth=True)


def test_a_cam_with_its_own_attribute_refuses_aug_smooth(tiny_cnn) -> None:
    class Own(CAMExplainer):
        spec = ExplainerSpec(name="own_cam", family=Family.CAM)

        def _attribute(self, inputs, targets, generators):
            return inputs.sum(1)

    with pytest.raises(ExplainerParamError, match="own_cam.*aug_smooth=True is not supported"):
        Own(tiny_cnn, aug_smooth=True)
    with pytest.raises(ExplainerParamError, match="own_cam.*eigen_smooth=True does not apply"):
        Own(tiny_cnn, eigen_smooth=True)


def test_defaults_unchanged(tiny_cnn, tiny_inputs) -> None:
    """Both options False: the map is the channel sum of the weighted activations (Grad-CAM
    by hand), and ``params()`` and the provenance digest are those from before the options
    existed, so stored maps keep their entries."""
    x, t = tiny_inputs
    exp = get_explainer("grad_cam")(tiny_cnn, layer="relu2", eigen_smooth=False, aug_smooth=False)
    acts, grads = exp.activations(x, t)
    low = (grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1).clamp_min(0)
    expected = F.interpolate(low[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(exp.attribute(x, t), expected.float())
    old = {"layer": "relu2", "score": "logit", "relu": True}
    assert exp.params() == old
    blob = json.dumps({"name": "grad_cam", "version": 2, "params": old}, sort_keys=True)
    assert exp.digest() == hashlib.sha256(blob.encode()).hexdigest()
    smoothed = get_explainer("grad_cam")(tiny_cnn, layer="relu2", eigen_smooth=True)
    assert smoothed.params()["eigen_smooth"] is True and smoothed.digest() != exp.digest()
