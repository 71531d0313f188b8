"""Dataset sources: the embedded dataset, image folders, VOC, COCO and CSV/JSON-lines manifests.

Images are decoded with Pillow to 8-bit RGB and preprocessed as torchvision's classification
presets do (:class:`~tasks.images.Preprocess`): the shorter side is resized (aspect ratio
kept) and the centre ``(H, W)`` cropped, or, with ``resize=None``, the image is squashed to
``(H, W)``; see :func:`~tasks.images.resolve_preprocess` for the defaults. Every source
yields float32 RGB in [0, 1], shape (N, 3, H, W).

Box annotations are parsed when the source is opened and moved onto the output pixels with
the image's own transform (nearest-exact, so a box covers exactly the pixels its mask would);
boxes left with no pixel are dropped and counted (``boxes_dropped``, ``boxes_clipped``).
:func:`ground_truth` turns a sample's objects into the mask and box of one class.

Files that are missing, undecodable (corrupt, truncated, empty) or over ``data.max_pixels``
pixels (default: Pillow's decompression-bomb limit, 89.5 Mpx), and annotated images without
an object of a known class, are found when the run is planned, listed in ``skipped`` (with
the manifest, the store's attrs and the report) and left out: never replaced by zeros. Files
are checked in order until ``data.n_samples`` usable ones are found.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attriflow.data.embedded import CLASSES, MAX_RENDER_SIZE, RENDER_VERSION, SPLIT_SIZES, make_split
from attriflow.tasks.annotations import Obj, largest, parse_voc, read_coco, read_manifest
from attriflow.tasks.classes import ClassNamesError, class_names
from attriflow.tasks.config import DataConfig
from attriflow.tasks.images import DatasetError, Preprocess, check, decode, resolve_preprocess

__all__ = [
    "Batch", "DatasetError", "DatasetSource", "Objects", "Preprocess", "ground_truth", "open_source",
    "resolve_preprocess",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}

#: A sample's objects: ``(class index, (y0, x0, y1, x1))`` in output pixels, upper corner exclusive.
Objects = tuple[tuple[int, tuple[int, int, int, int]], ...]


#: Bytes of loaded batches a source keeps for the next stage of the same shard.
BATCH_CACHE_BYTES = 256 * 2**20
_CACHE_LOCK = threading.Lock()


def _nbytes(b: Batch) -> int:
    return sum(x.nbytes for x in (b.images, b.labels, b.masks, b.boxes) if x is not None)


def _copy(b: Batch) -> Batch:
    # order="K" keeps the memory layout (the embedded images are channels-last in memory),
    # and so the kernels the model picks: a C-ordered copy changes maps in the last bit
    c = lambda x: None if x is None else x.copy(order="K")  # noqa: E731
    return Batch(c(b.images), c(b.labels), c(b.masks), c(b.boxes), b.objects)


@dataclass(frozen=True)
class Batch:
    """Images of some samples with their ground truth.

    Attributes
    ----------
    images : np.ndarray, shape (N, 3, H, W)
        float32 RGB in [0, 1].
    labels : np.ndarray, shape (N,)
        int64 class index (model output), -1 when unknown.
    masks : np.ndarray, shape (N, H, W), or None
        bool ground truth of the label's class (the embedded dataset: the digit's glyph;
        annotated files: the union of the label's boxes); None without annotations.
    boxes : np.ndarray, shape (N, 4), or None
        int64 ``(y0, x0, y1, x1)`` bounding box of ``masks``, -1 where there is none.
    objects : tuple of Objects, or None
        Annotated files: each sample's boxes of every class, in output pixels (boxes the
        crop removed are left out); None for the embedded dataset and unannotated files.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None
    boxes: np.ndarray | None = None
    objects: tuple[Objects, ...] | None = None


