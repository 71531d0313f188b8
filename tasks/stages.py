"""The Prefect tasks of a run: prepare, then load / explain / evaluate one shard each, then report.

Tasks exchange references only (the config JSON, the run directory, a shard range) and
return small JSON receipts. The run store is the source of truth: a task first compares
the stored completion record of its (stage, explainer, shard) with the provenance digest
it would write, and returns at once when they are equal. Prefect's result cache is not
used (``NO_CACHE``): it cannot see library code and would only duplicate the records.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import zarr
from prefect import task
from prefect.cache_policies import NO_CACHE

from analysis.metrics import METRICS_VERSION
from analysis.metrics.complexity import gini
from analysis.metrics.faithfulness import auc, deletion_insertion_curves, drop_increase, pixels_per_step
from analysis.metrics.localisation import (
    bbox_accuracy,
    box_regions,
    default_tolerance,
    energy_pointing_game,
    pointing_game,
)
from analysis.report import render_markdown
from explainers.base import TAXONOMY, Family
from tasks import storage
from tasks.datasets import ground_truth
from tasks.runtime import (
    array_digest,
    derive_seed,
    fault_point,
    fault_raise,
    get_runtime,
    git_commit,
    package_versions,
)
from tasks.storage import Shard, StoreLayout


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


def _layout(config_json: str) -> StoreLayout:
    rt = get_runtime(config_json)
    cfg = rt.config
    h, w = rt.source.size
    entries = cfg.explain.explainers
    n_points = -(-(h * w) // pixels_per_step(h * w, cfg.evaluate.steps)) + 1
    return StoreLayout(
        sample_ids=rt.source.sample_ids,
        sample_names=rt.source.sample_names,
        height=h,
        width=w,
        shard_size=cfg.shard_size,
        explainers=tuple(e.name for e in entries),
        families=tuple(str(rt.explainers[e.name].spec.family) for e in entries),
        methods=tuple(e.method for e in entries),
        has_mask=rt.source.has_mask,
        has_box=rt.source.has_box,
        n_points=n_points,
        neuron_layers=rt.neuron_layers,
        n_previews=min(max(cfg.report.grid_samples, cfg.neurons.box_samples if rt.neuron_layers else 0),
                       len(rt.source)),
        sanity_units=tuple(u for u, _ in rt.sanity_units),
        n_sanity=min(cfg.sanity.samples, len(rt.source)) if rt.sanity_units else 0,
    )


def _manifest(config_json: str, layout: StoreLayout) -> dict[str, Any]:
    rt = get_runtime(config_json)
    cfg = rt.config
    return {
        "name": cfg.name,
        "config": json.loads(cfg.canonical_json()),
        "config_hash": cfg.digest(),
        "seed": cfg.seed,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "model": rt.model.description,
        "model_digest": rt.model.digest,
        "data": rt.source.description,
        "classes": list(rt.class_names),
        "preprocess": None if cfg.data.kind == "embedded" else rt.source.preprocess.to_json(),
        "boxes_dropped": rt.source.boxes_dropped,
        "boxes_clipped": rt.source.boxes_clipped,
        "device": rt.device.type,
        "explainers": {
            name: {"method": e.spec.name, "family": str(e.spec.family), "taxonomy": e.spec.taxonomy,
                   "params": e.params(), "version": e.spec.version, "cost": e.cost()}
            for name, e in rt.explainers.items()
        },
        "skipped": rt.source.skipped,
        "layout": layout.key(),
        "taxonomy": [[str(f), TAXONOMY[f]] for f in Family],  # a list: the order is the taxonomy's
    }


@shard_task(name="prepare-run", cache_policy=NO_CACHE)
def prepare_run(config_json: str, run_dir: str) -> dict[str, Any]:
    """Create (or check and reuse) the store and write the manifest.

    Parameters
    ----------
    config_json : str
        The validated run config as JSON.
    run_dir : str
        The run directory.

    Returns
    -------
    dict
        ``store`` path, ``shards`` as (index, start, stop) and ``explainers`` names.

    Raises
    ------
    storage.StoreLayoutError
        When the run directory holds a store of another layout.
    """
    rt = get_runtime(config_json)
    layout = _layout(config_json)
    manifest = _manifest(config_json, layout)
    attrs = {"manifest": json.dumps(manifest, sort_keys=True), "layout": json.dumps(layout.key(), sort_keys=True)}
    params = [json.dumps(rt.explainers[n].params(), sort_keys=True) for n in layout.explainers]
    pointer = Path(run_dir) / STORE_POINTER
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if rt.config.store:
        if not pointer.exists() or pointer.read_text().strip() != rt.config.store:
            pointer.write_text(rt.config.store + "\n")
    elif pointer.exists():
        pointer.unlink()
    path = store_path(run_dir)
    if storage.exists(path):
        old = storage.read_layout_key(path)
        if old != layout.key():
            diff = sorted(k for k in set(old) | set(layout.key()) if old.get(k) != layout.key().get(k))
            raise storage.StoreLayoutError(
                f"{str(path)!r} was created with a different layout ({', '.join(diff)} differ); "
                "finished shards cannot be reused: choose another --run-dir"
            )
        storage.set_params(path, params)
        storage.set_attrs(path, attrs)
    else:
        storage.init_store(path, layout, params, attrs)
    (Path(run_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shards = storage.plan_shards(layout.n_samples, layout.shard_size)
    return {
        "store": str(path),
        "shards": [(s.index, s.start, s.stop) for s in shards],
        "explainers": list(layout.explainers),
    }


def _receipt(stage: str, shard: Shard, skipped: bool, t0: float, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "shard": shard.index, "skipped": skipped,
            "seconds": round(time.perf_counter() - t0, 3), **extra}


@shard_task(name="load-shard", cache_policy=NO_CACHE, task_run_name="load-{shard.index}")
def load_shard(config_json: str, run_dir: str, shard: Shard) -> dict[str, Any]:
    """Write labels, predictions, probabilities and ground truth of one shard."""
    t0 = time.perf_counter()
    rt = get_runtime(config_json)
    path = store_path(run_dir)
    batch = rt.source.load(shard.start, shard.stop)
    # boxes of several classes (files with annotations): the ground truth is the union of the
    # explained class's boxes, so it depends on the target and, for predictions, on the model
    objects = () if batch.objects is None else (json.dumps(batch.objects, default=int), rt.config.explain.target)
    expected = storage.digest64(
        "load", array_digest(batch.images, batch.labels, batch.masks, batch.boxes),
        rt.model.digest, rt.device.type, *objects,
    )
    if storage.get_record(path, "load", shard.index) == expected:
        return _receipt("load", shard, True, t0)
    fault_raise(run_dir, f"load-{shard.index}")
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
    storage.write_region(path, variables, region)
    group = zarr.open_group(str(path), mode="r")
    if "preview" in group and shard.start < group["preview"].shape[0]:
        stop = min(shard.stop, group["preview"].shape[0])
        thumbs = np.round(batch.images[: stop - shard.start].transpose(0, 2, 3, 1) * 255).astype(np.uint8)
        storage.write_region(path, {"preview": (("preview", "y", "x", "rgb"), thumbs)},
                             {"preview": slice(shard.start, stop)})
    fault_point("load.after_write")
    storage.set_record(path, "load", shard.index, expected)
    return _receipt("load", shard, False, t0)


def _targets(path: Path, rt: Any, shard: Shard) -> torch.Tensor:
    group = zarr.open_group(str(path), mode="r")
    name = "prediction" if rt.config.explain.target == "prediction" else "label"
    return torch.from_numpy(np.asarray(group[name][shard.start : shard.stop], dtype=np.int64))


def _numerics(rt: Any) -> tuple[Any, ...]:
    """The numeric settings that enter a map's provenance (fp32 row-major adds nothing, so
    stores made before these options keep their records)."""
    e = rt.config.explain
    return () if (e.precision, e.channels_last) == ("fp32", False) else (e.precision, e.channels_last)


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


@shard_task(name="explain-shard", cache_policy=NO_CACHE, task_run_name="explain-{explainer}-{shard.index}")
def explain_shard(config_json: str, run_dir: str, explainer: str, shard: Shard) -> dict[str, Any]:
    """Compute and store one explainer's attributions for one shard."""
    t0 = time.perf_counter()
    rt = get_runtime(config_json)
    path = store_path(run_dir)
    names = [e.name for e in rt.config.explain.explainers]
    k = names.index(explainer)
    exp = rt.explainers[explainer]
    load_record = storage.get_record(path, "load", shard.index)
    if load_record == 0:
        raise RuntimeError(f"explain {explainer} shard {shard.index}: its load shard is not done")
    expected = storage.digest64(
        "explain", load_record, exp.digest(), rt.config.seed, rt.config.explain.target,
        *_numerics(rt),
    )
    if storage.get_record(path, "explain", shard.index, k) == expected:
        return _receipt("explain", shard, True, t0, explainer=explainer)
    fault_raise(run_dir, f"explain-{explainer}-{shard.index}")
    batch = rt.source.load(shard.start, shard.stop)
    inputs = rt.model.normalize(torch.from_numpy(batch.images)).to(rt.device)
    targets = _targets(path, rt, shard).to(rt.device)
    ids = rt.source.sample_ids[shard.start : shard.stop]
    seeds = torch.tensor([derive_seed(rt.config.seed, i, explainer) for i in ids], dtype=torch.int64)
    _sync(rt.device)
    started = time.perf_counter()
    with rt.precision():
        maps = exp.attribute(rt.prepare_inputs(inputs), targets, batch_size=rt.explain_batch,
                             seeds=seeds).float()
    _sync(rt.device)
    seconds = np.array([[time.perf_counter() - started]])
    forward, backward = _passes(exp, len(ids))
    maps_np = maps.cpu().numpy()
    group = zarr.open_group(str(path), mode="r")
    finite_output = np.asarray(group["finite_output"][shard.start : shard.stop], dtype=bool)
    flagged = ~np.isfinite(maps_np).reshape(len(maps_np), -1).all(axis=1) | ~finite_output
    storage.write_region(
        path,
        {"attribution": (("explainer", "sample", "y", "x"), maps_np[None]),
         "flagged": (("explainer", "sample"), flagged[None]),
         "forward_passes": (("explainer", "sample"), forward[None]),
         "backward_passes": (("explainer", "sample"), backward[None])},
        {"explainer": slice(k, k + 1), "sample": slice(shard.start, shard.stop)},
    )
    storage.write_region(path, {"explain_seconds": (("explainer", "shard"), seconds)},
                         {"explainer": slice(k, k + 1), "shard": slice(shard.index, shard.index + 1)})
    fault_point("explain.after_write")
    storage.set_record(path, "explain", shard.index, expected, k)
    fault_point("explain.after_record")
    return _receipt("explain", shard, False, t0, explainer=explainer)


