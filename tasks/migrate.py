"""Migrate a store written by attriflow's schema 2 (fixed layout) to schema 3 (growable).

Schema 2 stores identified samples by position and chained the records from a digest of the
decoded images; schema 3 identifies samples by key (name and content digest) and entries by
``name@digest``. The migration rebuilds the run from the config recorded in the store's
manifest, checks every stored record against the schema-2 formula for that config, and
rewrites the records that hold under the schema-3 formulas, so finished work stays finished;
a record that does not hold (an interrupted run's stale shard) is cleared and redone. Maps of
stochastic explainers of file datasets are redone too (schema 3 seeds file samples from their
name, not their position), and every neuron score (its perturbations are now drawn in
float32, ``analysis.neurons.NOISE_VERSION``). The metadata files are copied to
``RUN_DIR/store-v2-metadata/`` first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from attriflow.analysis.metrics import METRICS_VERSION
from attriflow.tasks import storage
from attriflow.tasks.runtime import array_digest, get_runtime
from attriflow.tasks.stages import common, evaluate, explain, load, sanity
from attriflow.tasks.stages.common import store_path


class MigrationError(RuntimeError):
    """The store cannot be migrated (not schema 2, or its data or model is gone)."""


def _v2_load(rt: Any, batch: Any) -> int:
    objects = () if batch.objects is None else (json.dumps(batch.objects, default=int), rt.config.explain.target)
    return storage.digest64("load", array_digest(batch.images, batch.labels, batch.masks, batch.boxes),
                            rt.model.digest, rt.device.type, *objects)


def migrate(run_dir: str | Path) -> dict[str, Any]:
    """Convert ``RUN_DIR``'s schema-2 store in place.

    Returns
    -------
    dict
        ``kept``: records carried over per stage; ``cleared``: records to redo per stage;
        ``backup``: the folder holding the old metadata; ``current``: True (and nothing
        else done) when the store already has this version's schema.

    Raises
    ------
    MigrationError
        When the store is not schema 2, or the recorded config's data or model cannot be
        opened (the message names the problem).
    """
    run_dir = Path(run_dir)
    path = store_path(run_dir)
    if not isinstance(path, Path):
        raise MigrationError(f"{path!r}: attriflow migrate needs a local store")
    ds = storage.open_dataset(path)
    schema = int(ds.attrs.get("schema_version", 1))
    if schema == storage.SCHEMA_VERSION:
        return {"kept": {}, "cleared": {}, "backup": None, "current": True}
    if schema != 2:
        raise MigrationError(f"{str(path)!r} has store schema {schema}; attriflow migrate converts schema 2")
    from attriflow.tasks.config import parse_config

    manifest = json.loads(ds.attrs["manifest"])
    cfg = parse_config(manifest["config"], f"{path}'s manifest")
    try:
        rt = get_runtime(cfg.model_dump_json())
    except Exception as err:  # noqa: BLE001  (the runtime's planning errors, named in the message)
        raise MigrationError(f"the run's recorded config cannot be opened again ({err}); its data and model "
                             "must be where they were to migrate") from err
    names = [str(x) for x in ds["explainer"].values]
    if names != [e.name for e in cfg.explain.explainers] or ds.sizes["sample"] != len(rt.source):
        raise MigrationError(f"{str(path)!r} does not match its recorded config (explainers or samples differ)")
    backup = run_dir / "store-v2-metadata"
    for meta in path.rglob("zarr.json"):
        dest = backup / meta.relative_to(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(meta, dest)
    old = storage.read_records(path)
    new = {stage: np.zeros_like(arr) for stage, arr in old.items()}
    files = getattr(rt.source, "objects", None) is not None or cfg.data.kind != "embedded"
    stochastic = [rt.explainers[n].spec.stochastic for n in names]
    shards = storage.plan_shards(len(rt.source), cfg.shard_size)
    views = common.shard_views(rt.source, rt.source.sample_keys, cfg.shard_size)
    v2_explain: dict[tuple[int, int], int] = {}
    for shard, view in zip(shards, views):
        s = shard.index
        v2_load = _v2_load(rt, rt.source.load(shard.start, shard.stop))
        if old["load"][s] == v2_load:
            new["load"][s] = load.expected_record(rt, view.full_keys)
        # neuron scores are not carried over: schema-2 stores drew their perturbations in
        # float64 (NOISE_VERSION 1), so their shards are scored again
        for k, name in enumerate(names):
            v2_exp = storage.digest64("explain", v2_load, rt.explainers[name].digest(), cfg.seed,
                                      cfg.explain.target, *common.numerics(rt))
            v2_explain[(k, s)] = v2_exp
            if old["explain"][k, s] != v2_exp or (files and stochastic[k]) or new["load"][s] == 0:
                continue
            new["explain"][k, s] = explain.expected_record(rt, name, view.full_keys)
            if old["evaluate"][k, s] == storage.digest64("evaluate", v2_exp, cfg.evaluate.model_dump(mode="json"),
                                                         METRICS_VERSION):
                new["evaluate"][k, s] = evaluate.expected_record(rt, int(new["explain"][k, s]), view.full_keys)
    if "sanity" in old:
        keys, _ = sanity.sanity_samples(rt, rt.source.sample_keys)
        first = sanity.sanity_shards(rt, rt.source.sample_keys)
        for k, _name in enumerate(names):
            v2 = storage.digest64("sanity", [v2_explain[(k, s)] for s in first], cfg.sanity.model_dump(mode="json"),
                                  cfg.seed, METRICS_VERSION, [[u, list(m)] for u, m in rt.sanity_units])
            if old["sanity"][k] == v2 and all(new["explain"][k, s] for s in first):
                new["sanity"][k] = sanity.expected_record(rt, keys, [int(new["explain"][k, s]) for s in first])
    _convert(path, rt, names, new)
    kept = {stage: int((arr != 0).sum()) for stage, arr in new.items()}
    return {"kept": kept, "cleared": {stage: int(old[stage].size - kept[stage]) for stage in old},
            "backup": str(backup)}


def _convert(path: Path, rt: Any, names: list[str], records: dict[str, np.ndarray]) -> None:
    """Add schema 3's coordinates and attributes, write the records, refresh the metadata."""
    import xarray as xr

    group = storage._open_group(path, "r+", consolidated=False)
    attrs = dict(group.attrs)  # read first: xarray's append below rewrites the group's attributes
    n, e = len(rt.source), len(names)
    coords = xr.Dataset(attrs=attrs, coords={
        "entry": ("explainer", np.array([common.entry_key(rt, x) for x in names], dtype=object)),
        "active_order": ("explainer", np.arange(e, dtype=np.int64)),
        "sample_key": ("sample", np.array(list(rt.source.sample_keys), dtype=object)),
        "sample_order": ("sample", np.arange(n, dtype=np.int64)),
    })
    for name in coords.coords:
        if name in group:
            del group[name]
    coords.to_zarr(str(path), mode="a", consolidated=False, zarr_format=3)
    group = storage._open_group(path, "r+", consolidated=False)
    dims_of = {"entry": "explainer", "active_order": "explainer", "sample_key": "sample", "sample_order": "sample"}
    for _, arr in group.arrays():  # xarray reads non-index coordinates from this attribute
        dims = arr.metadata.dimension_names or ()
        listed = str(arr.attrs.get("coordinates", "")).split()
        extra = [c for c, d in dims_of.items() if d in dims and c not in listed]
        if listed and extra:
            arr.attrs["coordinates"] = " ".join(sorted(listed + extra))
    group["sample"][:] = np.asarray(rt.source.sample_ids, np.int64)
    for stage, arr in records.items():
        group[f"record_{stage}"][:] = arr
    layout_key = json.loads(attrs["layout"])
    fixed = {"height": layout_key["height"], "width": layout_key["width"], "shard_size": layout_key["shard_size"],
             "has_mask": layout_key["has_mask"], "has_box": layout_key["has_box"]}
    features = {"neurons": layout_key["neuron_layers"], "preview": layout_key["n_previews"],
                "sanity": [layout_key["sanity_units"], layout_key["n_sanity"]]}
    attrs.pop("layout", None)
    attrs.update(schema_version=storage.SCHEMA_VERSION, fixed=json.dumps(fixed, sort_keys=True),
                 features=json.dumps(features, sort_keys=True))
    group.attrs.put(attrs)
    storage.consolidate(path)
