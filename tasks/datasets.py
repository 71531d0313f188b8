"""Dataset sources: the embedded dataset, ImageFolder trees and VOC-style annotations.

Every source yields images as float32 RGB in [0, 1], shape (N, 3, S, S): files are decoded
with Pillow, converted to RGB (grey, palette and RGBA images are converted; RGBA is
composited on black; 16-bit images are scaled to 8 bits by Pillow's conversion) and resized
to ``image_size`` x ``image_size`` (bilinear, antialiased, aspect ratio not kept).
Undecodable files (corrupt, truncated, empty) and files over ``data.max_pixels`` pixels
(default: Pillow's decompression-bomb limit, 89.5 Mpx) are found when the run is planned,
listed in the manifest, the store's attrs and the report, and skipped: never replaced by
zeros.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.embedded import CLASSES, SPLIT_SIZES, make_split
from tasks.config import DataConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class DatasetError(ValueError):
    """A dataset that cannot be used; the message says why."""


@dataclass(frozen=True)
class Batch:
    """Images of some samples with their ground truth."""

    images: np.ndarray  # (N, 3, S, S) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64, -1 when unknown
    masks: np.ndarray | None = None  # (N, S, S) bool
    boxes: np.ndarray | None = None  # (N, 4) int64 (y0, x0, y1, x1), -1 when none


@dataclass
class DatasetSource:
    """A fixed, ordered list of samples and how to load any range of them."""

    description: str
    classes: tuple[str, ...]
    image_size: int
    sample_ids: tuple[int, ...]
    sample_names: tuple[str, ...]
    has_mask: bool
    has_box: bool
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def load(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop`` (positions in this source's order)."""
        raise NotImplementedError


@dataclass
class EmbeddedSource(DatasetSource):
    """The embedded digits-on-textures dataset (see ``data.embedded``)."""

    split: str = "test"
    seed: int = 0

    def load(self, start: int, stop: int) -> Batch:
        ids = self.sample_ids[start:stop]
        lo, hi = (ids[0], ids[-1] + 1) if ids else (0, 0)
        s = make_split(self.split, lo, hi, seed=self.seed, image_size=self.image_size)
        return Batch(s.images, s.labels, s.masks, s.boxes)


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the size limit is ``data.max_pixels``, checked when planning
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            base = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            img = Image.alpha_composite(base, rgba)
        elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            top = 65535.0 if arr.max() > 255 else 255.0
            img = Image.fromarray((arr / top * 255.0).clip(0, 255).astype(np.uint8))
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t[0].clamp(0, 1).numpy()


def _check(path: Path, max_pixels: int) -> str | None:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our own limit below replaces Pillow's bomb check
    try:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
            if w == 0 or h == 0:
                return "empty image"
            if w * h > max_pixels:
                return f"huge image: {w}x{h} = {w * h} pixels > data.max_pixels = {max_pixels}"
            img.load()
    except Exception as err:  # noqa: BLE001  (any decoder failure means: skip and report)
        return f"{type(err).__name__}: {err}"
    return None


