"""The run store: one Zarr v3 group read and written through xarray, grown in place.

Layout (dims ``explainer, sample, y, x, metric, point, shard, corner``):

- ``attribution(explainer, sample, y, x)`` float32 (``store.attribution_dtype``: float16, or
  float32 holding bfloat16 values; see :func:`round_maps`), chunks ``(1, shard_size, H, W)``;
- ``label``, ``prediction`` (int64), ``probability`` (float32) per ``sample``;
  ``gt_mask(sample, y, x)`` and ``gt_box(sample, corner)`` where the dataset has them;
- ``finite_output(sample)``: the model's logits on the clean image are all finite;
  ``flagged(explainer, sample)``: the map (or the model output it explains) is not finite:
  its scores are NaN and it is left out of every mean;
- ``forward_passes(explainer, sample)`` and ``backward_passes(explainer, sample)``: model
  evaluations and backward passes each map cost (-1 when the method cannot say);
  ``explain_seconds(explainer, shard)``: wall time of each shard's attribution;
- stage timings (``TIMINGS``, the only non-reproducible variables, see ``NONDETERMINISTIC``):
  ``load_seconds(shard)``, ``evaluate_seconds(explainer, shard)``, ``neurons_seconds(shard)``
  and ``sanity_seconds(explainer)``: each task's wall time from its start to its record
  (NaN: not timed, e.g. done before the store kept timings);
- ``sanity(explainer, sanity_sample, depth, similarity)``: cascading randomisation
  similarities of the config's first samples' maps (coords ``randomised(depth)``: the unit
  re-initialised at each depth, top first), record ``record_sanity(explainer)``;
- ``preview(preview, y, x, rgb)``: the first stored images as uint8 for the report's figures;
- ``score(explainer, sample, metric)`` and ``curve(explainer, sample, metric, point)``;
- completion records ``record_load(shard)``, ``record_explain(explainer, shard)``,
  ``record_evaluate(explainer, shard)`` (and ``record_neurons``, ``record_sanity``): uint64
  provenance digests, 0 = not done, one chunk per element, each written only after the data
  it covers;
- coordinates ``explainer`` (the config's name of an active entry, ``entry`` for an inactive
  one), ``entry`` (``name@digest``: the entry's identity), ``family``, ``method``,
  ``params`` (JSON), ``active_order`` (the entry's position in the current config, -1 when
  the config does not use it); ``sample`` (a stable id), ``sample_name``, ``sample_key``
  (name and content digest: the sample's identity), ``sample_order`` (position in the current
  config, -1 when not configured); ``metric``, ``higher_is_better(metric)``;
- group attrs: ``schema_version``, ``fixed`` and ``features`` (JSON: what fixes the shapes)
  and ``manifest`` (JSON of the current config, its hash, seed, package versions, git commit).

Why one growing array per variable rather than one group per explainer
-----------------------------------------------------------------------
An experiment grows along two axes: entries (an added explainer, or a new parameter setting
of one, kept as a versioned entry ``name@digest``) and samples (more images); metrics added
to attriflow and longer curves grow ``metric`` and ``point`` the same way. Entries and
samples are appended with Zarr's ``resize``: the chunk grid is ``(1, shard_size, ...)``, so a new entry
or a new shard is a new row of chunks, and growing rewrites only array metadata; no chunk of
a finished entry or shard is touched. One group per explainer would make adding an entry an
atomic directory rename too, but the sample axis would still need resizing in every group,
and a reader would have to stitch the groups; one dataset keeps ``xr.open_zarr(store)`` the
whole experiment, ``explainer`` a plain dimension.

Crash safety and readers: a grow resizes every data array first, then writes the new
coordinate values, then the commit markers ``entry`` and ``sample_key`` (whose lengths are
the committed sizes), then the consolidated metadata, which is what ``xr.open_zarr`` reads
(written by an atomic rename, like every Zarr chunk and metadata file). An interrupted grow
is redone by the next run from the committed sizes (array extents beyond them hold no
recorded data: stages run only after a grow is committed), and a reader opening the store
meanwhile sees the old consolidated snapshot: old shapes, whole chunks. Entries and samples
never move, except by ``attriflow gc``, which writes a new store and swaps it in.

Every write after initialisation is a region write aligned to whole chunks, so shards
never touch the same chunk and concurrent writers cannot corrupt each other. A shard is
done when its record equals the expected provenance digest, never because a chunk file
exists (Zarr does not store chunks equal to the fill value).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from attriflow.analysis.metrics.sanity import SIMILARITIES
from attriflow.tasks import finished

#: 3: growable axes (entries, samples), sample keys, active/selected coordinates.
SCHEMA_VERSION = 3
#: ``store.attribution_dtype`` -> the dtype of the ``attribution`` array. bfloat16 has no
#: Zarr or NumPy type: its maps are rounded to bfloat16 and kept in float32 arrays whose low
#: 16 bits are zero (the shuffling codecs then store about 2 bytes per value).
ATTRIBUTION_DTYPES: dict[str, type] = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}
#: float16's largest finite value and smallest normal one.
FLOAT16_MAX, FLOAT16_TINY = 65504.0, 2.0**-14
#: ``store.codec`` -> the Zarr v3 compressors of the ``attribution`` array (lossless).
CODECS = ("zstd", "blosc-zstd", "blosc-lz4", "none")


def codec_compressors(name: str) -> list[Any]:
    """Zarr v3 compressors of a ``store.codec``: ``zstd`` is Zarr's default (level 0: the
    library's default level, no shuffle); the Blosc codecs byte-shuffle first (clevel 5)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "zstd":
        return [ZstdCodec(level=0, checksum=False)]
    if name in ("blosc-zstd", "blosc-lz4"):
        return [BloscCodec(cname=name.split("-")[1], clevel=5, shuffle="shuffle")]
    if name == "none":
        return []
    raise ValueError(f"store.codec: unknown codec {name!r} (one of {', '.join(CODECS)})")