def ground_truth(objects: Sequence[Objects | None], classes: np.ndarray,
                 size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Mask and box of one class per sample, from the samples' objects.

    An image with several objects of the explained class gets the union of their boxes (the
    choice of SISE's evaluation, Sattarzadeh et al. 2021, and of the pointing game on
    multi-object images: a hit on any instance counts).

    Parameters
    ----------
    objects : sequence of Objects or None
        ``Batch.objects``: per sample, ``(class index, (y0, x0, y1, x1))`` in output pixels.
    classes : np.ndarray, shape (N,)
        int, the class explained for each sample (its prediction or its label).
    size : tuple of int
        ``(H, W)`` of the images.

    Returns
    -------
    masks : np.ndarray, shape (N, H, W)
        bool, the union of the boxes of class ``classes[i]``.
    boxes : np.ndarray, shape (N, 4)
        int64 ``(y0, x0, y1, x1)`` bounding box of that union, upper corner exclusive; -1
        where the sample has no box of that class.
    """
    cls = np.asarray(classes).reshape(-1)
    if len(cls) != len(objects):
        raise ValueError(f"ground_truth: {len(objects)} samples of objects but {len(cls)} classes")
    h, w = size
    masks = np.zeros((len(cls), h, w), dtype=bool)
    boxes = np.full((len(cls), 4), -1, dtype=np.int64)
    for i, (objs, c) in enumerate(zip(objects, cls)):
        mine = [b for k, b in objs or () if k == c]
        for y0, x0, y1, x1 in mine:
            masks[i, y0:y1, x0:x1] = True
        if mine:
            arr = np.asarray(mine, dtype=np.int64)
            boxes[i] = [arr[:, 0].min(), arr[:, 1].min(), arr[:, 2].max(), arr[:, 3].max()]
    return masks, boxes


@dataclass
class DatasetSource:
    """A fixed, ordered list of samples and how to load any range of them.

    Attributes
    ----------
    description : str
        One line for the manifest and the report.
    classes : tuple of str
        The dataset's name of each model output, in output order.
    size : tuple of int
        ``(H, W)`` of every image, in pixels.
    sample_ids, sample_names : tuple
        Position-independent id (the embedded dataset's index; a 63-bit digest of the name
        for files) and name (file path, relative where possible) per sample.
    sample_keys : tuple of str
        Each sample's identity in a run store, ``name#digest``: the digest covers the file's
        bytes (the embedded dataset: its split, seed and index), the label and the
        annotated objects, so a store recognises a sample after the folder is reordered
        or grown, and a changed file or annotation is a new sample.
    has_mask, has_box : bool
        Whether the dataset has ground truth (annotated files: boxes, masks made from them).
    preprocess : Preprocess
        How images are decoded into model inputs.
    skipped : list of dict
        ``{"file", "reason"}`` of each file left out.
    boxes_dropped, boxes_clipped : int
        Annotated boxes of the samples that the crop removed entirely / cut.
    """

    description: str
    classes: tuple[str, ...]
    size: tuple[int, int]
    sample_ids: tuple[int, ...]
    sample_names: tuple[str, ...]
    has_mask: bool
    has_box: bool
    preprocess: Preprocess
    skipped: list[dict[str, str]] = field(default_factory=list)
    boxes_dropped: int = 0
    boxes_clipped: int = 0
    sample_keys: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.sample_ids)

    def load_at(self, positions: Sequence[int]) -> Batch:
        """Samples at ``positions`` (this source's order, any order), loaded by contiguous runs.

        The last batches loaded are kept (up to :data:`BATCH_CACHE_BYTES`, per source, so per
        process): every stage of a shard reads the same samples, and decoding or rendering
        them once per stage would cost more than a small model's forward. Callers get
        their own copy of the arrays."""
        key = tuple(int(p) for p in positions)
        with _CACHE_LOCK:
            cache = self.__dict__.setdefault("_batches", {})
            hit = cache.pop(key, None)
            if hit is not None:
                cache[key] = hit  # most recently used last
        if hit is None:
            hit = self._load_runs(key)
            if _nbytes(hit) > BATCH_CACHE_BYTES:  # larger than the budget: never kept
                return hit
            with _CACHE_LOCK:
                cache[key] = hit
                while sum(_nbytes(b) for b in cache.values()) > BATCH_CACHE_BYTES:
                    cache.pop(next(iter(cache)))
        return _copy(hit)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_batches"}  # the cache stays home

    def _load_runs(self, positions: Sequence[int]) -> Batch:
        runs: list[list[int]] = []
        for p in positions:
            if runs and p == runs[-1][-1] + 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        parts = [self.load(r[0], r[-1] + 1) for r in runs]
        if len(parts) == 1:
            return parts[0]
        h, w = self.size
        cat = lambda xs: None if xs[0] is None else np.concatenate(xs)  # noqa: E731
        objects = None if parts[0].objects is None else [o for b in parts for o in b.objects]
        images = np.concatenate([b.images for b in parts]) if parts else np.zeros((0, 3, h, w), np.float32)
        return Batch(images, np.concatenate([b.labels for b in parts]), cat([b.masks for b in parts]),
                     cat([b.boxes for b in parts]), objects)

    def load(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop`` (positions in this source's order).

        Parameters
        ----------
        start, stop : int
            The range.

        Returns
        -------
        Batch
            Their images and ground truth.
        """
        raise NotImplementedError


@dataclass
class EmbeddedSource(DatasetSource):
    """The embedded digits-on-textures dataset (see ``data.embedded``).

    It is rendered, not decoded, so only ``preprocess.size`` applies: a square size is
    up to 128 px is rendered directly (bit-identical to ``make_split``); any other ``(H, W)``
    is rendered at ``min(max(H, W), 128)`` and resized (image bilinear antialiased, mask nearest-exact, box the
    tight box of the squashed mask).
    """

    split: str = "test"
    seed: int = 0

    def load(self, start: int, stop: int) -> Batch:
        ids = self.sample_ids[start:stop]
        lo, hi = (ids[0], ids[-1] + 1) if ids else (0, 0)
        h, w = self.size
        side = min(max(h, w), MAX_RENDER_SIZE)
        s = make_split(self.split, lo, hi, seed=self.seed, image_size=side)
        if (h, w) == (side, side):
            return Batch(s.images, s.labels, s.masks, s.boxes)
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        images = TF.resize(torch.from_numpy(s.images), [h, w], interpolation=InterpolationMode.BILINEAR,
                           antialias=True).clamp(0, 1).numpy()
        squash = Preprocess((h, w), None)
        masks = np.stack([squash.mask(m) for m in s.masks]) if len(s.masks) else np.zeros((0, h, w), bool)
        boxes = np.full((len(masks), 4), -1, dtype=np.int64)
        for i, m in enumerate(masks):
            ys, xs = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            if len(ys):
                boxes[i] = [ys[0], xs[0], ys[-1] + 1, xs[-1] + 1]
        return Batch(np.ascontiguousarray(images, dtype=np.float32), s.labels, masks, boxes)


@dataclass
class FileSource(DatasetSource):
    """Image files with labels and, when annotated, objects in output pixels."""

    files: tuple[Path, ...] = ()
    labels: tuple[int, ...] = ()
    objects: tuple[Objects, ...] | None = None

    def load(self, start: int, stop: int) -> Batch:
        h, w = self.size
        arrays = [self.preprocess.image(decode(p)) for p in self.files[start:stop]]
        images = np.stack(arrays) if arrays else np.zeros((0, 3, h, w), np.float32)
        labels = np.asarray(self.labels[start:stop], np.int64)
        if self.objects is None:
            return Batch(images, labels)
        objects = self.objects[start:stop]
        masks, boxes = ground_truth(objects, labels, self.size)
        return Batch(images, labels, masks, boxes, objects)


# ---------------------------------------------------------------------------------------------
# class names


@dataclass(frozen=True)
class _ClassMap:
    """The output classes and how names found in the data are matched onto them.

    ``source``: ``data`` (``data.classes``), ``model`` (the model's classes) or ``found``
    (the names found in the data).
    """

    names: tuple[str, ...]
    source: str
    positions: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", {n: i for i, n in enumerate(self.names)})

    def index(self, name: str | int, where: str, *, strict: bool, allow_index: bool = False) -> int | None:
        """Output index of a class name; None for an unknown name that may be ignored."""
        text = str(name)
        if text in self.positions:
            return self.positions[text]
        if allow_index and self.source != "found" and (isinstance(name, int) or text.isdigit()):
            i = int(text)
            if 0 <= i < len(self.names):
                return i
            raise DatasetError(f"{where}: class index {i} is out of range (0..{len(self.names) - 1})")
        if self.source == "model" or strict:
            which = "one of the model's classes" if self.source == "model" else f"in {self.source}.classes"
            hint = ("; set data.classes to the dataset's name of each model output, in output order"
                    if self.source == "model" else "")
            raise DatasetError(f"{where}: class {text!r} is not {which} ({self._few(text)}){hint}")
        return None

    def _few(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names, n=3)
        head = ", ".join(repr(n) for n in self.names[:5])
        more = f", ... ({len(self.names)} in all)" if len(self.names) > 5 else ""
        return (f"closest: {', '.join(map(repr, close))}; " if close else "") + f"classes: {head}{more}"


def _class_map(cfg: DataConfig, model_classes: tuple[str, ...] | None, found: Sequence[str]) -> _ClassMap:
    if cfg.classes is not None:
        try:
            return _ClassMap(class_names(cfg.classes, "data.classes"), "data")
        except ClassNamesError as err:
            raise DatasetError(str(err)) from None
    if model_classes:
        return _ClassMap(tuple(model_classes), "model")
    return _ClassMap(tuple(found), "found")


# ---------------------------------------------------------------------------------------------
# building a file source


@dataclass(frozen=True)
class _Item:
    path: Path
    name: str
    label: int = -1
    objects: tuple[tuple[int, tuple[int, int, int, int]], ...] = ()
    skip: str | None = None


def _known(objects: Sequence[Obj], cm: _ClassMap, *, strict: bool = False,
           allow_index: bool = False) -> list[tuple[int, Obj]]:
    out = []
    for o in objects:
        k = cm.index(o.name, o.where, strict=strict, allow_index=allow_index)
        if k is not None:
            out.append((k, o))
    return out


def _annotated_item(path: Path, name: str, known: list[tuple[int, Obj]], found: Sequence[Obj]) -> _Item:
    """An image labelled by its largest box of a known class, or skipped when it has none."""
    if not known:
        names = sorted({str(o.name) for o in found})
        why = f"no object of a known class (found: {', '.join(names)})" if names else "no object"
        return _Item(path, name, skip=why)
    big = largest([o for _, o in known])
    label = next(k for k, o in known if o is big)
    return _Item(path, name, label, tuple((k, o.box) for k, o in known))


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _build(cfg: DataConfig, preprocess: Preprocess, desc: str, classes: tuple[str, ...],
           items: list[_Item], has_box: bool) -> FileSource:
    skipped: list[dict[str, str]] = []
    kept: list[tuple[_Item, Objects]] = []
    dropped = clipped = 0
    for it in items:
        if cfg.n_samples is not None and len(kept) >= cfg.n_samples:
            break
        problem = it.skip or (None if it.path.is_file() else "missing file")
        hw = (0, 0)
        if problem is None:
            problem, hw = check(it.path, cfg.max_pixels)
        if problem is not None:
            skipped.append({"file": str(it.path), "reason": problem})
            continue
        objs: Objects = ()
        if has_box and it.objects:
            out, keep, n_clipped = preprocess.boxes(np.array([b for _, b in it.objects], np.int64), hw)
            ks = [k for (k, _), kp in zip(it.objects, keep) if kp]
            objs = tuple((k, (int(b[0]), int(b[1]), int(b[2]), int(b[3]))) for k, b in zip(ks, out))
            dropped += int((~keep).sum())
            clipped += n_clipped
        kept.append((it, objs))
    if not kept:
        first = f"; first: {skipped[0]['file']}: {skipped[0]['reason']}" if skipped else ""
        raise DatasetError(f"{desc}: no usable image found ({len(skipped)} skipped{first})")
    keys = _unique([f"{it.name}#{_content_digest(it.path, it.label, objs)}" for it, objs in kept])
    return FileSource(
        description=desc, classes=classes, size=preprocess.size,
        sample_ids=tuple(name_id(it.name) for it, _ in kept), sample_names=tuple(it.name for it, _ in kept),
        sample_keys=keys,
        has_mask=has_box, has_box=has_box, preprocess=preprocess, skipped=skipped,
        boxes_dropped=dropped, boxes_clipped=clipped,
        files=tuple(it.path for it, _ in kept), labels=tuple(it.label for it, _ in kept),
        objects=tuple(o for _, o in kept) if has_box else None,
    )


def data_files_stamp(cfg: DataConfig) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime_ns, size) of the dataset's folders and its manifest, annotation and class
    files: adding, removing or renaming an image (or editing an annotation file) changes it,
    so a process that reruns a config after the data changed lists the data again. A file
    overwritten in place is seen by its content digest (``sample_keys``) when listed."""
    if cfg.kind == "embedded":
        return ()
    out = []
    for value in (cfg.root, cfg.path, cfg.annotations, cfg.classes if isinstance(cfg.classes, str) else None):
        if not value:
            continue
        top = Path(value)
        for p in [top, *(sorted(d for d in top.rglob("*") if d.is_dir()) if top.is_dir() else [])]:
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)


def name_id(name: str) -> int:
    """A file sample's stable id: 63 bits of the sha256 of its name (seeds derive from it,
    so a reordered folder draws the same random numbers for each image)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)


