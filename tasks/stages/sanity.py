"""The sanity check: cascading model-parameter randomisation of one explainer."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import zarr
from prefect.cache_policies import NO_CACHE

from analysis.metrics import METRICS_VERSION
from tasks import storage
from tasks.runtime import (
    derive_seed,
    fault_point,
    get_runtime,
)
from tasks.stages import common
from tasks.stages.common import explainer_index, shard_task, store_path, stored_targets
from tasks.storage import Shard


def sanity_shards(rt: Any) -> list[Shard]:
    """The shards holding the samples the sanity check re-explains (the first ones)."""
    n = min(rt.config.sanity.samples, len(rt.source))
    return [s for s in storage.plan_shards(len(rt.source), rt.config.shard_size) if s.start < n]


def expected_record(rt: Any, explain_records: list[int]) -> int:
    """The provenance digest of a finished sanity check: the explain records of its shards,
    the stage's settings, the run seed, the metrics' version and the randomisation units."""
    return storage.digest64("sanity", explain_records, rt.config.sanity.model_dump(mode="json"), rt.config.seed,
                            METRICS_VERSION, [[u, list(m)] for u, m in rt.sanity_units])


@shard_task(name="sanity-check", cache_policy=NO_CACHE, task_run_name="sanity-{explainer}")
def sanity_check(config_json: str, run_dir: str, explainer: str) -> dict[str, Any]:
    """Cascading model-parameter randomisation for one explainer on the first samples.

    The trained-model maps are the stored attributions; each randomised model's maps use
    the same per-sample seeds, so for stochastic methods the randomisation is the only
    difference. Every explainer sees the same randomised models (seeded per unit).
    """
    from analysis.metrics.sanity import cascading_randomisation, similarities

    t0 = time.perf_counter()
    rt = get_runtime(config_json)
    path = store_path(run_dir)
    k = explainer_index(rt, explainer)
    n = min(rt.config.sanity.samples, len(rt.source))
    shards = sanity_shards(rt)
    records = [storage.get_record(path, "explain", s.index, k) for s in shards]
    if 0 in records:
        raise RuntimeError(f"sanity {explainer}: its explain shards {[s.index for s in shards]} are not all done")
    expected = expected_record(rt, records)
    whole = Shard(0, 0, n)
    if storage.get_record(path, "sanity", k) == expected:
        return common.receipt("sanity", whole, True, t0, explainer=explainer)
    batch = rt.source.load(0, n)
    inputs = rt.model.normalize(torch.from_numpy(batch.images)).to(rt.device)
    targets = stored_targets(path, rt, whole).to(rt.device)
    seeds = torch.tensor([derive_seed(rt.config.seed, i, explainer) for i in rt.source.sample_ids[:n]],
                         dtype=torch.int64)
    group = zarr.open_group(str(path), mode="r")
    trained = np.asarray(group["attribution"][k, :n], dtype=np.float64)
    units = [(u, list(m)) for u, m in rt.sanity_units]
    out = np.full((1, n, len(units), 3), np.nan, dtype=np.float32)
    for depth, _unit, model in cascading_randomisation(rt.module, units, rt.config.seed):
        exp = rt.build_explainer(explainer, model)
        with rt.precision():
            maps = exp.attribute(rt.prepare_inputs(inputs), targets, batch_size=rt.explain_batch,
                                 seeds=seeds).float()
        out[0, :, depth - 1] = similarities(trained, maps.double().cpu().numpy())
    out[0, np.asarray(group["flagged"][k, :n], dtype=bool)] = np.nan  # non-finite model output
    storage.write_region(path, {"sanity": (("explainer", "sanity_sample", "depth", "similarity"), out)},
                         {"explainer": slice(k, k + 1)})
    fault_point("sanity.after_write")
    storage.set_record(path, "sanity", k, expected)
    return common.receipt("sanity", whole, False, t0, explainer=explainer)
