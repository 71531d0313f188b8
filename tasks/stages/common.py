"""Shared pieces of the stage tasks: the task decorator, the store's location, receipts,
entries and the samples of a shard."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from prefect import task

from attriflow.tasks import storage
from attriflow.tasks.storage import Shard


def shard_task(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``prefect.task`` that Dask can ship to worker processes by reference.

    The module attribute is the Task, not the function, so cloudpickle would pickle the
    function by value (with its module globals, some of which cannot be pickled); naming
    the function ``<task>.fn`` lets pickle find it again through the Task on the worker.
    """

    def wrap(fn: Callable[..., Any]) -> Any:
        t = task(**options)(fn)
        fn.__qualname__ = f"{fn.__name__}.fn"
        return t

    return wrap


STORE_POINTER = "store-url"


def store_path(run_dir: str | Path) -> storage.StoreRef:
    """The run's store: the URL recorded in ``RUN_DIR/store-url`` when the config named
    one (``store:``), else ``RUN_DIR/store.zarr``."""
    pointer = Path(run_dir) / STORE_POINTER
    if pointer.exists():
        return storage.store_ref(pointer.read_text().strip())
    return Path(run_dir) / storage.STORE_NAME


def write_seconds(path: storage.StoreRef, stage: str, started: float, *index: int) -> None:
    """Store the task's wall seconds since ``started`` (taken once the worker's runtime is
    built, so a worker's first task does not count loading the model) in
    ``<stage>_seconds[index]``, before the task's record is set (see ``storage.TIMINGS``)."""
    storage.set_seconds(path, stage, time.perf_counter() - started, *index)


def receipt(stage: str, shard: Shard, skipped: bool, t0: float, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "shard": shard.index, "skipped": skipped,
            "seconds": round(time.perf_counter() - t0, 3), **extra}


@dataclass(frozen=True)
class ShardView:
    """One store shard as the current config sees it.

    Attributes
    ----------
    shard : Shard
        The range of stored samples.
    rows : tuple of int
        Offsets in the shard of the samples the config uses (ascending).
    positions : tuple of int
        Their positions in the run's dataset source.
    full_keys, member_keys : tuple of str
        Sample keys of the whole shard and of the config's samples in it.
    """

    shard: Shard
    rows: tuple[int, ...]
    positions: tuple[int, ...]
    full_keys: tuple[str, ...]
    member_keys: tuple[str, ...]

    @property
    def full(self) -> bool:
        """Whether the config uses every sample of the shard."""
        return len(self.rows) == len(self.full_keys)

    @property
    def key_sets(self) -> list[tuple[str, ...]]:
        """The sample sets whose records make this shard done: the whole shard (work done for
        a larger config covers a smaller one), then the config's samples in it. Work is done
        on the last."""
        return [self.full_keys] if self.full else [self.full_keys, self.member_keys]

    def rows_array(self) -> np.ndarray:
        """``rows`` as an int64 array."""
        return np.asarray(self.rows, dtype=np.int64)


