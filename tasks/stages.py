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
from typing import Any

import numpy as np
import torch
import zarr
from prefect import task
from prefect.cache_policies import NO_CACHE

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
from tasks import storage
from tasks.runtime import (
    array_digest,
    derive_seed,
    fault_point,
    get_runtime,
    git_commit,
    package_versions,
)
from tasks.storage import Shard, StoreLayout


def store_path(run_dir: str | Path) -> Path:
    """``RUN_DIR/store.zarr``."""
    return Path(run_dir) / storage.STORE_NAME


def _layout(config_json: str) -> StoreLayout:
    rt = get_runtime(config_json)
    cfg = rt.config
    s = rt.source.image_size
    entries = cfg.explain.explainers
    n_points = -(-(s * s) // pixels_per_step(s * s, cfg.evaluate.steps)) + 1
    return StoreLayout(
        sample_ids=rt.source.sample_ids,
        sample_names=rt.source.sample_names,
        height=s,
        width=s,
        shard_size=cfg.shard_size,
        explainers=tuple(e.name for e in entries),
        families=tuple(str(rt.explainers[e.name].spec.family) for e in entries),
        methods=tuple(e.method for e in entries),
        has_mask=rt.source.has_mask,
        has_box=rt.source.has_box,
        n_points=n_points,
        neuron_layers=rt.neuron_layers,
        n_previews=min(cfg.neurons.box_samples, len(rt.source)) if rt.neuron_layers else 0,
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
        "classes": list(rt.source.classes),
        "device": rt.device.type,
        "explainers": {
            name: {"method": e.spec.name, "family": str(e.spec.family), "taxonomy": e.spec.taxonomy,
                   "params": e.params(), "version": e.spec.version, "cost": e.cost()}
            for name, e in rt.explainers.items()
        },
        "skipped": rt.source.skipped,
        "layout": layout.key(),
    }


@task(name="prepare-run", cache_policy=NO_CACHE)
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
    path = store_path(run_dir)
    manifest = _manifest(config_json, layout)
    attrs = {"manifest": json.dumps(manifest, sort_keys=True), "layout": json.dumps(layout.key(), sort_keys=True)}
    params = [json.dumps(rt.explainers[n].params(), sort_keys=True) for n in layout.explainers]
    if path.exists():
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


@task(name="load-shard", cache_policy=NO_CACHE, task_run_name="load-{shard.index}")
def load_shard(config_json: str, run_dir: str, shard: Shard) -> dict[str, Any]:
    """Write labels, predictions, probabilities and ground truth of one shard."""
    t0 = time.perf_counter()
    rt = get_runtime(config_json)
    path = store_path(run_dir)
    batch = rt.source.load(shard.start, shard.stop)
    expected = storage.digest64(
        "load", array_digest(batch.images, batch.labels, batch.masks, batch.boxes),
        rt.model.digest, rt.device.type,
    )
    if storage.get_record(path, "load", shard.index) == expected:
        return _receipt("load", shard, True, t0)
    preds, probs = [], []
    with torch.inference_mode():
        for s in range(0, len(batch.images), rt.config.explain.batch_size):
            x = rt.model.normalize(torch.from_numpy(batch.images[s : s + rt.config.explain.batch_size]).to(rt.device))
            p = torch.softmax(rt.module(x).float(), dim=1)
            conf, cls = p.max(dim=1)
            preds.append(cls.cpu().numpy())
            probs.append(conf.cpu().numpy())
    region = {"sample": slice(shard.start, shard.stop)}
    variables: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
        "label": (("sample",), batch.labels.astype(np.int64)),
        "prediction": (("sample",), np.concatenate(preds).astype(np.int64)),
        "probability": (("sample",), np.concatenate(probs).astype(np.float32)),
    }
    if batch.masks is not None:
        variables["gt_mask"] = (("sample", "y", "x"), batch.masks.astype(bool))
    if batch.boxes is not None:
        variables["gt_box"] = (("sample", "corner"), batch.boxes.astype(np.int64))
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


