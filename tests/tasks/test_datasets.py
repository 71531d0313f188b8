"""Manifests, COCO, the ImageNet-validation layout, class matching and ground truth per class."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from attriflow.data.embedded import make_split
from attriflow.tasks.config import DataConfig
from attriflow.tasks.datasets import DatasetError, Preprocess, ground_truth, open_source, resolve_preprocess

SQUASH = Preprocess((20, 20), None)  # 40 x 40 images -> 20 x 20: every coordinate halves


def _img(path, h=40, w=40, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def test_ground_truth_is_the_union_of_the_class_boxes() -> None:
    objects = [((0, (0, 0, 2, 2)), (1, (5, 5, 6, 8)), (0, (3, 3, 4, 4))), (), None]
    masks, boxes = ground_truth(objects, np.array([0, 0, 1]), (8, 8))
    assert masks.shape == (3, 8, 8) and masks.dtype == bool and boxes.dtype == np.int64
    assert masks[0].sum() == 5 and masks[0][3, 3] and not masks[0][5, 5]
    assert boxes.tolist() == [[0, 0, 4, 4], [-1, -1, -1, -1], [-1, -1, -1, -1]]
    masks, boxes = ground_truth(objects[:1], np.array([1]), (8, 8))
    assert masks[0].sum() == 3 and boxes.tolist() == [[5, 5, 6, 8]]


def test_csv_manifest_boxes_missing_files_and_relative_paths(tmp_path) -> None:
    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "b.png")
    _img(tmp_path / "imgs" / "c.png")
    (tmp_path / "m.csv").write_text(
        "path,label,x0,y0,x1,y1\n"
        "imgs/a.png,dog,0,0,10,10\n"      # two boxes of image a, of two classes
        "imgs/a.png,cat,20,10,40,30\n"
        "imgs/gone.png,cat,,,,\n"         # missing: skipped and listed
        "imgs/b.png,dog,,,,\n"            # no box: the image's label
        f"{tmp_path / 'imgs' / 'c.png'},cat,1.5,2,3,4.2\n")  # absolute path, fractional box
    cfg = DataConfig(kind="manifest", path=str(tmp_path / "m.csv"), n_samples=None)
    src = open_source(cfg, SQUASH)
    assert src.classes == ("cat", "dog") and src.has_box and src.size == (20, 20)
    assert src.sample_names[:2] == ("imgs/a.png", "imgs/b.png") and len(src) == 3
    assert src.skipped == [{"file": str(tmp_path / "imgs" / "gone.png"), "reason": "missing file"}]
    batch = src.load(0, 3)
    assert batch.labels.tolist() == [0, 1, 0]  # a: the cat box is the largest
    # c: x [1.5, 3) y [2, 4.2) covers pixels x [1, 3) y [2, 5) -> output x [0, 1) y [1, 2)
    assert batch.objects == (((1, (0, 0, 5, 5)), (0, (5, 10, 15, 20))), (), ((0, (1, 0, 2, 1)),))
    assert batch.boxes.tolist() == [[5, 10, 15, 20], [-1, -1, -1, -1], [1, 0, 2, 1]]
    assert batch.images.shape == (3, 3, 20, 20) and batch.masks.shape == (3, 20, 20)


def test_csv_manifest_errors_name_the_line(tmp_path) -> None:
    _img(tmp_path / "a.png")
    m = tmp_path / "m.csv"
    cfg = DataConfig(kind="manifest", path=str(m), classes=["cat", "dog"])
    m.write_text("path,label\na.png,cat\n\nb.png,dgo\n")
    with pytest.raises(DatasetError, match=r"data.path '.*m.csv' line 4: class 'dgo' is not in data.classes "
                                           r"\(closest: 'dog'; classes: 'cat', 'dog'\)"):
        open_source(cfg, SQUASH)
    m.write_text("path,label,x0,y0,x1,y1\na.png,cat,5,0,5,9\n")
    with pytest.raises(DatasetError, match=r"m.csv' line 2: box x0=5 y0=0 x1=5 y1=9 must have 0 <= x0 < x1"):
        open_source(cfg, SQUASH)
    m.write_text("path,label,x0,y0,x1,y1\na.png,cat,0,0,five,9\n")
    with pytest.raises(DatasetError, match=r"line 2: x1 must be a number, got 'five'"):
        open_source(cfg, SQUASH)
    m.write_text("file,label\na.png,cat\n")
    with pytest.raises(DatasetError, match=r"line 1: the header needs columns path and label \(missing: pa"):
        open_source(cfg, SQUASH)


def test_jsonl_manifest_box_lists_indices_and_root(tmp_path) -> None:
    _img(tmp_path / "data" / "x.png", value=255)
    _img(tmp_path / "data" / "y.png")
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    rows = [{"path": "x.png", "label": 1, "boxes": [[0, 0, 4, 4], [30, 30, 40, 40]]},  # label: an index
            {"path": "broken.png", "label": "cat"},
            {"path": "y.png", "label": "cat", "x0": 0, "y0": 0, "x1": 40, "y1": 40}]
    text = "\n".join([json.dumps(rows[0]), json.dumps(rows[1]), "", json.dumps(rows[2])])  # line 3 blank
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "m.jsonl").write_text(text)
    cfg = DataConfig(kind="manifest", path=str(tmp_path / "meta" / "m.jsonl"), root=str(tmp_path / "data"),
                     classes=["cat", "dog"], n_samples=None)
    src = open_source(cfg, SQUASH)
    assert src.sample_names == ("x.png", "y.png")
    assert [s["file"].rsplit("/", 1)[-1] for s in src.skipped] == ["broken.png"]
    batch = src.load(0, 2)
    assert batch.labels.tolist() == [1, 0] and batch.images[0].min() == 1.0
    assert batch.objects == (((1, (0, 0, 2, 2)), (1, (15, 15, 20, 20))), ((0, (0, 0, 20, 20)),))
    (tmp_path / "meta" / "m.jsonl").write_text(text + '\n{"path": "y.png", "label": 7}\n')
    with pytest.raises(DatasetError, match=r"m.jsonl' line 5: class index 7 is out of range \(0..1\)"):
        open_source(cfg, SQUASH)


def _coco(tmp_path, images, annotations):
    doc = {"images": [{"id": i, "file_name": f, "width": 40, "height": 40} for i, f in images],
           "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": b}
                           for k, (i, c, b) in enumerate(annotations)],
           "categories": [{"id": 3, "name": "dog"}, {"id": 1, "name": "person"}]}
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_objects_of_two_classes_and_skipped_images(tmp_path) -> None:
    for f in ("a.jpg", "b.jpg", "c.jpg"):
        _img(tmp_path / "images" / f)
    ann = _coco(tmp_path, [(10, "a.jpg"), (11, "b.jpg"), (12, "missing.jpg"), (13, "c.jpg")], [
        (10, 1, [0, 0, 10, 10]), (10, 1, [20.5, 20, 10, 11.2]), (10, 3, [4, 0, 30, 8]),
        (12, 3, [0, 0, 5, 5]),
    ])
    cfg = DataConfig(kind="coco", root=str(tmp_path / "images"), annotations=str(ann), n_samples=None)
    src = open_source(cfg, SQUASH)
    assert src.classes == ("person", "dog")  # category names in id order
    assert src.sample_names == ("a.jpg",)
    assert [(s["file"].rsplit("/", 1)[-1], s["reason"]) for s in src.skipped] == [
        ("b.jpg", "no object"), ("missing.jpg", "missing file"), ("c.jpg", "no object")]
    batch = src.load(0, 1)
    assert batch.labels.tolist() == [1]  # the dog box (30 x 8) is the largest
    # x [20.5, 30.5) y [20, 31.2) covers pixels x [20, 31) y [20, 32) -> output x [10, 15) y [10, 16)
    person = ((0, 0, 5, 5), (10, 10, 16, 15))
    assert batch.objects[0] == ((0, person[0]), (0, person[1]), (1, (0, 2, 4, 17)))
    masks, boxes = ground_truth(batch.objects, np.array([0]), src.size)
    assert masks[0].sum() == 25 + 30 and boxes.tolist() == [[0, 0, 16, 15]]
    masks, boxes = ground_truth(batch.objects, np.array([1]), src.size)
    assert masks[0].sum() == 4 * 15 and boxes.tolist() == [[0, 2, 4, 17]]
    # with data.classes, objects of other classes are ignored and images without any are skipped
    only_dog = open_source(cfg.model_copy(update={"classes": ["dog"]}), SQUASH)
    assert only_dog.load(0, 1).objects == (((0, (0, 2, 4, 17)),),)
    # the model's classes: every category name must be one of them
    with pytest.raises(DatasetError, match=r"annotations\[0\] \(id 0\): class 'person' is not one of the "
                                           r"model's classes .*set data.classes"):
        open_source(cfg, SQUASH, model_classes=("cat", "dog"))


def test_imagenet_validation_recipe(tmp_path) -> None:
    wnids = ["n01440764", "n01443537", "n01484850"]
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    val, xml = tmp_path / "val", tmp_path / "val_xml"
    xml.mkdir()
    for i, (wnid, (x0, y0, x1, y1)) in enumerate([(wnids[2], (1, 1, 60, 40)), (wnids[0], (11, 21, 50, 80)),
                                                  (wnids[2], (31, 1, 80, 80))], start=1):
        stem = f"ILSVRC2012_val_{i:08d}"
        _img(val / f"{stem}.JPEG", h=80, w=60)
        xml.joinpath(f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}</filename><size><width>60</width><height>80</height></size>"
            f"<object><name>{wnid}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
            f"<ymax>{y1}</ymax></bndbox></object></annotation>")
    cfg = DataConfig(kind="voc", root=str(val), images=".", annotations=str(xml),
                     classes=str(tmp_path / "wnids.txt"), n_samples=None)
    pp = resolve_preprocess(cfg.model_copy(update={"image_size": (16, 16)}))  # shorter side 18, crop 16
    src = open_source(cfg, pp)
    assert src.classes == tuple(wnids) and src.size == (16, 16)
    assert src.sample_names == tuple(f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 3))
    batch = src.load(0, 3)
    assert batch.labels.tolist() == [2, 0, 2] and batch.images.shape == (3, 3, 16, 16)
    # 60 x 80 -> 18 x 24 (resize), top 4, left 1 (crop); VOC boxes are 1-based inclusive
    assert batch.objects[1] == ((0, (2, 2, 16, 14)),)
    assert src.boxes_dropped == 0 and src.boxes_clipped == 3


def test_folders_matched_onto_model_classes(tmp_path) -> None:
    for cls in ("dog", "cat"):
        _img(tmp_path / "f" / cls / "0.png")
    cfg = DataConfig(kind="imagefolder", root=str(tmp_path / "f"), n_samples=None)
    src = open_source(cfg, SQUASH, model_classes=("ant", "cat", "bee", "dog"))
    assert src.classes == ("ant", "cat", "bee", "dog") and src.labels == (1, 3)
    assert src.load(0, 2).labels.tolist() == [1, 3]
    with pytest.raises(DatasetError, match=r"data.root: folder '.*dog': class 'dog' is not one of the "
                                           r"model's classes \(closest: 'doge'; classes: 'ant', 'cat'"):
        open_source(cfg, SQUASH, model_classes=("ant", "cat", "bee", "doge"))
    with pytest.raises(DatasetError, match=r"folder '.*cat' is not in data.classes"):
        open_source(cfg.model_copy(update={"classes": ["dog", "emu"]}), SQUASH)
    explicit = open_source(cfg.model_copy(update={"classes": ["dog", "cat"]}), SQUASH)
    assert explicit.labels == (1, 0)  # index i = model output i


def test_voc_images_without_known_objects_are_listed(tmp_path) -> None:
    root = tmp_path / "VOC"
    for stem, name in (("a", "cat"), ("b", "horse"), ("c", None)):
        _img(root / "JPEGImages" / f"{stem}.png")
        if name:
            (root / "Annotations").mkdir(exist_ok=True)
            (root / "Annotations" / f"{stem}.xml").write_text(
                f"<annotation><object><name>{name}</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                "<xmax>40</xmax><ymax>40</ymax></bndbox></object></annotation>")
    cfg = DataConfig(kind="voc", root=str(root), classes=["cat"], n_samples=None)
    src = open_source(cfg, SQUASH)
    assert src.sample_names == ("JPEGImages/a.png",)
    no_xml = f"no annotation file c.xml in {str(root / 'Annotations')!r}"
    assert [s["reason"] for s in src.skipped] == ["no object of a known class (found: horse)", no_xml]


def test_embedded_square_is_bit_identical_and_non_square_squashes() -> None:
    cfg = DataConfig(n_samples=3)
    square = open_source(cfg, resolve_preprocess(cfg.model_copy(update={"image_size": (40, 40)}),
                                                 squash_default=True))
    ref = make_split("test", 0, 3, image_size=40)
    got = square.load(0, 3)
    assert got.objects is None and square.size == (40, 40)
    for key in ("images", "labels", "masks", "boxes"):
        a, b = getattr(got, key), getattr(ref, key)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    wide = open_source(cfg, Preprocess((32, 48), None)).load(0, 3)
    assert wide.images.shape == (3, 3, 32, 48) and wide.images.dtype == np.float32
    assert wide.masks.shape == (3, 32, 48)
    assert np.array_equal(wide.labels, make_split("test", 0, 3, image_size=48).labels)
    for m, b in zip(wide.masks, wide.boxes):
        ys, xs = np.nonzero(m)
        assert b.tolist() == [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
    big = open_source(cfg, Preprocess((160, 160), None)).load(0, 3)  # above the 128 px render limit
    assert big.images.shape == (3, 3, 160, 160) and big.masks.shape == (3, 160, 160)
    assert np.array_equal(big.labels, ref.labels) and 0.0 <= big.images.min() and big.images.max() <= 1.0
    for m, b in zip(big.masks, big.boxes):
        ys, xs = np.nonzero(m)
        assert b.tolist() == [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]


def test_a_cached_batch_is_a_copy_with_the_same_memory_layout() -> None:
    """Every stage of a shard reads the same samples: ``load_at`` keeps them, hands out copies
    (a caller's in-place edit cannot reach the next stage) and keeps the arrays' memory layout
    (the embedded images are channels-last in memory; a C-ordered copy would make the model
    pick other kernels and change maps in the last bit)."""
    from attriflow.tasks.config import DataConfig

    src = open_source(DataConfig(n_samples=8), Preprocess((64, 64), None))
    fresh = src._load_runs(tuple(range(2, 6)))
    first, again = src.load_at(range(2, 6)), src.load_at(range(2, 6))
    for x in (first, again):
        np.testing.assert_array_equal(x.images, fresh.images)
        assert x.images.strides == fresh.images.strides
    first.images[:] = 0
    assert not np.array_equal(src.load_at(range(2, 6)).images, first.images)
