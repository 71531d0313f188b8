"""The run store: one Zarr v3 group read and written through xarray.

Layout (dims ``explainer, sample, y, x, metric, point, shard, corner``):

- ``attribution(explainer, sample, y, x)`` float32, chunks ``(1, shard_size, H, W)``;
- ``label``, ``prediction`` (int64), ``probability`` (float32) per ``sample``;
  ``gt_mask(sample, y, x)`` and ``gt_box(sample, corner)`` where the dataset has them;
- ``finite_output(sample)``: the model's logits on the clean image are all finite;
  ``flagged(explainer, sample)``: the map (or the model output it explains) is not finite:
  its scores are NaN and it is left out of every mean;
- ``forward_passes(explainer, sample)`` and ``backward_passes(explainer, sample)``: model
  evaluations and backward passes each map cost (-1 when the method cannot say);
  ``explain_seconds(explainer, shard)``: wall time of each shard's attribution (the one
  non-reproducible variable, see ``NONDETERMINISTIC``);
- ``sanity(explainer, sanity_sample, depth, similarity)``: cascading randomisation
  similarities of the first samples' maps (coords ``randomised(depth)``: the unit
  re-initialised at each depth, top first), record ``record_sanity(explainer)``;
- ``preview(preview, y, x, rgb)``: the first images as uint8 for the report's figures;
- ``score(explainer, sample, metric)`` and ``curve(explainer, sample, metric, point)``;
- completion records ``record_load(shard)``, ``record_explain(explainer, shard)`` and
  ``record_evaluate(explainer, shard)``: uint64 provenance digests, 0 = not done, one
  chunk per element, each written only after the data it covers;
- coordinates ``explainer``, ``family(explainer)``, ``method(explainer)``,
  ``params(explainer)`` (JSON), ``sample`` (dataset index), ``sample_name(sample)``,
  ``metric``, ``higher_is_better(metric)``;
- group attrs: ``schema_version`` and ``manifest`` (JSON of the resolved config, its hash,
  seed, package versions, git commit).

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
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from analysis.metrics.sanity import SIMILARITIES
SCHEMA_VERSION = 2
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
#: Wall-clock measurements: the only variables that differ between two identical runs.
NONDETERMINISTIC = ("explain_seconds",)


@dataclass(frozen=True)
class Shard:
    """A range of samples ``[start, stop)`` handled by one task; ``index`` is its number."""

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
class StoreLayout:
    """Everything that fixes the shape of a store; a rerun must match it exactly."""

    sample_ids: tuple[int, ...]
    sample_names: tuple[str, ...]
    height: int
    width: int
    shard_size: int
    explainers: tuple[str, ...]
    families: tuple[str, ...]
    methods: tuple[str, ...]
    has_mask: bool
    has_box: bool
    n_points: int
    neuron_layers: tuple[tuple[str, int], ...] = ()
    n_previews: int = 0  # first samples whose image is kept (uint8) for figures
    sanity_units: tuple[str, ...] = ()  # randomisation units, top first (empty: no sanity check)
    n_sanity: int = 0  # first samples of the sanity check

    @property
    def n_samples(self) -> int:
        """Number of samples."""
        return len(self.sample_ids)

    @property
    def n_shards(self) -> int:
        """Number of shards."""
        return -(-self.n_samples // self.shard_size)

    def key(self) -> dict[str, Any]:
        """What must be equal for an existing store to be reused."""
        return {
            "samples": hashlib.sha256(np.asarray(self.sample_ids, np.int64).tobytes()).hexdigest(),
            "n_samples": self.n_samples,
            "height": self.height,
            "width": self.width,
            "shard_size": self.shard_size,
            "explainers": list(self.explainers),
            "methods": list(self.methods),
            "has_mask": self.has_mask,
            "has_box": self.has_box,
            "n_points": self.n_points,
            "neuron_layers": [list(x) for x in self.neuron_layers],
            "n_previews": self.n_previews,
            "sanity_units": list(self.sanity_units),
            "n_sanity": self.n_sanity,
        }


class StoreLayoutError(ValueError):
    """An existing store whose layout differs from what the config asks for."""


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


def _open_group(path: StoreRef, mode: str = "r+") -> zarr.Group:
    return zarr.open_group(str(path), mode=mode, zarr_format=3)


def consolidate(path: StoreRef) -> None:
    """Refresh consolidated metadata so that a bare ``xarray.open_zarr(path)`` reads it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def init_store(path: StoreRef, layout: StoreLayout, params: Sequence[str], attrs: dict[str, str]) -> None:
    """Create the store's metadata and coordinates (no data chunk is written).

    Parameters
    ----------
    path : Path
        ``RUN_DIR/store.zarr``; must not exist yet.
    layout : StoreLayout
        Shapes and coordinates.
    params : sequence of str
        JSON of each explainer's resolved parameters.
    attrs : dict of str to str
        Group attributes (``manifest`` and friends).
    """
    n, h, w, s = layout.n_samples, layout.height, layout.width, layout.shard_size
    e, m, p = len(layout.explainers), len(METRICS), layout.n_points
    k = layout.n_shards
    data: dict[str, Any] = {
        "attribution": (("explainer", "sample", "y", "x"), _lazy((e, n, h, w), (1, s, h, w), np.float32)),
        "label": (("sample",), _lazy((n,), (s,), np.int64)),
        "prediction": (("sample",), _lazy((n,), (s,), np.int64)),
        "probability": (("sample",), _lazy((n,), (s,), np.float32)),
        "finite_output": (("sample",), _lazy((n,), (s,), bool)),
        "flagged": (("explainer", "sample"), _lazy((e, n), (1, s), bool)),
        "forward_passes": (("explainer", "sample"), _lazy((e, n), (1, s), np.int64)),
        "backward_passes": (("explainer", "sample"), _lazy((e, n), (1, s), np.int64)),
        "explain_seconds": (("explainer", "shard"), _lazy((e, k), (1, 1), np.float64)),
        "score": (("explainer", "sample", "metric"), _lazy((e, n, m), (1, s, m), np.float32)),
        "curve": (("explainer", "sample", "metric", "point"), _lazy((e, n, m, p), (1, s, m, p), np.float32)),
        "record_load": (("shard",), _lazy((k,), (1,), np.uint64)),
        "record_explain": (("explainer", "shard"), _lazy((e, k), (1, 1), np.uint64)),
        "record_evaluate": (("explainer", "shard"), _lazy((e, k), (1, 1), np.uint64)),
    }
    if layout.neuron_layers:
        u, nl = sum(c for _, c in layout.neuron_layers), len(layout.neuron_layers)
        data["record_neurons"] = (("shard",), _lazy((k,), (1,), np.uint64))
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
    if layout.has_mask:
        data["gt_mask"] = (("sample", "y", "x"), _lazy((n, h, w), (s, h, w), bool))
    if layout.has_box:
        data["gt_box"] = (("sample", "corner"), _lazy((n, 4), (s, 4), np.int64))
    obj = lambda xs: np.array(list(xs), dtype=object)  # noqa: E731  (variable-length strings)
    coords = {
        "explainer": ("explainer", obj(layout.explainers)),
        "family": ("explainer", obj(layout.families)),
        "method": ("explainer", obj(layout.methods)),
        "params": ("explainer", obj(params)),
        "sample": ("sample", np.asarray(layout.sample_ids, np.int64)),
        "sample_name": ("sample", obj(layout.sample_names)),
        "metric": ("metric", obj(METRICS)),
        "higher_is_better": ("metric", np.array([v["higher_is_better"] for v in METRICS.values()])),
        "category": ("metric", obj(v["category"] for v in METRICS.values())),
        "corner": ("corner", obj(["y0", "x0", "y1", "x1"])),
    }
    if layout.sanity_units:
        coords["depth"] = ("depth", np.arange(1, len(layout.sanity_units) + 1))
        coords["randomised"] = ("depth", obj(layout.sanity_units))
        coords["similarity"] = ("similarity", obj(SIMILARITIES))
    if layout.neuron_layers:
        coords["layer"] = ("layer", obj(n for n, _ in layout.neuron_layers))
        coords["unit_layer"] = ("unit", obj(n for n, c in layout.neuron_layers for _ in range(c)))
        coords["unit_channel"] = ("unit", np.array([i for _, c in layout.neuron_layers for i in range(c)]))
    ds = xr.Dataset(data, coords=coords, attrs={"schema_version": SCHEMA_VERSION, **attrs})
    encoding: dict[str, dict[str, Any]] = {}
    for name, var in ds.data_vars.items():
        enc: dict[str, Any] = {"chunks": var.data.chunksize}
        if name.startswith("record_"):
            enc["fill_value"] = 0
        elif name == "unit_box":
            enc["fill_value"] = -1
        elif var.dtype.kind == "f":
            enc["fill_value"] = np.nan
        encoding[name] = enc
    if not isinstance(path, Path):  # a URL: no atomic rename; the root metadata is written last
        ds.to_zarr(path, mode="w", compute=False, encoding=encoding, consolidated=False, zarr_format=3)
        consolidate(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".init")
    ds.to_zarr(str(tmp), mode="w", compute=False, encoding=encoding, consolidated=False, zarr_format=3)
    consolidate(tmp)
    os.replace(tmp, path)  # a store either exists with all its metadata or not at all


