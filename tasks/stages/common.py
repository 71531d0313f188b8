"""Shared pieces of the stage tasks: the task decorator, the store's location, receipts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from prefect import task

from tasks import storage
from tasks.storage import Shard


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


def receipt(stage: str, shard: Shard, skipped: bool, t0: float, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "shard": shard.index, "skipped": skipped,
            "seconds": round(time.perf_counter() - t0, 3), **extra}


def stored_targets(path: Path, rt: Any, shard: Shard) -> torch.Tensor:
    group = zarr.open_group(str(path), mode="r")
    name = "prediction" if rt.config.explain.target == "prediction" else "label"
    return torch.from_numpy(np.asarray(group[name][shard.start : shard.stop], dtype=np.int64))


def explainer_index(rt: Any, name: str) -> int:
    """Position of explainer ``name`` in the run's config: its index on the store's
    ``explainer`` axis and in the per-explainer records."""
    return [e.name for e in rt.config.explain.explainers].index(name)


def finished_record(path: Any, stage: str, shard: int, explainer: int | None, task: str) -> int:
    """The completion record of the upstream ``stage`` shard a task builds on.

    Raises
    ------
    RuntimeError
        ``"<task>: its <stage> shard is not done"`` when that shard has no record.
    """
    record = storage.get_record(path, stage, shard, explainer)
    if record == 0:
        raise RuntimeError(f"{task}: its {stage} shard is not done")
    return record
