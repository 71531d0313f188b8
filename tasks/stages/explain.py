"""The explain stage: one explainer's attributions for one shard."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from prefect.cache_policies import NO_CACHE

from attriflow.tasks import storage
from attriflow.tasks.runtime import (
    derive_seed,
    fault_point,
    fault_raise,
    get_runtime,
)
from attriflow.tasks.stages import common, load
from attriflow.tasks.stages.common import (
    explainer_index,
    finished_record,
    shard_task,
    store_path,
    stored_targets,
)
from attriflow.tasks.storage import Shard


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _passes(exp: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward passes per image of the last ``attribute`` call: the counts the
    explainer reported, else its static cost (-1 where that is a formula). A method whose
    static cost has one backward per forward (NeuroMask's iterations) reports the same
    per-image count for both."""
    static = exp.cost()
    fixed = [np.full(n, v if isinstance(v, int) else -1, dtype=np.int64)
             for v in (static["forward"], static["backward"])]
    if exp.last_forward_passes is None:
        return fixed[0], fixed[1]
    forward = exp.last_forward_passes.numpy().astype(np.int64)
    backward = forward.copy() if static["forward"] == static["backward"] else fixed[1]
    return forward, backward


def _warn_encoding(explainer: str, shard: Shard, overflow: np.ndarray, imprecise: np.ndarray) -> None:
    """Say which maps ``store.attribution_dtype: float16`` cannot hold faithfully."""
    where = f"explain {explainer} shard {shard.index}"
    if overflow.any():
        warnings.warn(f"{where}: {int(overflow.sum())} map(s) cannot be stored as float16 (a value beyond "
                      "+-65504, or every value below 3e-8 so that the map would be all zero); they are flagged "
                      "and left out of every metric; store.attribution_dtype: bfloat16 or float32 keeps them",
                      RuntimeWarning, stacklevel=2)
    if imprecise.any():
        warnings.warn(f"{where}: {int(imprecise.sum())} map(s) lie entirely below 6.1e-05 in magnitude, where "
                      "float16 keeps fewer than 11 significant bits; store.attribution_dtype: bfloat16 or "
                      "float32 keeps them", RuntimeWarning, stacklevel=2)


def expected_record(rt: Any, explainer: str, keys: Sequence[str]) -> int:
    """The provenance digest of one explainer's finished shard of samples ``keys``: their
    load record, the explainer's digest (method, version, parameters), the run seed, the
    target and the numeric settings."""
    return storage.digest64("explain", load.expected_record(rt, keys), rt.explainers[explainer].digest(),
                            rt.config.seed, rt.config.explain.target, *common.numerics(rt))


def candidates(rt: Any, explainer: str, view: common.ShardView) -> list[int]:
    """The explain records that make ``view``'s shard done (see ``ShardView.key_sets``)."""
    return [expected_record(rt, explainer, keys) for keys in view.key_sets]


@shard_task(name="explain-shard", cache_policy=NO_CACHE, task_run_name="explain-{explainer}-{shard.index}")
def explain_shard(config_json: str, run_dir: str, explainer: str, shard: Shard) -> dict[str, Any]:
    """Compute and store one explainer's attributions for one shard's configured samples."""
    t0 = time.perf_counter()
    rt = get_runtime(config_json)
    path = store_path(run_dir)
    view = common.shard_view(rt, path, shard)
    k = explainer_index(rt, path, explainer)
    exp = rt.explainers[explainer]
    finished_record(path, "load", shard.index, None, f"explain {explainer} shard {shard.index}",
                    load.candidates(rt, view))
    expected = candidates(rt, explainer, view)
    if common.accepted(storage.get_record(path, "explain", shard.index, k), expected):
        return common.receipt("explain", shard, True, t0, explainer=explainer)
    fault_raise(run_dir, f"explain-{explainer}-{shard.index}")
    batch = rt.source.load_at(view.positions)
    inputs = rt.model.normalize(torch.from_numpy(batch.images)).to(rt.device)
    targets = stored_targets(path, rt, view).to(rt.device)
    ids = [rt.source.sample_ids[p] for p in view.positions]
    seeds = torch.tensor([derive_seed(rt.config.seed, i, explainer) for i in ids], dtype=torch.int64)
    _sync(rt.device)
    started = time.perf_counter()
    with rt.precision():
        maps = exp.attribute(rt.prepare_inputs(inputs), targets, batch_size=rt.explain_batch,
                             seeds=seeds).float()
    _sync(rt.device)
    seconds = time.perf_counter() - started
    forward, backward = _passes(exp, len(ids))
    maps_np, overflow, imprecise = storage.round_maps(maps.cpu().numpy(), rt.config.store.attribution_dtype)
    _warn_encoding(explainer, shard, overflow, imprecise)
    finite_output = common.read_rows(path, "finite_output", view).astype(bool)
    flagged = ~np.isfinite(maps_np).reshape(len(maps_np), -1).all(axis=1) | ~finite_output | overflow
    storage.write_region(
        path,
        {"attribution": (("explainer", "sample", "y", "x"), maps_np[None]),
         "flagged": (("explainer", "sample"), flagged[None]),
         "forward_passes": (("explainer", "sample"), forward[None]),
         "backward_passes": (("explainer", "sample"), backward[None])},
        {"explainer": slice(k, k + 1), "sample": slice(shard.start, shard.stop)},
        rows=view.rows_array(),
    )
    storage.set_seconds(path, "explain", seconds, k, shard.index)
    fault_point("explain.after_write")
    storage.set_record(path, "explain", shard.index, expected[-1], k)
    fault_point("explain.after_record")
    return common.receipt("explain", shard, False, t0, explainer=explainer)