def _content_digest(path: Path, label: int, objects: Objects) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(json.dumps([label, [[k, list(b)] for k, b in objects]]).encode())
    return h.hexdigest()[:16]


def _unique(keys: list[str]) -> tuple[str, ...]:
    """Keys made unique (a manifest may list one file twice): repeats get ``~2``, ``~3`` ..."""
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
        out.append(k if seen[k] == 1 else f"{k}~{seen[k]}")
    return tuple(out)


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder(value: str | Path, field: str) -> Path:
    p = Path(value)
    if not p.is_dir():
        raise DatasetError(f"{field}: folder {str(p)!r} does not exist")
    return p


def _file(value: str | Path, field: str) -> Path:
    p = Path(value)
    if not p.is_file():
        raise DatasetError(f"{field}: file {str(p)!r} does not exist")
    return p


def _imagefolder(cfg: DataConfig, pp: Preprocess, model_classes: tuple[str, ...] | None) -> FileSource:
    root = _folder(cfg.root or "", "data.root")
    ann = _folder(cfg.annotations, "data.annotations") if cfg.annotations else None
    class_dirs = sorted(d for d in root.iterdir()
                        if d.is_dir() and not (ann and d.resolve() == ann.resolve()))
    if not class_dirs:
        raise DatasetError(f"data.root: {str(root)!r} has no class sub-folders")
    cm = _class_map(cfg, model_classes, [d.name for d in class_dirs])
    items = []
    for d in class_dirs:
        label = cm.index(d.name, f"data.root: folder {str(d)!r}", strict=True)
        assert label is not None  # strict: an unknown folder raised
        for p in _image_files(d, recursive=True):
            xml = ann / f"{p.stem}.xml" if ann else None
            objs = _known(parse_voc(xml), cm) if xml and xml.is_file() else []
            items.append(_Item(p, _rel(p, root), label, tuple((k, o.box) for k, o in objs)))
    return _build(cfg, pp, f"ImageFolder {root}", cm.names, items, ann is not None)