@shard_task(name="evaluate-shard", cache_policy=NO_CACHE, task_run_name="evaluate-{explainer}-{shard.index}")
def evaluate_shard(config_json: str, run_dir: str, explainer: str, shard: Shard) -> dict[str, Any]:
    """Deletion and insertion curves and AUCs of one explainer's maps for one shard."""
    t0 = time.perf_counter()
    rt = get_runtime(config_json)
    path = store_path(run_dir)
    names = [e.name for e in rt.config.explain.explainers]
    k = names.index(explainer)
    explain_record = storage.get_record(path, "explain", shard.index, k)
    if explain_record == 0:
        raise RuntimeError(f"evaluate {explainer} shard {shard.index}: its explain shard is not done")
    ev = rt.config.evaluate
    expected = storage.digest64("evaluate", explain_record, ev.model_dump(mode="json"), METRICS_VERSION)
    if storage.get_record(path, "evaluate", shard.index, k) == expected:
        return _receipt("evaluate", shard, True, t0, explainer=explainer)
    fault_raise(run_dir, f"evaluate-{explainer}-{shard.index}")
    batch = rt.source.load(shard.start, shard.stop)
    inputs = rt.model.normalize(torch.from_numpy(batch.images)).to(rt.device)
    group = zarr.open_group(str(path), mode="r")
    maps = torch.from_numpy(np.asarray(group["attribution"][k, shard.start : shard.stop])).to(rt.device)
    targets = _targets(path, rt, shard).to(rt.device)
    curves = deletion_insertion_curves(
        rt.module, inputs, maps, targets, steps=ev.steps, batch_size=ev.batch_size,
        blur_size=ev.blur_kernel, blur_sigma=ev.blur_sigma,
    )
    n, names_m = len(maps), list(storage.METRICS)
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
        masks = np.asarray(group["gt_mask"][shard.start : shard.stop], dtype=bool)
        tol = ev.pointing_tolerance if ev.pointing_tolerance is not None else default_tolerance(*maps_np.shape[-2:])
        scores[:, names_m.index("pointing_game")] = pointing_game(maps_np, masks, tol)
    if "gt_box" in group:
        boxes = np.asarray(group["gt_box"][shard.start : shard.stop], dtype=np.int64)
        regions = box_regions(boxes, *maps_np.shape[-2:])
        scores[:, names_m.index("energy_pointing_game")] = energy_pointing_game(maps_np, regions)
        acc, iou = bbox_accuracy(maps_np, regions)
        scores[:, names_m.index("bbox_accuracy")] = acc
        scores[:, names_m.index("iou")] = iou
    all_curves = np.full((n, len(names_m), curves.shape[-1]), np.nan, dtype=np.float32)
    for c, name in enumerate(storage.CURVE_METRICS):
        all_curves[:, names_m.index(name)] = curves[:, c].numpy()
    flagged = np.asarray(group["flagged"][k, shard.start : shard.stop], dtype=bool)
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
    )
    fault_point("evaluate.after_write")
    storage.set_record(path, "evaluate", shard.index, expected, k)
    return _receipt("evaluate", shard, False, t0, explainer=explainer)


