"""Preprocessing is torchvision's classification preset; boxes land on the pixels of their masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from skimage import data as skdata

from attriflow.tasks.config import DataConfig, PreprocessConfig
from attriflow.tasks.datasets import DatasetError, Preprocess, resolve_preprocess


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_equals_resnet50_v2_transforms(name: str) -> None:
    preset = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()  # resize 232, crop 224
    img = Image.fromarray(getattr(skdata, name)())
    pp = Preprocess((224, 224), resize=232, interpolation="bilinear")
    ours = TF.normalize(torch.from_numpy(pp.image(img)), preset.mean, preset.std)
    ref = preset(img)
    assert ours.shape == ref.shape == (3, 224, 224)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)


def test_timm_style_bicubic_resize_and_crop() -> None:
    img = Image.fromarray(skdata.chelsea())
    bicubic = T.InterpolationMode.BICUBIC
    timm = T.Compose([T.Resize(168, interpolation=bicubic), T.CenterCrop(160), T.ToTensor()])
    ref = timm(img)
    out = Preprocess((160, 160), resize=168, interpolation="bicubic").image(img)
    assert out.dtype == np.float32 and out.shape == (3, 160, 160)
    assert np.abs(out - ref.numpy()).max() <= 1e-6


def test_non_square_crop_squash_and_tensor_path() -> None:
    img = Image.fromarray(skdata.coffee()[::8, ::8])  # 50 x 75
    assert Preprocess((48, 64), resize=56).image(img).shape == (3, 48, 64)
    squashed = Preprocess((48, 64), resize=None).image(img)
    assert np.abs(squashed - TF.to_tensor(TF.resize(img, [48, 64])).numpy()).max() <= 1e-6
    plain = Preprocess((32, 32), resize=40, antialias=False).image(img)  # Pillow always antialiases
    ref = TF.center_crop(TF.resize(TF.pil_to_tensor(img), [40], antialias=False), [32, 32]).float() / 255
    assert np.array_equal(plain, ref.numpy())
    rgba = Image.fromarray(np.full((20, 20, 4), 255, np.uint8))
    rgba.putalpha(0)
    assert Preprocess((16, 16), None).image(rgba).max() == 0  # transparent composites on black


def test_resize_then_crop_boxes_by_hand() -> None:
    pp = Preprocess((40, 40), resize=50)  # 100 x 200 -> 50 x 100, crop top 5, left 30
    assert pp.resized_hw((100, 200)) == (50, 100) and pp.crop_offset((100, 200)) == (5, 30)
    boxes = np.array([[0, 0, 100, 200],     # the whole image: clipped to the crop
                      [0, 0, 100, 60],      # left 60 px -> resized x [0, 30): outside the crop
                      [20, 80, 60, 120],    # inside: y [10, 30) -> [5, 25), x [40, 60) -> [10, 30)
                      [-5, 190, 30, 230]])  # over the image's border, then outside the crop
    kept, keep, clipped = pp.boxes(boxes, (100, 200))
    assert keep.tolist() == [True, False, True, False]
    assert kept.tolist() == [[0, 0, 40, 40], [5, 10, 25, 30]] and clipped == 1


def _rect(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    m = np.zeros(shape, bool)
    y0, x0, y1, x1 = (max(int(v), 0) for v in box)
    m[y0:y1, x0:x1] = True
    return m


def test_boxes_land_on_the_pixels_of_the_transformed_mask() -> None:
    rng = np.random.default_rng(7)
    total_dropped = total_clipped = 0
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(6, 90, 2))
        size = (int(rng.integers(8, 48)), int(rng.integers(8, 48)))
        u = rng.random()
        resize = None if u < 0.2 else tuple(int(v) for v in rng.integers(4, 80, 2)) if u < 0.4 \
            else int(rng.integers(4, 80))  # small values pad
        pp = Preprocess(size, resize=resize)
        y0, x0 = rng.integers(-8, h + 4, 8), rng.integers(-8, w + 4, 8)
        boxes = np.stack([y0, x0, y0 + rng.integers(1, 50, 8), x0 + rng.integers(1, 50, 8)], axis=1)
        kept, keep, clipped = pp.boxes(boxes, (h, w))
        assert kept.dtype == np.int64 and kept.shape == (keep.sum(), 4)
        rows = iter(kept)
        n_clipped = 0
        for box, k in zip(boxes, keep):
            mask = pp.mask(_rect((h, w), box))
            assert mask.shape == size
            out = _rect(size, next(rows)) if k else np.zeros(size, bool)
            assert np.array_equal(mask, out), (h, w, size, resize, box)
            if k:  # clipped: the mask of the resized image, before the crop, has pixels outside it
                big = Preprocess(pp.resized_hw((h, w)), None).mask(_rect((h, w), box))
                n_clipped += int(big.sum() > mask.sum())
        assert clipped == n_clipped
        total_dropped += int((~keep).sum())
        total_clipped += clipped
    assert total_dropped > 20 and total_clipped > 20  # both cases are exercised


def test_mask_rule_is_torchs_nearest_exact() -> None:
    m = np.random.default_rng(0).random((37, 29)) > 0.5
    t = TF.resize(torch.from_numpy(m.astype(np.uint8))[None], [23, 41],
                  interpolation=T.InterpolationMode.NEAREST_EXACT)[0].numpy().astype(bool)
    assert np.array_equal(Preprocess((23, 41), None).mask(m), t)


def test_resolve_preprocess_rules() -> None:
    auto = DataConfig(kind="imagefolder", root="x")
    assert resolve_preprocess(auto) == Preprocess((64, 64), 73)
    assert resolve_preprocess(auto, input_size=(224, 224)) == Preprocess((224, 224), 256, "bilinear")
    timm = resolve_preprocess(auto, input_size=(224, 224), crop_pct=0.95, interpolation="bicubic")
    assert timm == Preprocess((224, 224), 235, "bicubic")
    reference = resolve_preprocess(auto, input_size=(224, 224), squash_default=True)
    assert reference == Preprocess((224, 224), None)
    sized = DataConfig(kind="imagefolder", root="x", image_size=[96, 128])
    assert resolve_preprocess(sized, input_size=(224, 224)) == Preprocess((96, 128), (109, 146))
    squash = DataConfig(kind="imagefolder", root="x", preprocess="squash", image_size=32)
    assert resolve_preprocess(squash) == Preprocess((32, 32), None)
    own = PreprocessConfig(resize=180, crop=160, interpolation="nearest", antialias=False)
    given = DataConfig(kind="imagefolder", root="x", preprocess=own)
    assert resolve_preprocess(given, input_size=(224, 224)) == Preprocess((160, 160), 180, "nearest", False)
    no_crop = DataConfig(kind="imagefolder", root="x", preprocess=PreprocessConfig())
    assert resolve_preprocess(no_crop, input_size=(200, 200)) == Preprocess((200, 200), None)
    assert Preprocess((48, 64), 56).to_json() == {"size": [48, 64], "resize": 56, "interpolation": "bilinear",
                                                  "antialias": True}
    with pytest.raises(DatasetError, match="data.preprocess: the model's interpolation 'lanczos'"):
        resolve_preprocess(auto, interpolation="lanczos")


@pytest.mark.parametrize("hw", [(512, 512), (300, 451), (451, 300)])
def test_non_square_auto_covers_the_crop_without_padding(hw: tuple[int, int]) -> None:
    """A [48, 64] input from square, landscape and portrait photos: the image is scaled to
    cover floor(48 / 0.875) x floor(64 / 0.875) with its aspect ratio, so the crop is all image."""
    pp = resolve_preprocess(DataConfig(kind="imagefolder", root="x", image_size=[48, 64]), input_size=(224, 224))
    assert pp.resize == (54, 73)
    rh, rw = pp.resized_hw(hw)
    assert rh >= 54 and rw >= 73 and min(abs(rh - 54), abs(rw - 73)) == 0
    assert abs(rh / rw - hw[0] / hw[1]) < 0.02
    white = Image.new("RGB", (hw[1], hw[0]), (255, 255, 255))
    out = pp.image(white)
    assert out.shape == (3, 48, 64) and out.min() > 0.99  # no zero padding anywhere
