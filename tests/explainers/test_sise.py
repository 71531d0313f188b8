"""SISE: layer selection, Otsu, fusion and the single-layer estimator by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attriflow.explainers import get_explainer
from attriflow.explainers.methods.sise import block_layers, fuse, otsu_threshold


def test_block_layers_of_known_architectures() -> None:
    import torchvision

    from attriflow.data.reference_cnn import ReferenceCNN

    x64, x224 = torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 224, 224)
    assert block_layers(ReferenceCNN().eval(), x64) == ["block1.5", "block2.5", "block3.5", "block4"]
    resnet = ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert block_layers(torchvision.models.resnet18(weights=None).eval(), x224) == resnet
    assert block_layers(torchvision.models.resnet50(weights=None).eval(), x224) == resnet
    vgg = torchvision.models.vgg16(weights=None).eval()
    assert block_layers(vgg, x224) == [f"features.{i}" for i in (3, 8, 15, 22, 29)]
    assert block_layers(vgg, x224, "output") == ["features.4", "features.9", "features.16", "features.23", "features"]


@pytest.mark.parametrize("seed", range(5))
def test_otsu_equals_scikit_image(seed) -> None:
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(seed)
    data = np.concatenate([rng.normal(0.2, 0.05, 700), rng.normal(0.7, 0.1, 300)]).reshape(25, 40)
    assert otsu_threshold(data) == pytest.approx(threshold_otsu(data), rel=1e-12)
    assert otsu_threshold(np.full((4, 4), 0.3)) == threshold_otsu(np.full((4, 4), 0.3))


def test_fusing_identical_maps_masks_the_map_by_its_otsu_region() -> None:
    torch.manual_seed(0)
    v = torch.rand(2, 16, 16, dtype=torch.float64)
    out = fuse([v, v])
    for i in range(2):
        region = v[i] > otsu_threshold(v[i].numpy())
        torch.testing.assert_close(out[i], 2 * v[i] * region)
    soft = fuse([v, v], soft=True)
    assert soft.shape == v.shape and torch.all(soft <= 2 * v + 1e-12)


def test_single_layer_equals_hand_computed_weighted_mask_sum(tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs
    ours = get_explainer("sise")(tiny_cnn, layers=["relu2"]).attribute(x, t, batch_size=5)
    # by hand: positive-gradient channels of relu2, upsampled, min-max, scored, mass-normalised
    from attriflow.explainers._hooks import capture_outputs

    xx = x.clone().requires_grad_(True)
    with capture_outputs(tiny_cnn, ["relu2"]) as acts:
        logits = tiny_cnn(xx)
    grads = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), acts["relu2"])[0]
    for i in range(len(x)):
        total = torch.zeros(12, 12, dtype=torch.float64)
        alpha = grads[i].sum(dim=(1, 2))
        for k in torch.nonzero(alpha > 0)[:, 0].tolist():
            m = F.interpolate(acts["relu2"][i, k][None, None].detach(), size=(12, 12), mode="bilinear",
                              align_corners=False)[0, 0]
            m = (m - m.min()) / (m.max() - m.min() + 1e-6)
            with torch.no_grad():
                s = torch.softmax(tiny_cnn(x[i : i + 1] * m), dim=1)[0, t[i]]
            total += s * m / (m.sum() + 1e-6)
        expected = (total - total.min()) / (total.max() - total.min() + 1e-6)
        torch.testing.assert_close(ours[i].double(), expected, rtol=1e-5, atol=1e-6)


def test_sise_records_layers_and_passes(tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs
    sise = get_explainer("sise")(tiny_cnn)
    sise.resolve(x[:1])
    assert sise.params()["resolved"] == {"layers": ["relu1", "relu2"]}
    sise.attribute(x, t, batch_size=3)
    passes = sise.last_forward_passes
    assert passes is not None and passes.shape == (5,) and (passes >= 1).all() and (passes <= 1 + 4 + 6).all()


def test_sise_unknown_layer_lists_valid_ones(tiny_cnn) -> None:
    from attriflow.explainers import LayerNotFoundError

    with pytest.raises(LayerNotFoundError, match="relu2"):
        get_explainer("sise")(tiny_cnn, layers=["relu9"])
