"""Box annotations as their files give them: VOC XML, COCO ``instances_*.json`` and CSV or
JSON-lines manifests.

Every box is returned as ``(y0, x0, y1, x1)`` int pixels of the original image, 0-based,
upper corner exclusive; class names are kept as written (strings, or integers in JSON
manifests) and matched to model outputs by :mod:`tasks.datasets`. Malformed entries raise
:class:`~tasks.images.DatasetError` naming the config field, the file and the line or entry.
"""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attriflow.tasks.images import DatasetError

Box = tuple[int, int, int, int]
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class Obj:
    """One annotated object: its class as written, its box, where it was read."""

    name: str | int
    box: Box  # (y0, x0, y1, x1) original pixels, upper corner exclusive
    where: str  # for error messages: "data.path 'm.csv' line 3"


@dataclass(frozen=True)
class Record:
    """One image of an annotated dataset as its annotation file describes it."""

    path: Path
    name: str  # the sample name
    label: str | int | None  # image-level label as written (manifest rows without a box)
    objects: tuple[Obj, ...]
    where: str


def _area(box: Box) -> int:
    return max(box[2] - box[0], 0) * max(box[3] - box[1], 0)


def largest(objects: tuple[Obj, ...] | list[Obj]) -> Obj:
    """The object with the largest box (the first of equal ones).

    Parameters
    ----------
    objects : sequence of Obj
        At least one.

    Returns
    -------
    Obj
        The largest.
    """
    return max(objects, key=lambda o: _area(o.box))


def _pixel_box(x0: float, y0: float, x1: float, y1: float) -> Box:
    """Integer pixels covering a float box: floor of the lower, ceil of the upper corner."""
    return (math.floor(y0), math.floor(x0), math.ceil(y1), math.ceil(x1))