def round_maps(maps: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maps as ``store.attribution_dtype`` stores them.

    Parameters
    ----------
    maps : ndarray, shape (N, H, W), float32
    dtype : {"float32", "float16", "bfloat16"}

    Returns
    -------
    stored : ndarray, shape (N, H, W)
        float32, float16, or float32 holding bfloat16 values (round to nearest even).
    overflow : ndarray of bool, shape (N,)
        float16 only: the map cannot be stored: a finite value beyond float16's range
        (|value| >= 65520) became infinite, or a map that is not all zero became all zero
        (every |value| below 3e-8). Such maps are flagged and left out of every metric.
    imprecise : ndarray of bool, shape (N,)
        float16 only: the map is not all zero but its largest |value| is below 2^-14
        (6.1e-5), float16's smallest normal number: its values keep fewer than 11
        significant bits.
    """
    n = len(maps)
    none = np.zeros(n, bool)
    if dtype == "float32":
        return maps, none, none
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(np.ascontiguousarray(maps)).to(torch.bfloat16).float().numpy(), none, none
    if dtype != "float16":
        raise ValueError(f"store.attribution_dtype: unknown dtype {dtype!r} (one of {', '.join(ATTRIBUTION_DTYPES)})")
    flat = np.abs(maps.reshape(n, -1))
    finite = np.isfinite(flat)
    peak = np.where(finite, flat, 0).max(axis=1) if flat.size else np.zeros(n)
    with np.errstate(over="ignore"):
        stored = maps.astype(np.float16)
    overflow = (finite & ~np.isfinite(stored.reshape(n, -1))).any(axis=1)  # finite before, not after
    lost = (peak > 0) & ~np.asarray(stored.reshape(n, -1), bool).any(axis=1)  # every value underflowed to 0
    return stored, overflow | lost, (peak > 0) & (peak < FLOAT16_TINY) & ~lost


#: Stores written before ``store.attribution_dtype`` and ``store.codec`` existed used these.
FIXED_BEFORE_ENCODINGS = {"attribution_dtype": "float32", "codec": "zstd"}
#: A store: a local path, or an fsspec URL (``memory://``, ``s3://`` ... with its backend installed).
StoreRef = Path | str
STORE_NAME = "store.zarr"
METRICS: dict[str, dict[str, Any]] = {
    "deletion_auc": {"higher_is_better": False, "category": "faithfulness"},
    "insertion_auc": {"higher_is_better": True, "category": "faithfulness"},
    "average_drop_soft": {"higher_is_better": False, "category": "faithfulness"},
    "increase_soft": {"higher_is_better": True, "category": "faithfulness"},
    "average_drop_top": {"higher_is_better": False, "category": "faithfulness"},
    "increase_top": {"higher_is_better": True, "category": "faithfulness"},
    "pointing_game": {"higher_is_better": True, "category": "localisation"},
    "energy_pointing_game": {"higher_is_better": True, "category": "localisation"},
    "bbox_accuracy": {"higher_is_better": True, "category": "localisation"},
    "iou": {"higher_is_better": True, "category": "localisation"},
    "gini": {"higher_is_better": True, "category": "complexity"},
}
#: Metrics that have a curve (the others store NaN there).
CURVE_METRICS = ("deletion_auc", "insertion_auc")
STAGES = ("load", "explain", "evaluate", "neurons", "sanity")
#: Wall-clock measurements of the stages' tasks (the explain stage's is the attribution alone).
TIMINGS = ("load_seconds", "explain_seconds", "evaluate_seconds", "neurons_seconds", "sanity_seconds")
#: The only variables that differ between two identical runs.
NONDETERMINISTIC = TIMINGS
#: Dimensions that grow in place (``point``: the longest curve so far; shorter ones are NaN-padded).
GROWING = ("explainer", "sample", "shard", "point", "metric")
#: Coordinates whose length is the committed size of their axis (written last by a grow).
MARKERS = {"explainer": "entry", "sample": "sample_key", "metric": "metric"}
#: Optional parts of the store, recreated (their records cleared) when their shape changes.
FEATURES: dict[str, tuple[str, ...]] = {
    "neurons": ("record_neurons", "neurons_seconds", "neuron_correlation", "neuron_precision",
                "selected_correlation", "selected_precision", "overlap_code", "overlap_jaccard",
                "overlap_code_total", "overlap_jaccard_total", "unit_box", "layer", "unit_layer", "unit_channel"),
    "preview": ("preview",),
    "sanity": ("sanity", "record_sanity", "sanity_seconds", "depth", "randomised", "similarity"),
}


@dataclass(frozen=True)
class Shard:
    """A range ``[start, stop)`` of the store's samples handled by one task; ``index`` is its number."""

    index: int
    start: int
    stop: int


def plan_shards(n_samples: int, shard_size: int) -> list[Shard]:
    """Split ``n_samples`` into consecutive shards of ``shard_size`` (the last may be short)."""
    return [
        Shard(i, s, min(s + shard_size, n_samples))
        for i, s in enumerate(range(0, n_samples, shard_size))
    ]


def digest64(*parts: Any) -> int:
    """Non-zero 64-bit provenance digest of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    value = int.from_bytes(hashlib.sha256(blob).digest()[:8], "little")
    return value or 1


@dataclass(frozen=True)
class Entry:
    """One explainer result set: ``key`` is ``name@digest`` (the digest covers the method, its
    version and parameters, the seed, the target, the numerics and the model)."""

    key: str
    name: str
    family: str
    method: str
    params: str  # JSON of the resolved parameters


@dataclass(frozen=True)
class StoreLayout:
    """The shapes and coordinates of a store.

    ``height``, ``width``, ``shard_size``, ``has_mask``, ``has_box`` and the maps' encoding
    (``attribution_dtype``, ``codec``) are fixed for a store's life; entries, samples and metrics are appended; ``n_points`` only grows; the
    features (neurons, previews, sanity) are recreated when their shape changes.
    """

    height: int
    width: int
    shard_size: int
    has_mask: bool
    has_box: bool
    entries: tuple[Entry, ...]
    sample_ids: tuple[int, ...]
    sample_names: tuple[str, ...]
    sample_keys: tuple[str, ...]
    n_points: int
    neuron_layers: tuple[tuple[str, int], ...] = ()
    n_previews: int = 0  # first stored samples whose image is kept (uint8) for figures
    sanity_units: tuple[str, ...] = ()  # randomisation units, top first (empty: no sanity check)
    n_sanity: int = 0  # first configured samples of the sanity check
    metrics: tuple[str, ...] = tuple(METRICS)  # the stored ones first, then metrics added since
    attribution_dtype: str = "float32"  # store.attribution_dtype (see ATTRIBUTION_DTYPES)
    codec: str = "zstd"  # store.codec of the maps (see CODECS)

    @property
    def n_samples(self) -> int:
        """Number of stored samples."""
        return len(self.sample_keys)

    @property
    def n_shards(self) -> int:
        """Number of shards."""
        return -(-self.n_samples // self.shard_size)

    def fixed(self) -> dict[str, Any]:
        """What must be equal for an existing store to be grown."""
        return {"height": self.height, "width": self.width, "shard_size": self.shard_size,
                "has_mask": self.has_mask, "has_box": self.has_box,
                "attribution_dtype": self.attribution_dtype, "codec": self.codec}

    def features(self) -> dict[str, Any]:
        """The shape of each optional part (a change recreates it)."""
        return {"neurons": [list(x) for x in self.neuron_layers], "preview": self.n_previews,
                "sanity": [list(self.sanity_units), self.n_sanity]}


@dataclass
class StoreState:
    """What an existing store holds: its schema, fixed shape, features and committed axes."""

    schema: int
    fixed: dict[str, Any]
    features: dict[str, Any]
    entries: list[str]
    sample_keys: list[str]
    n_points: int
    metrics: list[str] = field(default_factory=list)
    records: dict[str, np.ndarray] = field(default_factory=dict)
    config_hash: str = ""  # of the config that last prepared the store


class StoreLayoutError(ValueError):
    """An existing store that cannot hold what the config asks for (another image size,
    shard size, ground truth or schema)."""


def _lazy(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any) -> da.Array:
    return da.zeros(shape, chunks=chunks, dtype=dtype)


def store_ref(location: str | Path) -> StoreRef:
    """A local ``Path`` for paths and ``file://`` URLs, else the URL itself."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return text if "://" in text else Path(text)


def exists(path: StoreRef) -> bool:
    """Whether a store has been initialised at ``path`` (its root metadata exists)."""
    if isinstance(path, Path):
        return path.exists()
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return bool(fs.exists(f"{root.rstrip('/')}/zarr.json"))


def _open_group(path: StoreRef, mode: str = "r+", consolidated: bool | None = None) -> zarr.Group:
    if consolidated is None:
        return zarr.open_group(str(path), mode=mode, zarr_format=3)
    return zarr.open_group(str(path), mode=mode, zarr_format=3, use_consolidated=consolidated)


def consolidate(path: StoreRef) -> None:
    """Refresh consolidated metadata so that a bare ``xarray.open_zarr(path)`` reads it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def _obj(xs: Any) -> np.ndarray:
    return np.array(list(xs), dtype=object)  # variable-length strings


def _variables(layout: StoreLayout) -> dict[str, Any]:
    """Every data variable of a layout as ``(dims, lazy zeros)`` with its chunking."""
    n, h, w, s = layout.n_samples, layout.height, layout.width, layout.shard_size
    e, m, p = len(layout.entries), len(layout.metrics), layout.n_points
    k = layout.n_shards
    data: dict[str, Any] = {
        "attribution": (("explainer", "sample", "y", "x"),
                        _lazy((e, n, h, w), (1, s, h, w), ATTRIBUTION_DTYPES[layout.attribution_dtype])),
        "label": (("sample",), _lazy((n,), (s,), np.int64)),
        "prediction": (("sample",), _lazy((n,), (s,), np.int64)),
        "probability": (("sample",), _lazy((n,), (s,), np.float32)),
        "finite_output": (("sample",), _lazy((n,), (s,), bool)),
        "flagged": (("explainer", "sample"), _lazy((e, n), (1, s), bool)),
        "forward_passes": (("explainer", "sample"), _lazy((e, n), (1, s), np.int64)),
        "backward_passes": (("explainer", "sample"), _lazy((e, n), (1, s), np.int64)),
        "load_seconds": (("shard",), _lazy((k,), (1,), np.float64)),
        "explain_seconds": (("explainer", "shard"), _lazy((e, k), (1, 1), np.float64)),
        "evaluate_seconds": (("explainer", "shard"), _lazy((e, k), (1, 1), np.float64)),
        "score": (("explainer", "sample", "metric"), _lazy((e, n, m), (1, s, m), np.float32)),
        "curve": (("explainer", "sample", "metric", "point"), _lazy((e, n, m, p), (1, s, m, p), np.float32)),
        "record_load": (("shard",), _lazy((k,), (1,), np.uint64)),
        "record_explain": (("explainer", "shard"), _lazy((e, k), (1, 1), np.uint64)),
        "record_evaluate": (("explainer", "shard"), _lazy((e, k), (1, 1), np.uint64)),
    }
    if layout.neuron_layers:
        u, nl = sum(c for _, c in layout.neuron_layers), len(layout.neuron_layers)
        data["record_neurons"] = (("shard",), _lazy((k,), (1,), np.uint64))
        data["neurons_seconds"] = (("shard",), _lazy((k,), (1,), np.float64))
        for name in ("neuron_correlation", "neuron_precision"):
            data[name] = (("sample", "unit"), _lazy((n, u), (s, u), np.float32))
        for name in ("selected_correlation", "selected_precision"):
            data[name] = (("sample", "unit"), _lazy((n, u), (s, u), bool))
        for name in ("overlap_code", "overlap_jaccard"):
            data[name] = (("sample", "layer"), _lazy((n, nl), (s, nl), np.float32))
            data[f"{name}_total"] = (("sample",), _lazy((n,), (s,), np.float32))
        data["unit_box"] = (("sample", "unit", "corner"), _lazy((n, u, 4), (s, u, 4), np.int64))
    if layout.n_previews:
        data["preview"] = (("preview", "y", "x", "rgb"), _lazy((layout.n_previews, h, w, 3), (1, h, w, 3), np.uint8))
    if layout.sanity_units:
        d, ns = len(layout.sanity_units), layout.n_sanity
        data["sanity"] = (("explainer", "sanity_sample", "depth", "similarity"),
                          _lazy((e, ns, d, len(SIMILARITIES)), (1, ns, d, len(SIMILARITIES)), np.float32))
        data["record_sanity"] = (("explainer",), _lazy((e,), (1,), np.uint64))
        data["sanity_seconds"] = (("explainer",), _lazy((e,), (1,), np.float64))
    if layout.has_mask:
        data["gt_mask"] = (("sample", "y", "x"), _lazy((n, h, w), (s, h, w), bool))
    if layout.has_box:
        data["gt_box"] = (("sample", "corner"), _lazy((n, 4), (s, 4), np.int64))
    return data


def _entry_coords(entries: Sequence[Entry]) -> dict[str, np.ndarray]:
    return {"entry": _obj(e.key for e in entries), "family": _obj(e.family for e in entries),
            "method": _obj(e.method for e in entries), "params": _obj(e.params for e in entries)}


def _metric_coords(metrics: Sequence[str]) -> dict[str, np.ndarray]:
    return {"metric": _obj(metrics),
            "higher_is_better": np.array([METRICS[m]["higher_is_better"] for m in metrics], dtype=bool),
            "category": _obj(METRICS[m]["category"] for m in metrics)}


def _coords(layout: StoreLayout) -> dict[str, Any]:
    ent = _entry_coords(layout.entries)
    coords: dict[str, Any] = {
        "explainer": ("explainer", _obj(e.name for e in layout.entries)),
        **{name: ("explainer", values) for name, values in ent.items()},
        "active_order": ("explainer", np.arange(len(layout.entries), dtype=np.int64)),
        "sample": ("sample", np.asarray(layout.sample_ids, np.int64)),
        "sample_name": ("sample", _obj(layout.sample_names)),
        "sample_key": ("sample", _obj(layout.sample_keys)),
        "sample_order": ("sample", np.arange(layout.n_samples, dtype=np.int64)),
        **{name: ("metric", values) for name, values in _metric_coords(layout.metrics).items()},
        "corner": ("corner", _obj(["y0", "x0", "y1", "x1"])),
    }
    coords.update(_feature_coords(layout))
    return coords


def _feature_coords(layout: StoreLayout) -> dict[str, Any]:
    coords: dict[str, Any] = {}
    if layout.sanity_units:
        coords["depth"] = ("depth", np.arange(1, len(layout.sanity_units) + 1))
        coords["randomised"] = ("depth", _obj(layout.sanity_units))
        coords["similarity"] = ("similarity", _obj(SIMILARITIES))
    if layout.neuron_layers:
        coords["layer"] = ("layer", _obj(n for n, _ in layout.neuron_layers))
        coords["unit_layer"] = ("unit", _obj(n for n, c in layout.neuron_layers for _ in range(c)))
        coords["unit_channel"] = ("unit", np.array([i for _, c in layout.neuron_layers for i in range(c)]))
    return coords


def _encoding(ds: xr.Dataset, codec: str = "zstd") -> dict[str, dict[str, Any]]:
    encoding: dict[str, dict[str, Any]] = {}
    for name, var in ds.data_vars.items():
        enc: dict[str, Any] = {"chunks": var.data.chunksize}
        if name == "attribution":
            enc["compressors"] = codec_compressors(codec)
        if name.startswith("record_"):
            enc["fill_value"] = 0
        elif name == "unit_box":
            enc["fill_value"] = -1
        elif var.dtype.kind == "f":
            enc["fill_value"] = np.nan
        encoding[name] = enc
    return encoding


_EMPTY = {"neurons": [], "preview": 0, "sanity": [[], 0]}


def changed_features(stored: dict[str, Any], layout: StoreLayout) -> list[str]:
    """Features whose shape the layout changes (recreated, their results redone). A feature
    the config turns off keeps its stored variables and results."""
    return [f for f, v in layout.features().items() if stored.get(f) != v and v != _EMPTY[f]]


def _store_attrs(layout: StoreLayout, stored: dict[str, Any] | None = None) -> dict[str, Any]:
    features = layout.features()
    if stored:
        features = {f: stored.get(f, v) if v == _EMPTY[f] else v for f, v in features.items()}
    return {"schema_version": SCHEMA_VERSION, "fixed": json.dumps(layout.fixed(), sort_keys=True),
            "features": json.dumps(features, sort_keys=True)}


def init_store(path: StoreRef, layout: StoreLayout, attrs: dict[str, str]) -> None:
    """Create the store's metadata and coordinates (no data chunk is written).

    Parameters
    ----------
    path : Path or str
        ``RUN_DIR/store.zarr`` (or a URL); must not exist yet.
    layout : StoreLayout
        Shapes and coordinates.
    attrs : dict of str to str
        Group attributes (``manifest`` and friends).
    """
    ds = xr.Dataset(_variables(layout), coords=_coords(layout), attrs={**_store_attrs(layout), **attrs})
    encoding = _encoding(ds, layout.codec)
    if not isinstance(path, Path):  # a URL: no atomic rename; the root metadata is written last
        ds.to_zarr(path, mode="w", compute=False, encoding=encoding, consolidated=False, zarr_format=3)
        consolidate(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".init")
    ds.to_zarr(str(tmp), mode="w", compute=False, encoding=encoding, consolidated=False, zarr_format=3)
    consolidate(tmp)
    os.replace(tmp, path)  # a store either exists with all its metadata or not at all


def _committed(values: Any) -> list[str]:
    """A marker's committed values: up to the first empty one (a grow killed between the
    marker's resize and its values leaves empty strings, never a real key)."""
    out = []
    for v in values:
        if not str(v):
            break
        out.append(str(v))
    return out


def read_state(path: StoreRef) -> StoreState:
    """The committed state of an existing store (its own array metadata, not the consolidated
    copy) and its completion records."""
    group = _open_group(path, "r", consolidated=False)
    attrs = dict(group.attrs)
    schema = int(attrs.get("schema_version", 1))
    if schema < SCHEMA_VERSION or "fixed" not in attrs:
        return StoreState(schema, {}, {}, [], [], 0)
    names = set(group.array_keys())
    records = {stage: np.asarray(group[f"record_{stage}"][:]) for stage in STAGES if f"record_{stage}" in names}
    return StoreState(
        schema=schema, fixed={**FIXED_BEFORE_ENCODINGS, **json.loads(attrs["fixed"])},
        features=json.loads(attrs["features"]),
        entries=_committed(group["entry"][:]), sample_keys=_committed(group["sample_key"][:]),
        n_points=int(group["curve"].shape[-1]), records=records, metrics=_committed(group["metric"][:]),
        config_hash=str(json.loads(attrs.get("manifest", "{}")).get("config_hash", "")),
    )


def grow_store(path: StoreRef, layout: StoreLayout, state: StoreState, attrs: dict[str, str]) -> dict[str, Any]:
    """Grow an existing store to ``layout`` (which extends ``state``'s entries and samples).

    Data arrays are resized first, then the new coordinate values are written, then the
    commit markers (``entry``, ``sample_key``), then a changed feature is recreated, and the
    attributes and the consolidated metadata last; see the module docstring. Idempotent:
    rerunning it after an interruption gives the store an uninterrupted call gives.

    Returns
    -------
    dict
        ``recreated``: the features whose variables were recreated (their records cleared).
    """
    n_e, n_s, n_m = len(state.entries), len(state.sample_keys), len(state.metrics)
    if (list(layout.sample_keys[:n_s]) != state.sample_keys or [e.key for e in layout.entries[:n_e]] != state.entries
            or list(layout.metrics[:n_m]) != state.metrics):
        raise ValueError("grow_store: the layout does not extend the store's entries, samples and metrics")
    changed = _add_timings(path, layout)
    group = _open_group(path, "r+", consolidated=False)
    sizes = {"explainer": len(layout.entries), "sample": layout.n_samples, "shard": layout.n_shards,
             "point": max(layout.n_points, state.n_points), "metric": len(layout.metrics)}
    marker_names = set(MARKERS.values())
    for name, arr in list(group.arrays()):
        dims = arr.metadata.dimension_names or ()
        target = tuple(sizes.get(d, size) if d in GROWING else size for d, size in zip(dims, arr.shape))
        if name not in marker_names and target != arr.shape:
            arr.resize(target)
            changed = True
    from attriflow.tasks.runtime import fault_point  # crash tests: SIGKILL at a named point

    fault_point("grow.after_resize")
    new = layout.entries[n_e:]
    if new:
        for name, values in {**_entry_coords(new), "explainer": _obj(e.key for e in new)}.items():
            if name != "entry":
                group[name][n_e:] = values
        group["active_order"][n_e:] = np.full(len(new), -1, np.int64)
    if layout.n_samples > n_s:
        group["sample"][n_s:] = np.asarray(layout.sample_ids[n_s:], np.int64)
        group["sample_name"][n_s:] = _obj(layout.sample_names[n_s:])
        group["sample_order"][n_s:] = np.full(layout.n_samples - n_s, -1, np.int64)
    if len(layout.metrics) > n_m:
        for name, values in _metric_coords(layout.metrics[n_m:]).items():
            if name != "metric":
                group[name][n_m:] = values
    for dim, marker in MARKERS.items():  # the commit: the markers' lengths are the stored sizes
        arr = group[marker]
        if arr.shape[0] != sizes[dim]:
            arr.resize((sizes[dim],))
            changed = True
        if dim == "explainer" and new:
            arr[n_e:] = _obj(e.key for e in new)
        if dim == "sample" and layout.n_samples > n_s:
            arr[n_s:] = _obj(layout.sample_keys[n_s:])
        if dim == "metric" and len(layout.metrics) > n_m:
            arr[n_m:] = _obj(layout.metrics[n_m:])
    fault_point("grow.after_markers")
    recreated = changed_features(state.features, layout)
    if recreated:
        _recreate(path, layout, recreated)
    group = _open_group(path, "r+", consolidated=False)
    wanted = {**_store_attrs(layout, state.features), **attrs}
    if any(group.attrs.get(k) != v for k, v in wanted.items()):
        group.attrs.update(wanted)
        changed = True
    if changed or recreated:
        consolidate(path)
    return {"recreated": recreated}


def _add_timings(path: StoreRef, layout: StoreLayout) -> bool:
    """Create the timing variables (:data:`TIMINGS`) a store written before them lacks, at
    the store's present sizes (NaN: not timed); whether any was added. A feature's timing
    is added only where the store holds that feature."""
    group = _open_group(path, "r", consolidated=False)
    names = set(group.array_keys())
    sizes = {"explainer": group["entry"].shape[0], "shard": group["record_load"].shape[0]}
    missing = {}
    for name, (dims, _) in _variables(layout).items():
        if name not in TIMINGS or name in names:
            continue
        feature = next((f for f, members in FEATURES.items() if name in members), None)
        if feature is not None and f"record_{feature}" not in names:
            continue  # the feature is created whole (with its timing) when the config turns it on
        shape = tuple(sizes[d] for d in dims)
        missing[name] = (dims, _lazy(shape, (1,) * len(shape), np.float64))
    if not missing:
        return False
    ds = xr.Dataset(missing, attrs=dict(group.attrs))  # xarray's append rewrites the attrs
    ds.to_zarr(str(path), mode="a", compute=False, encoding=_encoding(ds), consolidated=False, zarr_format=3)
    return True


def _recreate(path: StoreRef, layout: StoreLayout, features: list[str]) -> None:
    """Delete and recreate the variables of ``features`` at their new shape (records cleared).
    A recreated preview clears the load records of the shards that write it."""
    group = _open_group(path, "r+", consolidated=False)
    names = set(group.array_keys())
    for f in features:
        for name in FEATURES[f]:
            if name in names:
                del group[name]
    wanted = {n for f in features for n in FEATURES[f]}
    data = {k: v for k, v in _variables(layout).items() if k in wanted}
    coords = {k: v for k, v in _feature_coords(layout).items() if k in wanted}
    if data:
        ds = xr.Dataset(data, coords=coords, attrs=dict(group.attrs))  # xarray's append rewrites the attrs
        ds.to_zarr(str(path), mode="a", compute=False, encoding=_encoding(ds), consolidated=False, zarr_format=3)
    if "preview" in features and layout.n_previews:
        arr = _open_group(path, "r+", consolidated=False)["record_load"]
        arr[: -(-layout.n_previews // layout.shard_size)] = 0


def set_selection(path: StoreRef, active_order: Sequence[int], sample_order: Sequence[int]) -> None:
    """Mark which entries and samples the current config uses, in its order (-1: not used),
    and label entries: an active entry by its name, an inactive one by its key."""
    group = _open_group(path, "r+", consolidated=False)
    active = np.asarray(active_order, np.int64)
    keys = [str(v) for v in group["entry"][:]]
    labels = _obj(k.rsplit("@", 1)[0] if a >= 0 else k for k, a in zip(keys, active))
    for name, values in (("active_order", active), ("sample_order", np.asarray(sample_order, np.int64)),
                         ("explainer", labels)):
        if not np.array_equal(np.asarray(group[name][:]).astype(values.dtype), values):
            group[name][:] = values


def set_attrs(path: StoreRef, attrs: dict[str, str]) -> bool:
    """Update group attributes when they differ and refresh the consolidated metadata."""
    group = _open_group(path, consolidated=False)
    changed = {k: v for k, v in attrs.items() if group.attrs.get(k) != v}
    if changed:
        group.attrs.update(changed)
        consolidate(path)
    return bool(changed)


def image_coords(height: int, width: int) -> dict[str, xr.Variable]:
    """Pixel coordinates for display: ``x`` = column, ``y`` = height above the bottom row
    (row ``r`` is ``y = height - 1 - r``), so that ``.plot()`` / ``.plot.imshow()`` draw maps
    and previews right side up (xarray puts larger ``y`` higher). Positional indexing
    (``isel``, ``.values[..., r, c]``) is unchanged: row 0 is the top row."""
    return {
        "y": xr.Variable("y", np.arange(height - 1, -1, -1, dtype=np.int64),
                         {"long_name": "pixels above the bottom row", "units": "pixel"}),
        "x": xr.Variable("x", np.arange(width, dtype=np.int64), {"long_name": "column", "units": "pixel"}),
    }


def open_dataset(path: StoreRef, dask: bool = True) -> xr.Dataset:
    """Open the whole store with xarray: every entry and sample, data variables lazy,
    coordinates loaded (so that ``ds.groupby("family")`` and ``ds.where(..., drop=True)``
    work; a bare ``xr.open_zarr`` leaves them as dask arrays) and pixel coordinates
    ``y`` / ``x`` (:func:`image_coords`: maps plot right side up).

    ``dask``: data variables as dask arrays in the store's chunks (for out-of-core
    computation); False: xarray's lazily indexed arrays, which read a whole selection in one
    zarr call, several times faster for many small chunks (the report reads its tables so)."""
    ds = xr.open_zarr(str(path), consolidated=True, **({} if dask else {"chunks": None}))
    ds = ds.assign_coords({name: ds[name].load() for name in ds.coords})
    if "y" in ds.dims and "y" not in ds.coords:
        ds = ds.assign_coords(image_coords(ds.sizes["y"], ds.sizes["x"]))
    return ds


def select_current(ds: xr.Dataset, include_inactive: bool = False) -> xr.Dataset:
    """The current config's view of a store: its entries in its order (then, with
    ``include_inactive``, the inactive entries in store order, their family suffixed
    ``-inactive``: they keep the scores of the evaluation settings they were last scored
    with, so the report pools and ranks them apart), its samples in store order
    (the order they were first added: a reordered folder keeps its order; a fresh run's
    store order is the config's), the shards holding those samples (coordinate
    ``shard_samples``: how many each holds). Previews are kept when the view's first samples
    are the stored first ones (else they are left out)."""
    if "active_order" not in ds.coords:
        return ds
    order = ds["active_order"].values
    active = np.flatnonzero(order >= 0)
    rows = list(active[np.argsort(order[active], kind="stable")])
    if include_inactive:
        rows += list(np.flatnonzero(order < 0))
    chosen = np.flatnonzero(ds["sample_order"].values >= 0)  # in store order: previews and sanity follow it
    view = ds.isel(explainer=rows, sample=chosen)
    if include_inactive:  # their own family rows: scored under the settings they were last evaluated with
        inactive = view["active_order"].values < 0
        view = view.assign_coords(family=("explainer", _obj(
            f"{f}-inactive" if off else str(f) for f, off in zip(view["family"].values, inactive))))
    if "metric" in view.dims:  # metrics that attriflow no longer computes stay stored, unreported
        view = view.sel(metric=[m for m in view["metric"].values if str(m) in METRICS])
    size = int(json.loads(ds.attrs["fixed"])["shard_size"])
    shards, per_shard = np.unique(chosen // size, return_counts=True)
    view = view.isel(shard=shards).assign_coords(shard_samples=("shard", per_shard))
    if "preview" in view:
        k = min(view.sizes["preview"], len(chosen))
        if (chosen[:k] < ds.sizes["preview"]).all():
            view = view.isel(preview=chosen[:k])
        else:
            view = view.drop_vars("preview")
    return view


def open_current(path: StoreRef, include_inactive: bool = False, dask: bool = True) -> xr.Dataset:
    """``select_current(open_dataset(path, dask))``: what the report reads."""
    return select_current(open_dataset(path, dask), include_inactive)


def write_region(path: StoreRef, variables: dict[str, tuple[tuple[str, ...], np.ndarray]],
                 region: dict[str, slice], rows: np.ndarray | None = None) -> None:
    """Write whole-chunk regions of data variables through xarray.

    Parameters
    ----------
    path : Path
        The store.
    variables : dict
        Name to ``(dims, array)``; every variable must span all dims named in ``region``.
    region : dict of str to slice
        Chunk-aligned slices.
    rows : array of int, optional
        When the arrays hold only some samples of the region's ``sample`` slice: their offsets
        in it. The other samples keep their stored values (the chunks belong to one shard
        task, so reading and rewriting them is safe).
    """
    span = region.get("sample")
    if rows is not None and span is not None and len(rows) != span.stop - span.start:
        group = _open_group(path, "r")
        merged = {}
        for name, (dims, arr) in variables.items():
            cur = np.asarray(group[name][tuple(region.get(d, slice(None)) for d in dims)])
            index: list[Any] = [slice(None)] * cur.ndim
            index[dims.index("sample")] = np.asarray(rows)
            cur[tuple(index)] = arr
            merged[name] = (dims, cur)
        variables = merged
    ds = xr.Dataset({k: xr.Variable(dims, arr) for k, (dims, arr) in variables.items()})
    ds.to_zarr(str(path), region=region, mode="r+", consolidated=False)


def get_record(path: StoreRef, stage: str, shard: int, explainer: int | None = None) -> int:
    """Stored provenance digest of a (stage, explainer, shard) record; 0 if not done."""
    arr = _open_group(path, "r")[f"record_{stage}"]
    return int(arr[shard] if explainer is None else arr[explainer, shard])


def set_record(path: StoreRef, stage: str, shard: int, digest: int, explainer: int | None = None) -> None:
    """Write a completion record (after the data it covers has been written)."""
    arr = _open_group(path)[f"record_{stage}"]
    if explainer is None:
        arr[shard] = np.uint64(digest)
    else:
        arr[explainer, shard] = np.uint64(digest)


def set_seconds(path: StoreRef, stage: str, seconds: float, *index: int) -> None:
    """Write a task's wall seconds into ``<stage>_seconds`` at ``index`` (one chunk per
    element, like the records; see :data:`TIMINGS`)."""
    _open_group(path)[f"{stage}_seconds"][index] = np.float64(seconds)


def read_records(path: StoreRef) -> dict[str, np.ndarray]:
    """All completion records as arrays (``load``: (shard,), others: (explainer, shard))."""
    group = _open_group(path, "r")
    return {stage: np.asarray(group[f"record_{stage}"][:]) for stage in STAGES if f"record_{stage}" in group}


def entry_index(path: StoreRef, key: str) -> int:
    """Position of entry ``key`` on the store's ``explainer`` axis.

    Raises
    ------
    KeyError
        When the store has no such entry (the run's prepare task has not grown it).
    """
    keys = [str(v) for v in _open_group(path, "r")["entry"][:]]
    if key not in keys:
        raise KeyError(f"the store has no entry {key!r} (it holds {', '.join(keys)})")
    return keys.index(key)


def inactive_entries(path: StoreRef) -> list[dict[str, Any]]:
    """Entries the current config does not use: key, method, params, finished explain
    shards and bytes of their attribution chunks (local stores)."""
    group = _open_group(path, "r")
    order = np.asarray(group["active_order"][:])
    done = np.asarray(group["record_explain"][:]) != 0
    out = []
    for k in np.flatnonzero(order < 0):
        size = None
        if isinstance(path, Path):
            chunks = path / "attribution" / "c" / str(int(k))
            size = sum(f.stat().st_size for f in chunks.rglob("*") if f.is_file()) if chunks.exists() else 0
        out.append({"entry": str(group["entry"][k]), "method": str(group["method"][k]),
                    "params": json.loads(str(group["params"][k])), "explain_shards_done": int(done[k].sum()),
                    "attribution_bytes": size})
    return out


def recover(path: StoreRef) -> None:
    """Finish a ``remove_inactive`` swap that was interrupted between its two renames (the new
    store is complete by then) and drop the old copy."""
    if not isinstance(path, Path):
        return
    tmp, old = path.with_name(path.name + ".gc"), path.with_name(path.name + ".old")
    if not path.exists() and old.exists() and tmp.exists():
        os.replace(tmp, path)
    if path.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)


def remove_inactive(path: Path) -> list[str]:
    """Remove the inactive entries: the store without them is written next to it and swapped in
    (``os.replace``), so an interruption leaves the old store or the new one, never a mix.
    Returns the removed entry keys.

    Raises
    ------
    ValueError
        For a store at a URL (no atomic swap there).
    """
    if not isinstance(path, Path):
        raise ValueError(f"attriflow gc --delete needs a local store, not {path!r}")
    ds = open_dataset(path)
    ds = ds.drop_vars([c for c in ("y", "x") if c in ds.coords])  # display coordinates, not stored
    order = ds["active_order"].values
    removed = [str(k) for k in ds["entry"].values[order < 0]]
    if not removed:
        return []
    keep = ds.isel(explainer=np.flatnonzero(order >= 0))
    for name, var in keep.variables.items():
        var.encoding.pop("preferred_chunks", None)
        if name in keep.coords:
            var.encoding.pop("chunks", None)
    tmp, old = path.with_name(path.name + ".gc"), path.with_name(path.name + ".old")
    recover(path)
    shutil.rmtree(tmp, ignore_errors=True)
    keep.to_zarr(str(tmp), mode="w", consolidated=False, zarr_format=3)
    consolidate(tmp)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return removed


_HELD: set[str] = set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLockedError(RuntimeError):
    """Another process holds the run directory."""


def clear_held_locks() -> None:
    """Clear the pid in the lock files of the run directories this process holds, for an exit
    through ``os._exit`` (a second Ctrl-C): the kernel releases the flocks, and a cleared pid
    tells the next run that the exit was deliberate (see :func:`run_lock`)."""
    for key in list(_HELD):
        try:
            os.truncate(Path(key) / ".attriflow.lock", 0)
        except OSError:
            pass


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the block (``flock``: released on death).

    A lock file left by a process that died is taken over safely: the kernel released its
    flock, so acquiring it proves nobody holds the directory; the dead holder's pid is
    reported in a warning. A live holder makes this fail at once. Taking the directory
    removes its finished-run marker (:mod:`tasks.finished`).

    Raises
    ------
    RunLockedError
        At once, when another live process holds the run directory.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _HELD:  # re-entrant within one process (the CLI, then the flow)
        yield
        return
    lock_path = run_dir / ".attriflow.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(
                f"run directory {str(run_dir)!r} is in use by another attriflow process "
                f"(pid {holder}); wait for it to finish or use another --run-dir"
            ) from None
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid() and not _alive(int(previous)):
            warnings.warn(f"run directory {str(run_dir)!r}: taking over the lock left by process {previous}, "
                          "which is gone (its finished shards are kept; unfinished ones are redone)", stacklevel=3)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        finished.remove(run_dir)  # whoever holds the directory may change it: no finished answer
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            os.ftruncate(fd, 0)  # a clean exit leaves no pid: a pid left behind means a death
    finally:
        os.close(fd)  # closing the descriptor releases the flock
