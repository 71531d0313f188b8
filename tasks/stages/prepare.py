"""The prepare task: the store's layout and manifest, created or checked before any shard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.cache_policies import NO_CACHE

from analysis.metrics.faithfulness import pixels_per_step
from explainers.base import TAXONOMY, Family
from tasks import storage
from tasks.runtime import (
    get_runtime,
    git_commit,
    package_versions,
)
from tasks.stages.common import STORE_POINTER, shard_task, store_path
from tasks.storage import StoreLayout


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


def normalisation_source(m: Any) -> str:
    """Where a model's default mean and std come from (the report says it)."""
    if m.program or m.factory:
        return "ImageNet's, the default for a factory or program without model.mean / model.std"
    if m.arch.startswith("timm:"):
        return "timm's pretrained config"
    return "the reference CNN's training" if m.arch == "reference" else "ImageNet's (torchvision)"


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
        "normalisation": {"mean": list(rt.model.mean), "std": list(rt.model.std),
                          "source": "model.mean / model.std" if cfg.model.mean or cfg.model.std
                          else normalisation_source(cfg.model)},
        "ground_truth": bool(rt.source.has_box or rt.source.has_mask),
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