def _voc(cfg: DataConfig, pp: Preprocess, model_classes: tuple[str, ...] | None) -> FileSource:
    root = _folder(cfg.root or "", "data.root")
    img_dir = _folder(root / (cfg.images or "JPEGImages"), "data.images")
    ann_dir = _folder(cfg.annotations or root / "Annotations", "data.annotations")
    files = _image_files(img_dir, recursive=False)
    if not files:
        raise DatasetError(f"data.images: no image file in {str(img_dir)!r}")
    parsed = {p: parse_voc(ann_dir / f"{p.stem}.xml") if (ann_dir / f"{p.stem}.xml").is_file() else None
              for p in files}
    cm = _class_map(cfg, model_classes, sorted({str(o.name) for objs in parsed.values() for o in objs or ()}))
    items = []
    for p, objs in parsed.items():
        if objs is None:
            items.append(_Item(p, _rel(p, root), skip=f"no annotation file {p.stem}.xml in {str(ann_dir)!r}"))
        else:
            items.append(_annotated_item(p, _rel(p, root), _known(objs, cm), objs))
    return _build(cfg, pp, f"VOC-style {root}", cm.names, items, True)


def _manifest(cfg: DataConfig, pp: Preprocess, model_classes: tuple[str, ...] | None) -> FileSource:
    path = _file(cfg.path or "", "data.path")
    root = _folder(cfg.root, "data.root") if cfg.root else None
    records = read_manifest(path, root)
    if not records:
        raise DatasetError(f"data.path {str(path)!r}: the manifest has no row")
    found = {str(r.label) for r in records if r.label is not None}
    found |= {str(o.name) for r in records for o in r.objects}
    cm = _class_map(cfg, model_classes, sorted(found))
    items = []
    for r in records:
        label = None if r.label is None else cm.index(r.label, r.where, strict=True, allow_index=True)
        if r.objects:  # labelled by its largest box
            items.append(_annotated_item(r.path, r.name, _known(r.objects, cm, strict=True, allow_index=True),
                                         r.objects))
        else:
            items.append(_Item(r.path, r.name, -1 if label is None else label))
    has_box = any(r.objects for r in records)
    return _build(cfg, pp, f"manifest {path}", cm.names, items, has_box)