def parse_voc(xml_path: Path, field: str = "data.annotations") -> tuple[Obj, ...]:
    """Objects of a PASCAL VOC XML file.

    Parameters
    ----------
    xml_path : Path
        The file. Coordinates are VOC's: 1-based, inclusive (``xmin=1, xmax=W`` is the whole
        width); fractional values are widened to whole pixels. Objects without ``bndbox``
        are ignored.
    field : str
        The config field that named the folder, for messages.

    Returns
    -------
    tuple of Obj
        ``(name, (y0, x0, y1, x1))`` 0-based, upper corner exclusive, in file order.

    Raises
    ------
    DatasetError
        If the file is not XML, or a box is not numbers or is empty.
    """
    where = f"{field} file {str(xml_path)!r}"
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DatasetError(f"{where}: cannot read VOC XML ({err})") from None
    objs = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            x0, y0, x1, y1 = (float(bb.findtext(c, "")) for c in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise DatasetError(f"{where}: object {k + 1} ({name!r}): bndbox needs numeric xmin, ymin, xmax, "
                               "ymax") from None
        if not all(map(math.isfinite, (x0, y0, x1, y1))) or x1 < x0 or y1 < y0:
            raise DatasetError(f"{where}: object {k + 1} ({name!r}): empty or inverted box "
                               f"xmin={x0:g} ymin={y0:g} xmax={x1:g} ymax={y1:g}")
        objs.append(Obj(name, _pixel_box(x0 - 1, y0 - 1, x1, y1), f"{where} object {k + 1}"))
    return tuple(objs)


def _number(value: Any, column: str, where: str) -> float:
    if isinstance(value, bool) or value is None:
        raise DatasetError(f"{where}: {column} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: {column} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise DatasetError(f"{where}: {column} must be a finite number, got {value!r}")
    return x


def _manifest_box(values: list[Any], where: str) -> Box:
    x0, y0, x1, y1 = (_number(v, c, where) for v, c in zip(values, BOX_COLUMNS))
    if min(x0, y0) < 0 or x1 <= x0 or y1 <= y0:
        raise DatasetError(f"{where}: box x0={x0:g} y0={y0:g} x1={x1:g} y1={y1:g} must have 0 <= x0 < x1 "
                           "and 0 <= y0 < y1 (pixels, x1 and y1 exclusive)")
    return _pixel_box(x0, y0, x1, y1)


def _manifest_rows(path: Path, where: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a CSV (header on line 1) or JSON-lines manifest."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise DatasetError(f"{where}: cannot read the manifest ({why})") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise DatasetError(f"{where} line 1: the header needs columns path and label (missing: "
                               f"{', '.join(missing)}; found: {', '.join(header) or 'none'})")
        reader.fieldnames = header
        some = [c for c in BOX_COLUMNS if c in header]
        if some and len(some) != 4:
            raise DatasetError(f"{where} line 1: box columns need all of x0, y0, x1, y1 (found only "
                               f"{', '.join(some)})")
        for row in reader:  # line_num: the line the row ends on (blank lines are skipped)
            cells = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
            rows.append((reader.line_num, cells))
        return rows
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise DatasetError(f"{where}: a manifest is a .csv file (with a header) or JSON lines "
                           "(.jsonl, .ndjson)")
    for i, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where} line {i}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where} line {i}: each line must be a JSON object with path and label")
        rows.append((i, row))
    return rows


def read_manifest(path: Path, root: Path | None) -> list[Record]:
    """Images, labels and boxes of a CSV or JSON-lines manifest.

    Parameters
    ----------
    path : Path
        ``.csv`` (header line with ``path, label`` and optional ``x0, y0, x1, y1``) or
        ``.jsonl`` / ``.ndjson`` (one object a line with the same keys, and optionally
        ``"boxes": [[x0, y0, x1, y1], ...]``). Boxes are in the original image's pixels,
        ``x1``/``y1`` exclusive; empty box cells mean no box. Several rows with the same
        path give several boxes of that image, each of its row's ``label``.
    root : Path or None
        Where relative paths start (``data.root``); None: the manifest's folder.

    Returns
    -------
    list of Record
        One per distinct image path, in order of first appearance; ``label`` is the label
        of its rows without a box (None if every row has one), ``where`` names that row's
        line (else the image's first line).

    Raises
    ------
    DatasetError
        Naming ``data.path``, the file and the line: unreadable file, missing column,
        empty path or label, malformed box (not a number, negative, ``x1 <= x0``), rows
        without a box giving one image two labels.
    """
    field = f"data.path {str(path)!r}"
    base = root if root is not None else path.parent
    groups: dict[Path, dict[str, Any]] = {}
    for line, row in _manifest_rows(path, field):
        where = f"{field} line {line}"
        p, label = row.get("path"), row.get("label")
        if not isinstance(p, str) or not p:
            raise DatasetError(f"{where}: path is empty or missing")
        if label is None or label == "" or isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DatasetError(f"{where}: label must be a class name or index, got {label!r}")
        file = Path(p) if Path(p).is_absolute() else base / p
        g = groups.setdefault(file, {"name": p, "label": None, "label_line": 0, "objects": [],
                                     "where": where})
        boxes = []
        cells = [row.get(c) for c in BOX_COLUMNS]
        if any(v not in (None, "") for v in cells):
            boxes.append(_manifest_box(cells, where))
        extra = row.get("boxes")
        if extra is not None:
            if not isinstance(extra, list) or not all(isinstance(b, list) and len(b) == 4 for b in extra):
                raise DatasetError(f"{where}: boxes must be a list of [x0, y0, x1, y1] lists")
            boxes += [_manifest_box(b, where) for b in extra]
        g["objects"] += [Obj(label, b, where) for b in boxes]
        if not boxes:
            if g["label"] is not None and g["label"] != label:
                raise DatasetError(f"{where}: image {p!r} already has label {g['label']!r} (line "
                                   f"{g['label_line']}); give each image one label, or boxes")
            g["label"], g["label_line"], g["where"] = label, line, where
    return [Record(f, g["name"], g["label"], tuple(g["objects"]), g["where"]) for f, g in groups.items()]


def _coco_list(doc: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    items = doc.get(key)
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise DatasetError(f"{where}: '{key}' must be a list of objects")
    return items


def read_coco(path: Path, root: Path) -> tuple[tuple[tuple[int, str], ...], list[Record]]:
    """Categories and images of a COCO ``instances_*.json`` file.

    Parameters
    ----------
    path : Path
        The JSON: ``images`` (``id``, ``file_name``), ``annotations`` (``image_id``,
        ``category_id``, ``bbox`` = ``[x, y, width, height]`` float pixels) and
        ``categories`` (``id``, ``name``). Crowd annotations are kept as boxes.
    root : Path
        The folder ``file_name`` is relative to (``data.root``).

    Returns
    -------
    categories : tuple of (int, str)
        ``(id, name)`` in id order.
    records : list of Record
        One per image, in the file's order; objects are named by category name, boxes
        widened to whole pixels (``floor(x)`` to ``ceil(x + width)``).

    Raises
    ------
    DatasetError
        Naming ``data.annotations``, the file and the entry: not JSON, a missing key, an
        unknown image or category id, a bbox that is not four numbers with non-negative
        width and height, or a category name given twice.
    """
    field = f"data.annotations {str(path)!r}"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{field}: cannot read COCO JSON ({err})") from None
    if not isinstance(doc, dict):
        raise DatasetError(f"{field}: the top level must be an object with images, annotations, categories")
    cats: dict[int, str] = {}
    for k, c in enumerate(_coco_list(doc, "categories", field)):
        if not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DatasetError(f"{field} categories[{k}]: needs an integer id and a name")
        cats[c["id"]] = c["name"]
    names = sorted(cats.items())
    seen = [n for _, n in names]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise DatasetError(f"{field}: category name(s) {', '.join(map(repr, dup))} given to several ids")
    images: dict[int, dict[str, Any]] = {}
    for k, im in enumerate(_coco_list(doc, "images", field)):
        if not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise DatasetError(f"{field} images[{k}]: needs an integer id and a file_name")
        images[im["id"]] = {"file": im["file_name"], "objects": [],
                            "where": f"{field} images[{k}] (id {im['id']})"}
    for k, a in enumerate(_coco_list(doc, "annotations", field)):
        where = f"{field} annotations[{k}] (id {a.get('id')})"
        if a.get("image_id") not in images:
            raise DatasetError(f"{where}: image_id {a.get('image_id')!r} is not in images")
        if a.get("category_id") not in cats:
            raise DatasetError(f"{where}: category_id {a.get('category_id')!r} is not in categories")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DatasetError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = (_number(v, c, where)
                      for v, c in zip(bbox, ("bbox x", "bbox y", "bbox width", "bbox height")))
        if w < 0 or h < 0:
            raise DatasetError(f"{where}: bbox width and height must be >= 0, got {w:g} x {h:g}")
        obj = Obj(cats[a["category_id"]], _pixel_box(x, y, x + w, y + h), where)
        images[a["image_id"]]["objects"].append(obj)
    records = [Record(root / im["file"], im["file"], None, tuple(im["objects"]), im["where"])
               for im in images.values()]
    return tuple(names), records