def parse_voc_boxes(xml_path: Path, classes: tuple[str, ...] | None = None) -> tuple[tuple[int, int], list[tuple[str, tuple[int, int, int, int]]]]:
    """Image size ``(height, width)`` and ``(class, (y0, x0, y1, x1))`` boxes of a VOC XML file.

    VOC coordinates are 1-based and inclusive; the boxes returned are 0-based with an
    exclusive upper corner.
    """
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    if size is None:
        raise DatasetError(f"{xml_path}: no <size> element")
    hw = (int(float(size.findtext("height", "0"))), int(float(size.findtext("width", "0"))))
    boxes = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None or (classes is not None and name not in classes):
            continue
        x0, y0, x1, y1 = (int(float(bb.findtext(k, "0"))) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((name, (y0 - 1, x0 - 1, y1, x1)))
    return hw, boxes


@dataclass
class FileSource(DatasetSource):
    """Image files with labels and optional VOC-style box annotations."""

    files: tuple[Path, ...] = ()
    labels: tuple[int, ...] = ()
    annotations: tuple[Path | None, ...] = ()

    def load(self, start: int, stop: int) -> Batch:
        s = self.image_size
        images = np.stack([_decode(p, s) for p in self.files[start:stop]]) if stop > start \
            else np.zeros((0, 3, s, s), np.float32)
        labels = np.asarray(self.labels[start:stop], np.int64)
        if not self.has_box:
            return Batch(images, labels)
        masks = np.zeros((len(labels), s, s), bool)
        boxes = np.full((len(labels), 4), -1, np.int64)
        for i, xml in enumerate(self.annotations[start:stop]):
            if xml is None:
                continue
            (h, w), objs = parse_voc_boxes(xml)
            cls = self.classes[labels[i]] if labels[i] >= 0 else None
            union = []
            for name, (y0, x0, y1, x1) in objs:
                if name != cls:
                    continue
                b = (int(y0 * s / h), int(x0 * s / w), max(int(np.ceil(y1 * s / h)), 1), max(int(np.ceil(x1 * s / w)), 1))
                masks[i, b[0] : b[2], b[1] : b[3]] = True
                union.append(b)
            if union:
                arr = np.array(union)
                boxes[i] = [arr[:, 0].min(), arr[:, 1].min(), arr[:, 2].max(), arr[:, 3].max()]
        return Batch(images, labels, masks, boxes)


def _finish(cfg: DataConfig, desc: str, classes: tuple[str, ...], entries: list[tuple[Path, int, Path | None]], has_box: bool) -> FileSource:
    skipped, kept = [], []
    for path, label, xml in entries:
        problem = _check(path, cfg.max_pixels)
        if problem is None:
            kept.append((path, label, xml))
        else:
            skipped.append({"file": str(path), "reason": problem})
    if cfg.n_samples is not None:
        kept = kept[: cfg.n_samples]
    if not kept:
        raise DatasetError(f"{desc}: no decodable image found ({len(skipped)} skipped)")
    return FileSource(
        description=desc, classes=classes, image_size=cfg.image_size,
        sample_ids=tuple(range(len(kept))),
        sample_names=tuple(str(p.relative_to(cfg.root)) if cfg.root else p.name for p, _, _ in kept),  # type: ignore[arg-type]
        has_mask=has_box, has_box=has_box, skipped=skipped,
        files=tuple(p for p, _, _ in kept), labels=tuple(lb for _, lb, _ in kept),
        annotations=tuple(x for _, _, x in kept),
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def open_source(cfg: DataConfig) -> DatasetSource:
    """The dataset a config describes, with its sample list fixed.

    Parameters
    ----------
    cfg : DataConfig
        ``kind`` is ``embedded``, ``imagefolder`` (``root/<class>/<image>``, classes sorted
        by folder name, optional ``annotations`` folder of VOC XML files matched by stem) or
        ``voc`` (``root/JPEGImages`` and ``root/Annotations``; the label is the class of the
        largest box, classes from ``data.classes`` or the sorted names found).

    Returns
    -------
    DatasetSource
        The source.

    Raises
    ------
    DatasetError
        If the folder is missing or holds no usable image.
    """
    if cfg.kind == "embedded":
        n = SPLIT_SIZES[cfg.split] if cfg.n_samples is None else cfg.n_samples
        if n > SPLIT_SIZES[cfg.split]:
            raise DatasetError(f"data.n_samples: the embedded {cfg.split} split has {SPLIT_SIZES[cfg.split]} images, asked for {n}")
        return EmbeddedSource(
            description=f"embedded digits-on-textures, {cfg.split} split, seed {cfg.seed}",
            classes=CLASSES, image_size=cfg.image_size, sample_ids=tuple(range(n)),
            sample_names=tuple(f"{cfg.split}-{i:05d}" for i in range(n)),
            has_mask=True, has_box=True, split=cfg.split, seed=cfg.seed,
        )
    root = Path(cfg.root or "")
    if not root.is_dir():
        raise DatasetError(f"data.root: folder {str(root)!r} does not exist")
    if cfg.kind == "imagefolder":
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
        if not class_dirs:
            raise DatasetError(f"data.root: {str(root)!r} has no class sub-folders")
        classes = tuple(cfg.classes or [d.name for d in class_dirs])
        ann = Path(cfg.annotations) if cfg.annotations else None
        entries = []
        for d in class_dirs:
            label = classes.index(d.name) if d.name in classes else -1
            for p in _images_in(d):
                xml = ann / f"{p.stem}.xml" if ann else None
                entries.append((p, label, xml if xml and xml.is_file() else None))
        return _finish(cfg, f"ImageFolder {root}", classes, entries, ann is not None)
    img_dir, ann_dir = root / "JPEGImages", Path(cfg.annotations) if cfg.annotations else root / "Annotations"
    if not img_dir.is_dir() or not ann_dir.is_dir():
        raise DatasetError(f"data.root: a VOC-style folder needs JPEGImages/ and Annotations/ in {str(root)!r}")
    found = {}
    for xml in sorted(ann_dir.glob("*.xml")):
        found[xml.stem] = parse_voc_boxes(xml)[1]
    classes = tuple(cfg.classes or sorted({c for objs in found.values() for c, _ in objs}))
    entries = []
    for p in _images_in(img_dir):
        objs = [(c, b) for c, b in found.get(p.stem, []) if c in classes]
        if not objs:
            continue
        big = max(objs, key=lambda o: (o[1][2] - o[1][0]) * (o[1][3] - o[1][1]))
        entries.append((p, classes.index(big[0]), ann_dir / f"{p.stem}.xml"))
    return _finish(cfg, f"VOC-style {root}", classes, entries, True)
