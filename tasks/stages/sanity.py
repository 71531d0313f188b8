"""The sanity check: cascading model-parameter randomisation of one explainer."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zarr
from prefect.cache_policies import NO_CACHE

from attriflow.analysis.metrics import METRICS_VERSION
from attriflow.tasks import storage
from attriflow.tasks.runtime import (
    derive_seed,
    fault_point,
    get_runtime,
)
from attriflow.tasks.stages import common
from attriflow.tasks.stages.common import explainer_index, shard_task, store_path
from attriflow.tasks.storage import Shard


def sanity_samples(rt: Any, store_keys: Sequence[str]) -> tuple[list[str], list[int]]:
    """The sanity check's samples: the first ``sanity.samples`` of the config's samples in
    store order (a fresh run's: the config's first; a reordered folder keeps them); their
    keys and their positions in the store."""
    n = min(rt.config.sanity.samples, len(rt.source))
    where = common.source_index(rt.source)
    positions = [i for i, k in enumerate(store_keys) if k in where][:n]
    return [store_keys[i] for i in positions], positions


def sanity_shards(rt: Any, store_keys: Sequence[str]) -> list[int]:
    """Indices of the store shards holding the sanity check's samples."""
    _, positions = sanity_samples(rt, store_keys)
    return sorted({p // rt.config.shard_size for p in positions})


def expected_record(rt: Any, keys: Sequence[str], explain_records: list[int]) -> int:
    """The provenance digest of a finished sanity check of samples ``keys``: the explain
    records of their shards, the stage's settings, the run seed, the metrics' version and
    the randomisation units."""
    return storage.digest64("sanity", common.keys_digest(keys), explain_records,
                            rt.config.sanity.model_dump(mode="json"), rt.config.seed, METRICS_VERSION,
                            [[u, list(m)] for u, m in rt.sanity_units])


@shard_task(name="sanity-check", cache_policy=NO_CACHE, task_run_name="sanity-{explainer}")
def sanity_check(config_json: str, run_dir: str, explainer: str) -> dict[str, Any]:
    """Cascading model-parameter randomisation for one explainer on the first samples.

    The trained-model maps are the stored attributions; each randomised model's maps use
    the same per-sample seeds, so for stochastic methods the randomisation is the only
    difference. Every explainer sees the same randomised models (seeded per unit).
    """
    from attriflow.analysis.metrics.sanity import cascading_randomisation, similarities

    t0 = time.perf_counter()
    rt = get_runtime(config_json)
    started = time.perf_counter()  # the task's own work (the runtime is built once per worker)
    path = store_path(run_dir)
    k = explainer_index(rt, path, explainer)
    keys, positions = sanity_samples(rt, common.stored_keys(path))
    n = len(keys)
    shards = sanity_shards(rt, common.stored_keys(path))
    records = [storage.get_record(path, "explain", s, k) for s in shards]
    if 0 in records:
        raise RuntimeError(f"sanity {explainer}: its explain shards {shards} are not all done")
    expected = expected_record(rt, keys, records)
    whole = Shard(0, 0, n)
    if storage.get_record(path, "sanity", k) == expected:
        return common.receipt("sanity", whole, True, t0, explainer=explainer)
    where = common.source_index(rt.source)
    batch = rt.source.load_at([where[key] for key in keys])
    inputs = rt.model.normalize(torch.from_numpy(batch.images)).to(rt.device)
    group = zarr.open_group(str(path), mode="r")
    name = "prediction" if rt.config.explain.target == "prediction" else "label"
    targets = torch.from_numpy(np.asarray(group[name].get_orthogonal_selection(positions), np.int64)).to(rt.device)
    seeds = torch.tensor([derive_seed(rt.config.seed, rt.source.sample_ids[where[key]], explainer) for key in keys],
                         dtype=torch.int64)
    trained = np.asarray(group["attribution"].get_orthogonal_selection((k, positions)), dtype=np.float64)
    units = [(u, list(m)) for u, m in rt.sanity_units]
    out = np.full((1, n, len(units), 3), np.nan, dtype=np.float32)
    for depth, _unit, model in cascading_randomisation(rt.module, units, rt.config.seed):
        exp = rt.build_explainer(explainer, model)
        with rt.precision():
            maps = exp.attribute(rt.prepare_inputs(inputs), targets, batch_size=rt.explain_batch,
                                 seeds=seeds).float()
        stored, overflow, _ = storage.round_maps(maps.cpu().numpy(), rt.config.store.attribution_dtype)  # as stored
        if overflow.any():
            warnings.warn(f"sanity {explainer}, depth {depth}: {int(overflow.sum())} map(s) of the randomised model "
                          "exceed float16's range: their similarities are NaN; store.attribution_dtype: bfloat16 or float32 "
                          "keeps them", RuntimeWarning, stacklevel=2)
        out[0, :, depth - 1] = similarities(trained, stored.astype(np.float64))
        out[0, overflow, depth - 1] = np.nan  # not stored faithfully: no similarity
    flagged = np.asarray(group["flagged"].get_orthogonal_selection((k, positions)), dtype=bool)
    out[0, flagged] = np.nan  # non-finite model output
    storage.write_region(path, {"sanity": (("explainer", "sanity_sample", "depth", "similarity"), out)},
                         {"explainer": slice(k, k + 1)})
    common.write_seconds(path, "sanity", started, k)
    fault_point("sanity.after_write")
    storage.set_record(path, "sanity", k, expected)
    return common.receipt("sanity", whole, False, t0, explainer=explainer)