def read_layout_key(path: StoreRef) -> dict[str, Any]:
    """The layout key recorded when the store was created."""
    return json.loads(_open_group(path, "r").attrs["layout"])


def set_attrs(path: StoreRef, attrs: dict[str, str]) -> bool:
    """Update group attributes when they differ; returns whether anything was written."""
    group = _open_group(path)
    changed = {k: v for k, v in attrs.items() if group.attrs.get(k) != v}
    if changed:
        group.attrs.update(changed)
        consolidate(path)
    return bool(changed)


def set_params(path: StoreRef, params: Sequence[str]) -> bool:
    """Record each explainer's resolved parameters (JSON) when they changed."""
    arr = _open_group(path)["params"]
    current = [str(v) for v in arr[:]]
    if current == list(params):
        return False
    arr[:] = np.array(list(params), dtype=object)
    return True


def open_dataset(path: StoreRef) -> xr.Dataset:
    """Open the store with xarray: data variables lazy, coordinates loaded (so that
    ``ds.groupby("family")`` works; a bare ``xr.open_zarr`` leaves them as dask arrays)."""
    ds = xr.open_zarr(str(path), consolidated=True)
    return ds.assign_coords({name: ds[name].load() for name in ds.coords})


def write_region(path: StoreRef, variables: dict[str, tuple[tuple[str, ...], np.ndarray]],
                 region: dict[str, slice]) -> None:
    """Write whole-chunk regions of data variables through xarray.

    Parameters
    ----------
    path : Path
        The store.
    variables : dict
        Name to ``(dims, array)``; every variable must span all dims named in ``region``.
    region : dict of str to slice
        Chunk-aligned slices.
    """
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


def read_records(path: StoreRef) -> dict[str, np.ndarray]:
    """All completion records as arrays (``load``: (shard,), others: (explainer, shard))."""
    group = _open_group(path, "r")
    return {stage: np.asarray(group[f"record_{stage}"][:]) for stage in STAGES if f"record_{stage}" in group}


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


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the block (``flock``: released on death).

    A lock file left by a process that died is taken over safely: the kernel released its
    flock, so acquiring it proves nobody holds the directory; the dead holder's pid is
    reported in a warning. A live holder makes this fail at once.

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
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            os.ftruncate(fd, 0)  # a clean exit leaves no pid: a pid left behind means a death
    finally:
        os.close(fd)  # closing the descriptor releases the flock
