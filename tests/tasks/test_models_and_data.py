"""Model loading never downloads and says what is wrong; file datasets skip what they cannot read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from attriflow.tasks.config import DataConfig, ModelConfig
from attriflow.tasks.datasets import DatasetError, open_source, resolve_preprocess
from attriflow.tasks.models import ModelLoadError, build_model


def test_missing_weights_file_says_where(tmp_path) -> None:
    where = tmp_path / "resnet18.pth"
    with pytest.raises(ModelLoadError, match="never downloads") as err:
        build_model(ModelConfig(arch="resnet18", weights=str(where)))
    assert str(where) in str(err.value)


def test_torchvision_model_from_local_weights(tmp_path) -> None:
    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None, num_classes=5)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    loaded = build_model(ModelConfig(arch="resnet18", weights=str(path), num_classes=5))
    x = torch.rand(2, 3, 32, 32)
    net.eval()
    assert torch.equal(loaded.module(x), net(x))
    assert loaded.mean == (0.485, 0.456, 0.406)


def test_mismatched_weights_name_the_keys(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"fc.weight \(5, 512\) vs \(1000, 512\).*model.num_classes: 5"):
        build_model(ModelConfig(arch="resnet18", weights=str(path)))


@pytest.mark.parametrize("wrap", ["model", "state_dict_ema", "ddp"])
def test_training_checkpoints_are_unwrapped(tmp_path, wrap) -> None:
    """torchvision's reference scripts save {"model": ..., "optimizer": ...}; timm's may keep
    an EMA copy; DataParallel prefixes every key with "module."."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    state = net.state_dict()
    obj = ({f"module.{k}": v for k, v in state.items()} if wrap == "ddp"
           else {wrap: state, "epoch": 7, "optimizer": {"lr": 0.1}})
    torch.save(obj, tmp_path / "ckpt.pth")
    loaded = build_model(ModelConfig(arch="resnet18", weights=str(tmp_path / "ckpt.pth"), num_classes=3))
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded.module(x), net(x))


def test_pickled_checkpoint_is_refused(tmp_path) -> None:
    path = tmp_path / "full.pth"
    torch.save(torchvision.models.resnet18(weights=None), path)  # a whole pickled module
    with pytest.raises(ModelLoadError, match="weights_only=True.*Unsupported global.*state_dict"):
        build_model(ModelConfig(arch="resnet18", weights=str(path)))
    (tmp_path / "garbage.pth").write_text("garbage")  # not a checkpoint at all: no advice to unpickle it
    with pytest.raises(ModelLoadError, match=r"model.weights: '.*garbage.pth' is not a readable PyTorch checkpoint "
                                             r"\(Unsupported operand 103\)"):
        build_model(ModelConfig(arch="resnet18", weights=str(tmp_path / "garbage.pth")))


def test_unknown_arch_lists_choices() -> None:
    # said by the config itself, before the model is built (and before its missing weights)
    with pytest.raises(ValueError, match="model.arch: unknown architecture 'resnet51'.*'resnet50'"):
        ModelConfig(arch="resnet51", random_init=True)


def test_torchvision_without_weights_must_opt_in_to_random() -> None:
    from attriflow.tasks.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="model.weights: a torchvision or timm architecture needs a local"):
        parse_config({"model": {"arch": "resnet18"}})
    a = build_model(ModelConfig(arch="resnet18", random_init=True, init_seed=4))
    b = build_model(ModelConfig(arch="resnet18", random_init=True, init_seed=4))
    assert a.digest == b.digest and "randomly initialised" in a.description


def _save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)


def test_imagefolder_converts_and_skips(tmp_path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    _save(root / "cat" / "rgb.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    _save(root / "cat" / "grey.png", rng.integers(0, 255, (20, 20), dtype=np.uint8))
    _save(root / "dog" / "rgba.png", rng.integers(0, 255, (16, 16, 4), dtype=np.uint8))
    _save(root / "dog" / "deep.png", rng.integers(0, 65535, (16, 16), dtype=np.uint16))
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "dog" / "empty.png").write_bytes(b"")
    _save(root / "dog" / "whole.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    full = (root / "dog" / "whole.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(full[: len(full) // 2])
    _save(root / "dog" / "huge.png", np.zeros((120, 120), dtype=np.uint8))  # over max_pixels below
    cfg = DataConfig(kind="imagefolder", root=str(root), image_size=24, n_samples=None, max_pixels=100 * 100)
    src = open_source(cfg, resolve_preprocess(cfg, squash_default=True))
    assert src.classes == ("cat", "dog")
    assert len(src) == 5
    reasons = {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in src.skipped}
    assert sorted(reasons) == ["broken.jpg", "empty.png", "huge.png", "truncated.png"]
    assert "huge image: 120x120" in reasons["huge.png"] and "truncated" in reasons["truncated.png"]
    batch = src.load(0, 5)
    assert batch.images.shape == (5, 3, 24, 24)
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    assert batch.labels.tolist() == [0, 0, 1, 1, 1]
    grey = batch.images[src.sample_names.index("cat/grey.png")]
    assert np.allclose(grey[0], grey[1]) and np.allclose(grey[1], grey[2])
    deep = batch.images[src.sample_names.index("dog/deep.png")]
    assert deep.max() > 0.5  # 16-bit values are scaled, not clipped to white or black


def _voc_xml(path, w, h, objects):
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>" for n, (x0, y0, x1, y1) in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>{w}</width><height>{h}</height></size>{objs}</annotation>")


def test_voc_boxes_become_masks_at_image_size(tmp_path) -> None:
    root = tmp_path / "VOC"
    _save(root / "JPEGImages" / "a.png", np.zeros((100, 200, 3), np.uint8))
    _voc_xml(root / "Annotations" / "a.xml", 200, 100, [("dog", (1, 1, 60, 30)), ("cat", (101, 51, 200, 100))])
    _save(root / "JPEGImages" / "b.png", np.zeros((50, 50, 3), np.uint8))
    _voc_xml(root / "Annotations" / "b.xml", 50, 50, [("cat", (1, 1, 50, 50))])
    cfg = DataConfig(kind="voc", root=str(root), image_size=20, n_samples=None)
    src = open_source(cfg, resolve_preprocess(cfg, squash_default=True))
    assert src.classes == ("cat", "dog")
    batch = src.load(0, 2)
    assert batch.labels.tolist() == [0, 0]  # the label is the class of the largest box
    # image a: the cat box covers the bottom-right quarter of the resized image
    assert batch.boxes[0].tolist() == [10, 10, 20, 20]
    assert batch.masks[0].sum() == 100 and batch.masks[0][10:, 10:].all()
    assert batch.masks[1].all()
    assert batch.objects[0] == ((1, (0, 0, 6, 6)), (0, (10, 10, 20, 20)))  # every object, in output pixels


def test_missing_folder_is_named(tmp_path) -> None:
    cfg = DataConfig(kind="imagefolder", root=str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="data.root: folder .*nope.* does not exist"):
        open_source(cfg, resolve_preprocess(cfg))