def keys_digest(keys: Sequence[str]) -> str:
    """sha256 of a list of sample keys."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


_WHERE: dict[int, tuple[Any, dict[str, int]]] = {}


def source_index(source: Any) -> dict[str, int]:
    """Position of each sample key in a source (cached per source object)."""
    hit = _WHERE.get(id(source))
    if hit is None or hit[0] is not source:
        if len(_WHERE) >= 4:  # the runtimes' sources (a few per process): drop the oldest
            _WHERE.pop(next(iter(_WHERE)))
        hit = (source, {k: i for i, k in enumerate(source.sample_keys)})
        _WHERE[id(source)] = hit
    return hit[1]


def _view(where: dict[str, int], store_keys: Sequence[str], shard: Shard) -> ShardView | None:
    full = tuple(store_keys[shard.start : shard.stop])
    rows = tuple(j for j, k in enumerate(full) if k in where)
    if not rows:
        return None
    return ShardView(shard, rows, tuple(where[full[j]] for j in rows), full, tuple(full[j] for j in rows))


def shard_views(source: Any, store_keys: Sequence[str], shard_size: int) -> list[ShardView]:
    """The store's shards that hold at least one of ``source``'s samples."""
    where = source_index(source)
    views = (_view(where, store_keys, s) for s in storage.plan_shards(len(store_keys), shard_size))
    return [v for v in views if v is not None]


_STORED_KEYS: dict[tuple[str, int, int], tuple[str, ...]] = {}


def stored_keys(path: Any) -> tuple[str, ...]:
    """The store's sample keys (a local store's are cached per process until their metadata
    file changes)."""
    arr = zarr.open_group(str(path), mode="r")["sample_key"]
    if not isinstance(path, Path):
        return tuple(str(v) for v in arr[:])
    meta = path / "sample_key" / "zarr.json"
    key = (str(path), int(arr.shape[0]), meta.stat().st_mtime_ns if meta.exists() else 0)
    if key not in _STORED_KEYS:
        _STORED_KEYS.clear()
        _STORED_KEYS[key] = tuple(str(v) for v in arr[:])
    return _STORED_KEYS[key]


def shard_view(rt: Any, path: Any, shard: Shard) -> ShardView:
    """The view of one store shard for the run's config.

    Raises
    ------
    RuntimeError
        When the config uses none of the shard's samples (the flow never submits such a shard).
    """
    view = _view(source_index(rt.source), stored_keys(path), shard)
    if view is None:
        raise RuntimeError(f"shard {shard.index}: the config uses none of its samples")
    return view


def numerics(rt: Any) -> tuple[Any, ...]:
    """The numeric settings that enter a map's provenance (fp32 row-major adds nothing)."""
    e = rt.config.explain
    return () if (e.precision, e.channels_last) == ("fp32", False) else (e.precision, e.channels_last)


def entry_key(rt: Any, name: str) -> str:
    """The store entry of explainer ``name`` in this run: ``name@digest``, the digest covering
    the method, its version and parameters, the seed, the target, the numerics and the model."""
    d = storage.digest64("entry", rt.explainers[name].digest(), rt.config.seed, rt.config.explain.target,
                         *numerics(rt), rt.model.digest)
    return f"{name}@{d:016x}"[: len(name) + 9]


def stored_targets(path: Path, rt: Any, view: ShardView) -> torch.Tensor:
    """The explained class (prediction or label) of the view's samples."""
    group = zarr.open_group(str(path), mode="r")
    name = "prediction" if rt.config.explain.target == "prediction" else "label"
    block = np.asarray(group[name][view.shard.start : view.shard.stop], dtype=np.int64)
    return torch.from_numpy(block[view.rows_array()])


def read_rows(path: Any, name: str, view: ShardView, k: int | None = None) -> np.ndarray:
    """A stored variable's values for the view's samples (``k``: the entry, for per-entry variables)."""
    arr = zarr.open_group(str(path), mode="r")[name]
    block = arr[view.shard.start : view.shard.stop] if k is None else arr[k, view.shard.start : view.shard.stop]
    return np.asarray(block)[view.rows_array()]


def explainer_index(rt: Any, path: Any, name: str) -> int:
    """Position of explainer ``name``'s entry on the store's ``explainer`` axis."""
    return storage.entry_index(path, entry_key(rt, name))


def accepted(stored: int, candidates: Sequence[int]) -> bool:
    """Whether a stored record is one of a shard's expected records (see ``ShardView.key_sets``)."""
    return stored != 0 and stored in candidates


def finished_record(path: Any, stage: str, shard: int, explainer: int | None, task: str,
                    candidates: Sequence[int] | None = None) -> int:
    """The completion record of the upstream ``stage`` shard a task builds on.

    Raises
    ------
    RuntimeError
        ``"<task>: its <stage> shard is not done"`` when that shard has no record (or, given
        ``candidates``, none of them).
    """
    record = storage.get_record(path, stage, shard, explainer)
    if record == 0 or (candidates is not None and record not in candidates):
        raise RuntimeError(f"{task}: its {stage} shard is not done")
    return record