def _coco(cfg: DataConfig, pp: Preprocess, model_classes: tuple[str, ...] | None) -> FileSource:
    root = _folder(cfg.root or "", "data.root")
    ann = _file(cfg.annotations or "", "data.annotations")
    categories, records = read_coco(ann, root)
    cm = _class_map(cfg, model_classes, [n for _, n in categories])
    items = [_annotated_item(r.path, r.name, _known(r.objects, cm), r.objects) for r in records]
    return _build(cfg, pp, f"COCO {ann}", cm.names, items, True)


def open_source(cfg: DataConfig, preprocess: Preprocess,
                model_classes: tuple[str, ...] | None = None) -> DatasetSource:
    """The dataset a config describes, with its sample list fixed and its annotations parsed.

    Parameters
    ----------
    cfg : DataConfig
        ``kind``:

        - ``embedded``: the shipped dataset (only ``preprocess.size`` applies);
        - ``imagefolder``: ``root/<class>/<image>`` (searched recursively); optional
          ``annotations`` folder of VOC XML files matched by stem (objects of every class);
        - ``voc``: images in ``root / images`` (default ``JPEGImages``; ``"."``: ``root``
          itself), VOC XML files in ``annotations`` (default ``root/Annotations``); the
          label is the class of the largest box, every object is kept;
        - ``manifest``: a CSV or JSON-lines file ``path`` (see
          :func:`tasks.annotations.read_manifest`); relative paths start at ``root``, else
          at the manifest's folder;
        - ``coco``: images in ``root``, ``annotations`` an ``instances_*.json`` file
          (label: the class of the largest object).

        Classes: ``data.classes`` (a list or a file with one name a line) gives each model
        output's name in the dataset; else ``model_classes`` is matched by name; else the
        names found in the data, sorted (COCO: category names in id order).
    preprocess : Preprocess
        From :func:`resolve_preprocess`.
    model_classes : tuple of str, optional
        The model's output names (``model.classes``).

    Returns
    -------
    DatasetSource
        The source.

    Raises
    ------
    DatasetError
        Naming the config field, the file and (manifests) the line: a missing folder or
        file, a malformed annotation, a class name that is not an output (a folder not in
        ``data.classes`` or in the model's classes; a manifest label not in the classes;
        a VOC/COCO object name not in the model's classes, whereas with ``data.classes``
        such objects are ignored), or no usable image.
    """
    if cfg.kind == "embedded":
        n = SPLIT_SIZES[cfg.split] if cfg.n_samples is None else cfg.n_samples
        if n > SPLIT_SIZES[cfg.split]:
            raise DatasetError(f"data.n_samples: the embedded {cfg.split} split has {SPLIT_SIZES[cfg.split]} "
                               f"images, asked for {n}")
        return EmbeddedSource(
            description=f"embedded digits-on-textures, {cfg.split} split, seed {cfg.seed}",
            classes=CLASSES, size=preprocess.size, sample_ids=tuple(range(n)),
            sample_names=tuple(f"{cfg.split}-{i:05d}" for i in range(n)),
            sample_keys=tuple(f"{cfg.split}-{i:05d}#embedded-v{RENDER_VERSION}-seed{cfg.seed}" for i in range(n)),
            has_mask=True, has_box=True, preprocess=preprocess, split=cfg.split, seed=cfg.seed,
        )
    build = {"imagefolder": _imagefolder, "voc": _voc, "manifest": _manifest, "coco": _coco}[cfg.kind]
    return build(cfg, preprocess, model_classes)