def _unit_boxes(model: torch.nn.Module, layers: list[str], image: torch.Tensor,
                units: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """Box (y0, x0, y1, x1) of the input support of the backward signal from each selected
    unit's strongest activation on the clean image (``units``: (layer index, channel))."""
    from explainers._hooks import capture_outputs

    boxes: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    if not units:
        return boxes
    with capture_outputs(model, layers) as acts, torch.enable_grad():
        x = image[None].detach().clone().requires_grad_(True)
        model(x)
        for li, ch in units:
            a = acts[layers[li]][0, ch]
            pos = int(torch.argmax(a))
            (g,) = torch.autograd.grad(a.flatten()[pos], x, retain_graph=True)
            ys, xs = torch.nonzero(g[0].abs().sum(0) > 0, as_tuple=True)
            if len(ys):
                boxes[(li, ch)] = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    return boxes


@shard_task(name="select-neurons", cache_policy=NO_CACHE, task_run_name="neurons-{shard.index}")
def select_neurons(config_json: str, run_dir: str, shard: Shard) -> dict[str, Any]:
    """Neuron-selection scores, selections, overlaps and unit boxes of one shard."""
    from analysis.neurons import overlap, select_top_k
    from tasks.neurons import score_image

    t0 = time.perf_counter()
    rt = get_runtime(config_json)
    path = store_path(run_dir)
    nc = rt.config.neurons
    load_record = storage.get_record(path, "load", shard.index)
    if load_record == 0:
        raise RuntimeError(f"neurons shard {shard.index}: its load shard is not done")
    expected = storage.digest64("neurons", load_record, nc.model_dump(mode="json"), rt.config.seed,
                                [list(x) for x in rt.neuron_layers])
    if storage.get_record(path, "neurons", shard.index) == expected:
        return _receipt("neurons", shard, True, t0)
    batch = rt.source.load(shard.start, shard.stop)
    inputs = rt.model.normalize(torch.from_numpy(batch.images)).to(rt.device)
    targets = _targets(path, rt, shard)
    layers = [n for n, _ in rt.neuron_layers]
    offsets = np.cumsum([0] + [c for _, c in rt.neuron_layers])
    n, u = len(inputs), int(offsets[-1])
    corr = np.full((n, u), np.nan, np.float32)
    prec = np.full((n, u), np.nan, np.float32)
    sel_c = np.zeros((n, u), bool)
    sel_p = np.zeros((n, u), bool)
    ov_code = np.full((n, len(layers)), np.nan, np.float32)
    ov_jac = np.full((n, len(layers)), np.nan, np.float32)
    boxes = np.full((n, u, 4), -1, np.int64)
    tot_code = np.full(n, np.nan, np.float32)
    tot_jac = np.full(n, np.nan, np.float32)
    for i, sample_id in enumerate(rt.source.sample_ids[shard.start : shard.stop]):
        gen = torch.Generator().manual_seed(derive_seed(rt.config.seed, sample_id, "neurons"))
        scores = score_image(rt.module, layers, inputs[i], int(targets[i]), copies=nc.copies,
                             noise=nc.noise, mode=nc.mode, min_activation=nc.min_activation,
                             batch_size=nc.batch_size, generator=gen)
        chosen: list[tuple[int, int]] = []
        for li, name in enumerate(layers):
            lo, hi = offsets[li], offsets[li + 1]
            corr[i, lo:hi] = scores.correlation[name]
            prec[i, lo:hi] = scores.precision[name]
            sel_c[i, lo:hi] = select_top_k(scores.correlation[name], nc.top_k)
            sel_p[i, lo:hi] = select_top_k(scores.precision[name], nc.top_k)
            ov_code[i, li], ov_jac[i, li] = overlap(sel_c[i, lo:hi], sel_p[i, lo:hi])
            chosen += [(li, int(c)) for c in np.nonzero(sel_c[i, lo:hi] | sel_p[i, lo:hi])[0]]
        tot_code[i], tot_jac[i] = overlap(sel_c[i], sel_p[i])  # all layers' units together
        if shard.start + i < nc.box_samples:
            for (li, ch), box in _unit_boxes(rt.module, layers, inputs[i], chosen).items():
                boxes[i, offsets[li] + ch] = box
    region = {"sample": slice(shard.start, shard.stop)}
    storage.write_region(path, {
        "neuron_correlation": (("sample", "unit"), corr),
        "neuron_precision": (("sample", "unit"), prec),
        "selected_correlation": (("sample", "unit"), sel_c),
        "selected_precision": (("sample", "unit"), sel_p),
        "overlap_code": (("sample", "layer"), ov_code),
        "overlap_jaccard": (("sample", "layer"), ov_jac),
        "overlap_code_total": (("sample",), tot_code),
        "overlap_jaccard_total": (("sample",), tot_jac),
        "unit_box": (("sample", "unit", "corner"), boxes),
    }, region)
    fault_point("neurons.after_write")
    storage.set_record(path, "neurons", shard.index, expected)
    return _receipt("neurons", shard, False, t0)


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
    names = [e.name for e in rt.config.explain.explainers]
    k = names.index(explainer)
    n = min(rt.config.sanity.samples, len(rt.source))
    shards = [s for s in storage.plan_shards(len(rt.source), rt.config.shard_size) if s.start < n]
    records = [storage.get_record(path, "explain", s.index, k) for s in shards]
    if 0 in records:
        raise RuntimeError(f"sanity {explainer}: its explain shards {[s.index for s in shards]} are not all done")
    expected = storage.digest64("sanity", records, rt.config.sanity.model_dump(mode="json"), rt.config.seed,
                                METRICS_VERSION,
                                [[u, list(m)] for u, m in rt.sanity_units])
    whole = Shard(0, 0, n)
    if storage.get_record(path, "sanity", k) == expected:
        return _receipt("sanity", whole, True, t0, explainer=explainer)
    batch = rt.source.load(0, n)
    inputs = rt.model.normalize(torch.from_numpy(batch.images)).to(rt.device)
    targets = _targets(path, rt, whole).to(rt.device)
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
    return _receipt("sanity", whole, False, t0, explainer=explainer)


def artifact_key(name: str, suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) stable for a run name."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"
    return f"{slug}-{suffix}"


@shard_task(name="write-report", cache_policy=NO_CACHE)
def write_report(run_dir: str) -> str:
    """Regenerate ``RUN_DIR/report/`` from the store alone and publish the summary as
    Prefect artifacts (markdown and table) under stable keys ``<run name>-summary`` and
    ``<run name>-metrics``, so the Prefect UI shows it."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from analysis.report import metric_summary, wide_table

    path = render_report(run_dir)
    ds = storage.open_dataset(store_path(run_dir))
    name = json.loads(ds.attrs["manifest"])["name"]
    create_markdown_artifact(path.read_text(), key=artifact_key(name, "summary"),
                             description=f"attriflow report of {run_dir}")
    rows = wide_table(metric_summary(ds)).reset_index().to_dict(orient="records")
    table = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()} for r in rows]
    create_table_artifact(table, key=artifact_key(name, "metrics"),
                          description="mean score per explainer and family sub-total, in taxonomy order")
    return str(path)


def _save(fig: Any, out: Path, name: str, caption: str) -> Any:
    """Write a figure as PNG and SVG; return it encoded for the HTML page."""
    import io

    import matplotlib.pyplot as plt

    from analysis.html import Figure

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    (out / f"{name}.png").write_bytes(buf.getvalue())
    fig.savefig(out / f"{name}.svg")
    plt.close(fig)
    return Figure(name, caption, buf.getvalue())


def render_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report/`` from the store alone: ``index.html`` (self-contained),
    ``summary.md`` and every figure as PNG and SVG; returns the summary path."""
    from analysis import plots
    from analysis.html import render_run_html
    from analysis.report import ReportOptions, manifest_of

    ds = storage.open_dataset(store_path(run_dir))
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    options = ReportOptions.from_manifest(manifest_of(ds))
    figures: dict[str, Any] = {}
    figures["distributions"] = _save(plots.plot_metric_distributions(ds), out, "metric_distributions",
                                     "Per-sample metric distributions, explainers in taxonomy order, coloured by family")
    figures["grid"] = _save(plots.plot_map_grid(ds, options.grid_samples), out, "map_grid",
                            "Maps of the first samples (columns in taxonomy order), ground truth outlined")
    figures["cost"] = _save(plots.plot_cost(ds), out, "cost", "Wall time and forward passes per image")
    family_figures = {
        family: _save(plots.plot_curves(ds, [family]), out, f"curves_{family}",
                      f"Deletion and insertion curves of the {family} family")
        for family in plots.family_order(ds)
    }
    sanity = plots.plot_sanity(ds, options.threshold)
    if sanity is not None:
        figures["sanity"] = _save(sanity, out, "sanity", "Cascading randomisation: similarity against depth")
    neurons_done = storage.read_records(store_path(run_dir)).get("neurons")
    if "neuron_correlation" in ds and neurons_done is not None and (neurons_done != 0).all():
        figures["neuron_scatter"] = _save(plots.plot_neuron_scatter(ds), out, "neuron_scatter",
                                          "Neuron selection: |correlation| against precision per channel")
        if "preview" in ds:
            figures["neuron_boxes"] = _save(plots.plot_neuron_boxes(ds), out, "neuron_boxes",
                                            "Receptive boxes of the selected neurons")
    fault_point("report.after_figures")
    (out / "index.html").write_text(render_run_html(ds, figures, family_figures, plots.family_palette(ds)))
    listed = [(f"{f.name}.png", f.caption) for f in [*figures.values(), *family_figures.values()]]
    summary = out / "summary.md"
    summary.write_text(render_markdown(ds, listed))
    return summary


def render_comparison(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Several runs side by side into ``out`` (``index.html``, ``summary.md``, the comparison
    figure as PNG and SVG); returns the HTML path. Labels are the run names, made unique."""
    from analysis import plots
    from analysis.html import render_comparison_html
    from analysis.report import manifest_of, markdown_metric_table, metric_summary

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    for run_dir in run_dirs:
        ds = storage.open_dataset(store_path(run_dir))
        label = str(manifest_of(ds).get("name", Path(run_dir).name))
        if label in runs:
            label = f"{label} ({Path(run_dir).name})"
        while label in runs:
            label += "'"
        runs[label] = ds
    summaries = {label: metric_summary(ds) for label, ds in runs.items()}
    figure = _save(plots.plot_comparison(summaries), out, "comparison", "Mean and bootstrap interval per run")
    page = out / "index.html"
    page.write_text(render_comparison_html(runs, summaries, figure))
    lines = [f"# attriflow comparison: {' vs '.join(f'`{x}`' for x in runs)}", ""]
    for label, run_dir in zip(runs, run_dirs):
        lines += [f"## `{label}` ({run_dir})", "", *markdown_metric_table(summaries[label]), ""]
    lines += ["![comparison](comparison.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return page
