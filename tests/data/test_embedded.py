"""The embedded dataset is deterministic and its ground truth matches the drawn objects."""

from __future__ import annotations

import json

import numpy as np
import torch

from attriflow.data import REFERENCE_RECORD, REFERENCE_WEIGHTS
from attriflow.data.embedded import CLASSES, make_split, render


def test_deterministic_and_prefix_stable() -> None:
    a = make_split("test", 0, 12)
    b = make_split("test", 0, 12)
    for field in ("images", "labels", "masks", "boxes"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    # sample i does not depend on how many samples were asked for
    c = make_split("test", 5, 8)
    assert np.array_equal(c.images, a.images[5:8])
    # another seed gives other images
    assert not np.array_equal(make_split("test", 0, 12, seed=1).images, a.images)


def test_rgb_64_in_unit_range_with_ten_classes() -> None:
    s = make_split("test", 0, 200)
    assert s.images.shape == (200, 3, 64, 64) and s.images.dtype == np.float32
    assert s.images.min() >= 0 and s.images.max() <= 1
    assert set(s.labels.tolist()) == set(range(len(CLASSES))) and len(CLASSES) == 10


def test_masks_and_boxes_match_the_objects() -> None:
    for i in range(40):
        smp = render(i, split="test")
        drawn = np.abs(smp.image - smp.background).max(axis=2)
        # outside the glyph's support the image is exactly the background
        assert np.all(drawn[smp.alpha == 0] == 0)
        # inside the mask the glyph covers at least half and differs visibly
        assert smp.mask.any()
        assert np.all(smp.alpha[smp.mask] >= 0.5)
        assert np.median(drawn[smp.mask]) > 0.15
        # the box is the tight bounding box of the mask
        ys, xs = np.nonzero(smp.mask)
        assert smp.box == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        # the object is a proper part of the image
        assert 0.02 < smp.mask.mean() < 0.5


def test_train_and_test_use_disjoint_glyphs() -> None:
    from attriflow.data.embedded import _split_glyphs

    assert not set(_split_glyphs("train")) & set(_split_glyphs("test"))


def test_shipped_reference_model_reaches_95_percent() -> None:
    from attriflow.tasks.config import ModelConfig
    from attriflow.tasks.models import build_model, evaluate_accuracy

    record = json.loads(REFERENCE_RECORD.read_text())
    model = build_model(ModelConfig())
    assert model.digest == record["weights_sha256"]
    assert REFERENCE_WEIGHTS.stat().st_size < 5 * 2**20
    test = make_split("test")
    acc = evaluate_accuracy(model, test.images, test.labels)
    assert acc >= 0.95
    assert acc == record["test_accuracy"]


def test_training_is_deterministic(tmp_path) -> None:
    from attriflow.tasks.models import train_reference

    tiny = {"n_train": 96, "epochs": 1, "batch_size": 32}
    train_reference(tmp_path / "a.pt", tmp_path / "a.json", overrides=tiny, log=lambda _m: None)
    train_reference(tmp_path / "b.pt", tmp_path / "b.json", overrides=tiny, log=lambda _m: None)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert ra["weights_sha256"] == rb["weights_sha256"]
