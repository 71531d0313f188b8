"""The load stage: labels, predictions, ground truth and previews of one shard."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zarr
from prefect.cache_policies import NO_CACHE

from attriflow.tasks import storage
from attriflow.tasks.datasets import ground_truth
from attriflow.tasks.runtime import (
    fault_point,
    fault_raise,
    get_runtime,
)
from attriflow.tasks.stages import common
from attriflow.tasks.stages.common import shard_task, store_path
from attriflow.tasks.storage import Shard


def expected_record(rt: Any, keys: Sequence[str]) -> int:
    """The provenance digest of a finished load shard holding the samples ``keys``: their
    keys (names, file contents, labels and objects), the preprocessing, the model and the
    device. Boxes of several classes (files with annotations): the ground truth is the
    union of the explained class's boxes, so it also depends on the target."""
    objects = () if getattr(rt.source, "objects", None) is None else (rt.config.explain.target,)
    return storage.digest64("load", common.keys_digest(keys), rt.source.preprocess.to_json(), list(rt.source.size),
                            rt.model.digest, rt.device.type, *objects)


def candidates(rt: Any, view: common.ShardView) -> list[int]:
    """The load records that make ``view``'s shard done (see ``ShardView.key_sets``)."""
    return [expected_record(rt, keys) for keys in view.key_sets]


@shard_task(name="load-shard", cache_policy=NO_CACHE, task_run_name="load-{shard.index}")
def load_shard(config_json: str, run_dir: str, shard: Shard) -> dict[str, Any]:
    """Write labels, predictions, probabilities, ground truth and previews of one shard's
    configured samples."""
    t0 = time.perf_counter()
    rt = get_runtime(config_json)
    started = time.perf_counter()  # the task's own work (the runtime is built once per worker)
    path = store_path(run_dir)
    view = common.shard_view(rt, path, shard)
    expected = candidates(rt, view)
    if common.accepted(storage.get_record(path, "load", shard.index), expected):
        return common.receipt("load", shard, True, t0)
    fault_raise(run_dir, f"load-{shard.index}")
    batch = rt.source.load_at(view.positions)
    preds, probs, finite = [], [], []
    step = rt.batch_size()
    with torch.inference_mode():
        for s in range(0, len(batch.images), step):
            x = rt.model.normalize(torch.from_numpy(batch.images[s : s + step]).to(rt.device))
            logits = rt.module(x).float()
            p = torch.softmax(logits, dim=1)
            conf, cls = p.max(dim=1)
            preds.append(cls.cpu().numpy())
            probs.append(conf.cpu().numpy())
            finite.append(torch.isfinite(logits).all(dim=1).cpu().numpy())
    region = {"sample": slice(shard.start, shard.stop)}
    variables: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
        "label": (("sample",), batch.labels.astype(np.int64)),
        "prediction": (("sample",), np.concatenate(preds).astype(np.int64)),
        "probability": (("sample",), np.concatenate(probs).astype(np.float32)),
        "finite_output": (("sample",), np.concatenate(finite).astype(bool)),
    }
    masks, boxes = batch.masks, batch.boxes
    if batch.objects is not None:
        explained = variables["prediction" if rt.config.explain.target == "prediction" else "label"][1]
        masks, boxes = ground_truth(batch.objects, explained, rt.source.size)
    if masks is not None:
        variables["gt_mask"] = (("sample", "y", "x"), masks.astype(bool))
    if boxes is not None:
        variables["gt_box"] = (("sample", "corner"), boxes.astype(np.int64))
    storage.write_region(path, variables, region, rows=view.rows_array())
    group = zarr.open_group(str(path), mode="r")
    if "preview" in group and shard.start < group["preview"].shape[0]:
        stop = min(shard.stop, group["preview"].shape[0])
        rows = [i for i, r in enumerate(view.rows) if shard.start + r < stop]
        if len(rows) == stop - shard.start:  # previews are whole (the first stored samples are configured)
            thumbs = np.round(batch.images[rows].transpose(0, 2, 3, 1) * 255).astype(np.uint8)
            storage.write_region(path, {"preview": (("preview", "y", "x", "rgb"), thumbs)},
                                 {"preview": slice(shard.start, stop)})
    common.write_seconds(path, "load", started, shard.index)
    fault_point("load.after_write")
    storage.set_record(path, "load", shard.index, expected[-1])
    return common.receipt("load", shard, False, t0)
