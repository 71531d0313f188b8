"""The prepare task: the store's layout and manifest, created or checked before any shard."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import NO_CACHE

from attriflow.analysis.metrics.faithfulness import pixels_per_step
from attriflow.explainers.base import TAXONOMY, Family
from attriflow.tasks import storage
from attriflow.tasks.runtime import (
    get_runtime,
    git_commit,
    package_versions,
)
from attriflow.tasks.stages.common import STORE_POINTER, entry_key, shard_task, shard_views, store_path
from attriflow.tasks.stages.sanity import sanity_shards
from attriflow.tasks.storage import StoreLayout


@dataclass
class Target:
    """What a config makes of a store: the grown layout and the config's selection in it.

    Attributes
    ----------
    layout : StoreLayout
        The store's entries and samples after growth (the stored ones first, unchanged).
    active_order, sample_order : list of int
        Per stored entry / sample, its position in the config (-1: not used).
    new_entries, new_samples : int
        How many the config appends.
    recreated : list of str
        Features (neurons, preview, sanity) whose shape changes (their results are redone).
    """

    layout: StoreLayout
    active_order: list[int]
    sample_order: list[int]
    new_entries: int
    new_samples: int
    recreated: list[str]


def target(config_json: str, state: storage.StoreState | None) -> Target:
    """The layout a run of the config gives a store in ``state`` (None: a new store).

    Raises
    ------
    storage.StoreLayoutError
        When the store was written by an older schema, or its image size, shard size or
        ground truth differ from the config's.
    """
    rt = get_runtime(config_json)
    cfg = rt.config
    h, w = rt.source.size
    names = [e.name for e in cfg.explain.explainers]
    mine = [storage.Entry(entry_key(rt, n), n, str(rt.explainers[n].spec.family), rt.explainers[n].spec.name,
                          json.dumps(rt.explainers[n].params(), sort_keys=True)) for n in names]
    old_entries = list(state.entries) if state else []
    old_samples = list(state.sample_keys) if state else []
    stored = [storage.Entry(k, k.rsplit("@", 1)[0], "", "", "") for k in old_entries]
    entries = stored + [e for e in mine if e.key not in set(old_entries)]
    known = set(old_samples)
    src = rt.source
    fresh = [i for i, k in enumerate(src.sample_keys) if k not in known]
    n_points = -(-(h * w) // pixels_per_step(h * w, cfg.evaluate.steps)) + 1
    layout = StoreLayout(
        height=h, width=w, shard_size=cfg.shard_size, has_mask=src.has_mask, has_box=src.has_box,
        attribution_dtype=cfg.store.attribution_dtype, codec=cfg.store.codec,
        entries=tuple(entries),
        sample_ids=tuple([0] * len(old_samples) + [src.sample_ids[i] for i in fresh]),
        sample_names=tuple([""] * len(old_samples) + [src.sample_names[i] for i in fresh]),
        sample_keys=tuple(old_samples + [src.sample_keys[i] for i in fresh]),
        n_points=n_points,
        neuron_layers=rt.neuron_layers,
        n_previews=max(cfg.report.grid_samples, cfg.neurons.box_samples if rt.neuron_layers else 0),  # not capped
        # by the sample count, so that a dataset growing past it does not recreate the previews
        sanity_units=tuple(u for u, _ in rt.sanity_units),
        n_sanity=min(cfg.sanity.samples, len(src)) if rt.sanity_units else 0,
        metrics=tuple(state.metrics if state else []) + tuple(m for m in storage.METRICS
                                                              if not state or m not in state.metrics),
    )
    if state is not None:
        if state.schema < storage.SCHEMA_VERSION:
            raise storage.StoreLayoutError(
                f"the store in this run directory was written by an older attriflow (store schema {state.schema}; "
                f"this version writes schema {storage.SCHEMA_VERSION}, whose records identify samples by content and "
                "keep every explainer setting): run `attriflow migrate RUN_DIR` to convert it in place "
                "(its metadata is backed up; finished shards whose records still hold are kept), or choose another --run-dir")
        diff = sorted(k for k, v in layout.fixed().items() if state.fixed.get(k) != v)
        if diff:
            why = {"height": "data.image_size", "width": "data.image_size", "shard_size": "shard_size",
                   "has_mask": "the dataset's ground truth", "has_box": "the dataset's ground truth",
                   "attribution_dtype": "store.attribution_dtype", "codec": "store.codec"}
            raise storage.StoreLayoutError(
                f"the store was created with another {', '.join(dict.fromkeys(why[d] for d in diff))} "
                f"({', '.join(f'{d}: {state.fixed.get(d)} -> {layout.fixed()[d]}' for d in diff)}); a store can "
                "grow by explainers, settings and samples, not change these: choose another --run-dir")
    position = {e.key: i for i, e in enumerate(mine)}
    where = {k: i for i, k in enumerate(src.sample_keys)}
    return Target(
        layout=layout,
        active_order=[position.get(e.key, -1) for e in entries],
        sample_order=[where.get(k, -1) for k in layout.sample_keys],
        new_entries=len(entries) - len(old_entries),
        new_samples=len(fresh),
        recreated=[] if state is None else storage.changed_features(state.features, layout),
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
        "entries": {e.name: entry_key(rt, e.name) for e in cfg.explain.explainers},
        "skipped": rt.source.skipped,
        "layout": {**layout.fixed(), "features": layout.features()},
        "taxonomy": [[str(f), TAXONOMY[f]] for f in Family],  # a list: the order is the taxonomy's
    }


@shard_task(name="prepare-run", cache_policy=NO_CACHE)
def prepare_run(config_json: str, run_dir: str) -> dict[str, Any]:
    """Create the store, or grow the existing one for the config (new entries and samples
    appended, features reshaped), mark what the config uses, and write the manifest.

    Parameters
    ----------
    config_json : str
        The validated run config as JSON.
    run_dir : str
        The run directory.

    Returns
    -------
    dict
        ``store`` path, ``shards`` as (index, start, stop): the store shards holding the
        config's samples, ``explainers`` names and ``sanity_shards`` (the shards whose maps
        the sanity check re-explains).

    Raises
    ------
    storage.StoreLayoutError
        When the run directory holds a store that cannot grow into this config's (see
        :func:`target`).
    """
    rt = get_runtime(config_json)
    pointer = Path(run_dir) / STORE_POINTER
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    url = rt.config.store.url
    if url:
        if not pointer.exists() or pointer.read_text().strip() != url:
            pointer.write_text(url + "\n")
    elif pointer.exists():
        pointer.unlink()
    path = store_path(run_dir)
    storage.recover(path)
    state = storage.read_state(path) if storage.exists(path) else None
    goal = target(config_json, state)
    layout = goal.layout
    manifest = _manifest(config_json, layout)
    attrs = {"manifest": json.dumps(manifest, sort_keys=True)}
    if state is None:
        storage.init_store(path, layout, attrs)
    else:
        storage.grow_store(path, layout, state, attrs)
    storage.set_selection(path, goal.active_order, goal.sample_order)
    storage.set_attrs(path, attrs)
    (Path(run_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    views = shard_views(rt.source, layout.sample_keys, layout.shard_size)
    return {
        "store": str(path),
        "shards": [(v.shard.index, v.shard.start, v.shard.stop) for v in views],
        "explainers": [e.name for e in rt.config.explain.explainers],
        "sanity_shards": sanity_shards(rt, layout.sample_keys) if rt.config.sanity.enabled else [],
    }
