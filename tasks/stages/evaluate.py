"""The evaluate stage: faithfulness, localisation and complexity scores of one explainer's maps."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zarr
from prefect.cache_policies import NO_CACHE

from attriflow.analysis.metrics import METRICS_VERSION
from attriflow.analysis.metrics.complexity import gini
from attriflow.analysis.metrics.faithfulness import auc, deletion_insertion_curves, drop_increase
from attriflow.analysis.metrics.localisation import (
    bbox_accuracy,
    box_regions,
    default_tolerance,
    energy_pointing_game,
    pointing_game,
)
from attriflow.tasks import storage
from attriflow.tasks.runtime import (
    fault_point,
    fault_raise,
    get_runtime,
)
from attriflow.tasks.stages import common, explain
from attriflow.tasks.stages.common import (
    explainer_index,
    finished_record,
    shard_task,
    store_path,
    stored_targets,
)
from attriflow.tasks.storage import Shard


def expected_record(rt: Any, explain_record: int, keys: Sequence[str]) -> int:
    """The provenance digest of a finished evaluate shard of samples ``keys``: the explain
    record it scored, the evaluate settings and the metrics' version."""
    return storage.digest64("evaluate", explain_record, common.keys_digest(keys),
                            rt.config.evaluate.model_dump(mode="json"), METRICS_VERSION)


def candidates(rt: Any, explain_record: int, view: common.ShardView) -> list[int]:
    """The evaluate records that make ``view``'s shard done (see ``ShardView.key_sets``)."""
    return [expected_record(rt, explain_record, keys) for keys in view.key_sets]


@shard_task(name="evaluate-shard", cache_policy=NO_CACHE, task_run_name="evaluate-{explainer}-{shard.index}")
def evaluate_shard(config_json: str, run_dir: str, explainer: str, shard: Shard) -> dict[str, Any]:
    """Deletion and insertion curves, AUCs and the other metrics of one explainer's maps for
    one shard's configured samples."""
    t0 = time.perf_counter()
    rt = get_runtime(config_json)
    started = time.perf_counter()  # the task's own work (the runtime is built once per worker)
    path = store_path(run_dir)
    view = common.shard_view(rt, path, shard)
    k = explainer_index(rt, path, explainer)
    explain_record = finished_record(path, "explain", shard.index, k, f"evaluate {explainer} shard {shard.index}",
                                     explain.candidates(rt, explainer, view))
    ev = rt.config.evaluate
    expected = candidates(rt, explain_record, view)
    if common.accepted(storage.get_record(path, "evaluate", shard.index, k), expected):
        return common.receipt("evaluate", shard, True, t0, explainer=explainer)
    fault_raise(run_dir, f"evaluate-{explainer}-{shard.index}")
    batch = rt.source.load_at(view.positions)
    inputs = rt.model.normalize(torch.from_numpy(batch.images)).to(rt.device)
    group = zarr.open_group(str(path), mode="r")
    maps = torch.from_numpy(common.read_rows(path, "attribution", view, k).astype(np.float32)).to(rt.device)
    targets = stored_targets(path, rt, view).to(rt.device)
    curves = deletion_insertion_curves(
        rt.module, inputs, maps, targets, steps=ev.steps, batch_size=ev.batch_size,
        blur_size=ev.blur_kernel, blur_sigma=ev.blur_sigma,
    )
    n, names_m = len(maps), [str(m) for m in group["metric"][:]]  # the store's order (metrics are appended)
    scores = np.full((n, len(names_m)), np.nan, dtype=np.float32)
    scores[:, names_m.index("deletion_auc")] = auc(curves[:, 0]).numpy()
    scores[:, names_m.index("insertion_auc")] = auc(curves[:, 1]).numpy()
    for mode, suffix in (("soft", "soft"), ("top", "top")):
        drop, inc = drop_increase(rt.module, inputs, maps, targets, mode=mode, frac=ev.drop_top_fraction,
                                  batch_size=ev.batch_size)
        scores[:, names_m.index(f"average_drop_{suffix}")] = drop.numpy()
        scores[:, names_m.index(f"increase_{suffix}")] = inc.numpy()
    maps_np = maps.cpu().numpy()
    scores[:, names_m.index("gini")] = gini(maps_np)
    if "gt_mask" in group:
        masks = common.read_rows(path, "gt_mask", view).astype(bool)
        tol = ev.pointing_tolerance if ev.pointing_tolerance is not None else default_tolerance(*maps_np.shape[-2:])
        scores[:, names_m.index("pointing_game")] = pointing_game(maps_np, masks, tol)
    if "gt_box" in group:
        boxes = common.read_rows(path, "gt_box", view).astype(np.int64)
        regions = box_regions(boxes, *maps_np.shape[-2:])
        scores[:, names_m.index("energy_pointing_game")] = energy_pointing_game(maps_np, regions)
        acc, iou = bbox_accuracy(maps_np, regions)
        scores[:, names_m.index("bbox_accuracy")] = acc
        scores[:, names_m.index("iou")] = iou
    all_curves = np.full((n, len(names_m), group["curve"].shape[-1]), np.nan, dtype=np.float32)  # NaN-padded
    for c, name in enumerate(storage.CURVE_METRICS):
        all_curves[:, names_m.index(name), : curves.shape[-1]] = curves[:, c].numpy()
    flagged = common.read_rows(path, "flagged", view, k).astype(bool)
    scores[flagged] = np.nan  # a non-finite map or model output is reported, never averaged in
    all_curves[flagged] = np.nan
    region = {"explainer": slice(k, k + 1), "sample": slice(shard.start, shard.stop)}
    storage.write_region(
        path,
        {
            "score": (("explainer", "sample", "metric"), scores[None]),
            "curve": (("explainer", "sample", "metric", "point"), all_curves[None]),
        },
        region,
        rows=view.rows_array(),
    )
    common.write_seconds(path, "evaluate", started, k, shard.index)
    fault_point("evaluate.after_write")
    storage.set_record(path, "evaluate", shard.index, expected[-1], k)
    return common.receipt("evaluate", shard, False, t0, explainer=explainer)