@task(name="explain-shard", cache_policy=NO_CACHE, task_run_name="explain-{explainer}-{shard.index}")
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
        "explain", load_record, exp.digest(), rt.config.seed, rt.config.explain.target
    )
    if storage.get_record(path, "explain", shard.index, k) == expected:
        return _receipt("explain", shard, True, t0, explainer=explainer)
    batch = rt.source.load(shard.start, shard.stop)
    inputs = rt.model.normalize(torch.from_numpy(batch.images)).to(rt.device)
    targets = _targets(path, rt, shard).to(rt.device)
    ids = rt.source.sample_ids[shard.start : shard.stop]
    seeds = torch.tensor([derive_seed(rt.config.seed, i, explainer) for i in ids], dtype=torch.int64)
    maps = exp.attribute(inputs, targets, batch_size=rt.config.explain.batch_size, seeds=seeds)
    if exp.last_forward_passes is not None:
        passes = exp.last_forward_passes.numpy().astype(np.int64)
    else:
        static = exp.cost()["forward"]
        passes = np.full(len(ids), static if isinstance(static, int) else -1, dtype=np.int64)
    storage.write_region(
        path,
        {"attribution": (("explainer", "sample", "y", "x"), maps.cpu().numpy()[None]),
         "forward_passes": (("explainer", "sample"), passes[None])},
        {"explainer": slice(k, k + 1), "sample": slice(shard.start, shard.stop)},
    )
    fault_point("explain.after_write")
    storage.set_record(path, "explain", shard.index, expected, k)
    fault_point("explain.after_record")
    return _receipt("explain", shard, False, t0, explainer=explainer)


@task(name="evaluate-shard", cache_policy=NO_CACHE, task_run_name="evaluate-{explainer}-{shard.index}")
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
    expected = storage.digest64("evaluate", explain_record, ev.model_dump(mode="json"))
    if storage.get_record(path, "evaluate", shard.index, k) == expected:
        return _receipt("evaluate", shard, True, t0, explainer=explainer)
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
        size = maps_np.shape[-1]
        tol = ev.pointing_tolerance if ev.pointing_tolerance is not None else default_tolerance(size)
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


@task(name="select-neurons", cache_policy=NO_CACHE, task_run_name="neurons-{shard.index}")
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


def artifact_key(name: str, suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) stable for a run name."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"
    return f"{slug}-{suffix}"


@task(name="write-report", cache_policy=NO_CACHE)
def write_report(run_dir: str) -> str:
    """Regenerate ``RUN_DIR/report/`` from the store alone and publish the summary as
    Prefect artifacts (markdown and table) under stable keys ``<run name>-summary`` and
    ``<run name>-metrics``, so the Prefect UI shows it."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from analysis.report import summary_table

    path = render_report(run_dir)
    ds = storage.open_dataset(store_path(run_dir))
    name = json.loads(ds.attrs["manifest"])["name"]
    create_markdown_artifact(path.read_text(), key=artifact_key(name, "summary"),
                             description=f"attriflow report of {run_dir}")
    rows = summary_table(ds).reset_index().to_dict(orient="records")
    table = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()} for r in rows]
    create_table_artifact(table, key=artifact_key(name, "metrics"),
                          description="mean score per explainer, grouped by family")
    return str(path)


def render_report(run_dir: str | Path) -> Path:
    """Write the report files of a run directory from its store; returns the summary path."""
    ds = storage.open_dataset(store_path(run_dir))
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    text = render_markdown(ds)
    neurons_done = storage.read_records(store_path(run_dir)).get("neurons")
    if "neuron_correlation" in ds and neurons_done is not None and (neurons_done != 0).all():
        import matplotlib.pyplot as plt

        from analysis.plots import plot_neuron_boxes, plot_neuron_scatter

        figures = [("neuron_scatter", plot_neuron_scatter(ds))]
        if "preview" in ds:
            figures.append(("neuron_boxes", plot_neuron_boxes(ds)))
        for name, fig in figures:
            fig.savefig(out / f"{name}.png", dpi=110)
            fig.savefig(out / f"{name}.svg")
            plt.close(fig)
            text += f"\n![{name.replace('_', ' ')}]({name}.png)\n"
    summary = out / "summary.md"
    summary.write_text(text)
    return summary
