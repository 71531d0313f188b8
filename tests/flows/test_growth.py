"""Experiments that grow: one run directory taken through the issue's sequence (4 explainers
-> add SISE -> more samples -> change Grad-CAM's layer -> switch it back -> drop occlusion),
each step predicted by ``plan_run`` and computing exactly that; the final store and report
equal a fresh run's. Then a SIGKILL during growth, ``attriflow gc`` and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from attriflow.tasks import storage
from attriflow.tasks.config import parse_config
from tests.flows.helpers import cli, files, run

pytestmark = pytest.mark.slow

BASE = {
    "name": "grow",
    "shard_size": 4,
    "data": {"n_samples": 8, "image_size": 32},
    "explain": {"batch_size": 16, "explainers": [
        {"method": "saliency"}, {"method": "gradient_x_input"}, {"method": "grad_cam"},
        {"method": "occlusion", "params": {"window": 8, "stride": 8}}]},
    "evaluate": {"steps": 4, "batch_size": 64},
    "neurons": {"enabled": True, "copies": 3, "batch_size": 8, "box_samples": 1},
    "sanity": {"samples": 2},
    "report": {"grid_samples": 2, "bootstrap": 100},
}


def _with(cfg: dict, **changes) -> dict:
    out = json.loads(json.dumps(cfg))
    for path, value in changes.items():
        node = out
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    return out


def _explainers(cfg: dict, *entries: dict) -> dict:
    return _with(cfg, explain__explainers=list(entries))


SALIENCY, GXI, GRADCAM, OCCLUSION = BASE["explain"]["explainers"]
SISE = {"method": "sise"}
GRADCAM_B3 = {"method": "grad_cam", "params": {"layer": "block3"}}
STEPS = [
    ("add SISE", _explainers(BASE, SALIENCY, GXI, GRADCAM, OCCLUSION, SISE),
     {"load": 0, "neurons": 0, "explain": 2, "evaluate": 2, "sanity": 1}),
    ("128 images", _with(_explainers(BASE, SALIENCY, GXI, GRADCAM, OCCLUSION, SISE), data__n_samples=16),
     {"load": 2, "neurons": 2, "explain": 10, "evaluate": 10, "sanity": 0}),
    ("change Grad-CAM's layer", _with(_explainers(BASE, SALIENCY, GXI, GRADCAM_B3, OCCLUSION, SISE), data__n_samples=16),
     {"load": 0, "neurons": 0, "explain": 4, "evaluate": 4, "sanity": 1}),
    ("switch it back", _with(_explainers(BASE, SALIENCY, GXI, GRADCAM, OCCLUSION, SISE), data__n_samples=16),
     {"load": 0, "neurons": 0, "explain": 0, "evaluate": 0, "sanity": 0}),
    ("drop occlusion", _with(_explainers(BASE, SALIENCY, GXI, GRADCAM, SISE), data__n_samples=16),
     {"load": 0, "neurons": 0, "explain": 0, "evaluate": 0, "sanity": 0}),
]


def _computed(counts: dict) -> dict:
    return {stage: c["computed"] for stage, c in counts.items()}


def _chunks(store: Path, entry: int) -> dict[str, int]:
    """mtime of every chunk file of one entry's attributions and scores."""
    return {k: v[1] for k, v in files(store).items() if k.startswith((f"attribution/c/{entry}/", f"score/c/{entry}/"))}


def _assert_same_view(grown: Path, fresh: Path) -> None:
    """Every active variable, coordinate and record of the current view is equal."""
    a, b = storage.open_current(grown / "store.zarr"), storage.open_current(fresh / "store.zarr")
    assert list(a["explainer"].values) == list(b["explainer"].values)
    assert list(a["sample_key"].values) == list(b["sample_key"].values)
    for name in b.variables:
        if name in storage.NONDETERMINISTIC or name in ("active_order", "sample_order", "explainer", "sample"):
            continue
        x, y = a[name].values, b[name].values
        assert x.shape == y.shape, name
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name
    ra, rb = storage.read_records(grown / "store.zarr"), storage.read_records(fresh / "store.zarr")
    order = lambda p: [list(storage.open_dataset(p / "store.zarr")["entry"].values).index(e)  # noqa: E731
                       for e in b["entry"].values]
    for stage in ("explain", "evaluate"):
        np.testing.assert_array_equal(ra[stage][order(grown)], rb[stage][order(fresh)])
    np.testing.assert_array_equal(ra["sanity"][order(grown)], rb["sanity"][order(fresh)])
    assert ra.keys() == rb.keys()
    np.testing.assert_array_equal(ra["load"], rb["load"])
    if "neurons" in rb:
        np.testing.assert_array_equal(ra["neurons"], rb["neurons"])


def _report_without_timings(run_dir: Path) -> str:
    """The summary without its cost section (wall-clock seconds differ between two runs)."""
    text = (run_dir / "report" / "summary.md").read_text()
    head, _, rest = text.partition("## Cost\n")
    return head + rest[rest.find("\n## "):]


@pytest.fixture(scope="module")
def grown(prefect_server, tmp_path_factory) -> Path:
    """The issue's sequence in one run directory; every step's plan and receipts checked."""
    from attriflow.tasks.stages.plan import plan_run

    run_dir = tmp_path_factory.mktemp("grow") / "run"
    result = run(BASE, run_dir)
    assert _computed(result["counts"]) == {"load": 2, "explain": 8, "neurons": 2, "evaluate": 8, "sanity": 4}
    store = run_dir / "store.zarr"
    for label, cfg, expected in STEPS:
        before = {k: _chunks(store, k) for k in range(4)}
        plan = plan_run(parse_config(cfg).model_dump_json(), run_dir)
        result = run(cfg, run_dir)
        assert _computed(plan["stages"]) == _computed(result["counts"]) == expected, label
        if label == "add SISE":  # the other entries' chunks are untouched
            assert plan["store"] == "grows" and plan["new_entries"] == 1
            assert {k: _chunks(store, k) for k in range(4)} == before
        if label == "change Grad-CAM's layer":
            assert plan["explainers"]["grad_cam"]["explain"] == {"computed": 4, "reused": 0}
            assert len(plan["inactive"]) == 1 and plan["inactive"][0].startswith("grad_cam@")
        if label == "switch it back":
            assert plan["store"] == "ready" and len(plan["inactive"]) == 1 and plan["inactive"][0].startswith("grad_cam@")
        if label == "drop occlusion":
            assert sorted(e.split("@")[0] for e in plan["inactive"]) == ["grad_cam", "occlusion"]
    return run_dir


def test_growing_sequence_computes_only_new_work_and_equals_a_fresh_run(grown, tmp_path) -> None:
    fresh = tmp_path / "fresh"
    final = STEPS[-1][1]
    run(final, fresh)
    _assert_same_view(grown, fresh)
    assert _report_without_timings(grown) == _report_without_timings(fresh)
    raw = storage.open_dataset(grown / "store.zarr")
    assert raw.sizes["explainer"] == 6 and raw.sizes["sample"] == 16  # 4 + SISE + Grad-CAM@block3, kept
    assert sorted(str(x) for x in raw["explainer"].values if "@" in str(x))[0].startswith("grad_cam@")
    with_inactive = storage.open_current(grown / "store.zarr", include_inactive=True)
    assert with_inactive.sizes["explainer"] == 6


def test_fewer_samples_compute_nothing_and_the_report_uses_the_subset(grown, tmp_path) -> None:
    from attriflow.tasks.stages.plan import plan_run

    run_dir = tmp_path / "run"
    shutil.copytree(grown, run_dir)
    fewer = _with(STEPS[-1][1], data__n_samples=6)  # ends inside a shard: that shard is reused
    plan = plan_run(parse_config(fewer).model_dump_json(), run_dir)
    assert all(c["computed"] == 0 for c in plan["stages"].values())
    from attriflow.tasks.stages import prepare_run

    prepare_run.fn(parse_config(fewer).model_dump_json(), str(run_dir))  # what the CLI runs when nothing is to compute
    view = storage.open_current(run_dir / "store.zarr")
    assert view.sizes["sample"] == 6 and storage.open_dataset(run_dir / "store.zarr").sizes["sample"] == 16
    np.testing.assert_array_equal(view["attribution"].values,
                                  storage.open_current(grown / "store.zarr")["attribution"].values[:, :6])
    maps = {k: v for k, v in files(run_dir / "store.zarr").items() if k.startswith("attribution/")}
    rescored = _with(fewer, evaluate__steps=8)  # evaluation settings: the maps are scored again, not recomputed
    plan = plan_run(parse_config(rescored).model_dump_json(), run_dir)
    result = run(rescored, run_dir)
    assert _computed(plan["stages"]) == _computed(result["counts"]) == \
        {"load": 0, "neurons": 0, "explain": 0, "evaluate": 8, "sanity": 0}
    assert {k: v for k, v in files(run_dir / "store.zarr").items() if k.startswith("attribution/")} == maps
    curves = storage.open_current(run_dir / "store.zarr")["curve"].sel(metric="deletion_auc").values
    assert np.isfinite(curves[..., :9]).all()  # 8 steps: 9 points, NaN-padded to the longest curve stored


def test_gc_lists_and_removes_inactive_entries(grown, tmp_path, prefect_server) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(grown, run_dir)
    rows = storage.inactive_entries(run_dir / "store.zarr")  # what `attriflow gc RUN_DIR --json` prints
    assert sorted(r["method"] for r in rows) == ["grad_cam", "occlusion"]
    assert all(r["explain_shards_done"] == 4 for r in rows if r["method"] == "occlusion")
    before = storage.open_current(run_dir / "store.zarr").load()
    deleted = cli(["gc", str(run_dir), "--delete"], {}, prefect_server)
    assert deleted.returncode == 0 and "removed 2 inactive entries" in deleted.stdout, deleted.stderr
    after = storage.open_current(run_dir / "store.zarr")
    assert storage.open_dataset(run_dir / "store.zarr").sizes["explainer"] == 4
    for name in ("attribution", "score", "flagged"):
        np.testing.assert_array_equal(after[name].values, before[name].values)
    assert not (run_dir / "store.zarr.gc").exists() and not (run_dir / "store.zarr.old").exists()
    from attriflow.tasks.stages.plan import plan_run

    plan = plan_run(parse_config(STEPS[-1][1]).model_dump_json(), run_dir)  # every record still holds
    assert plan["store"] == "ready" and plan["inactive"] == []
    assert all(c["computed"] == 0 for c in plan["stages"].values())


def test_sigkill_during_growth_then_rerun_equals_uninterrupted(grown, tmp_path, prefect_server) -> None:
    """Killed while the store grows (a new entry and new samples at once), then again while
    the new explainer's shards are written; the final rerun gives the uninterrupted store."""
    import xarray as xr

    grow = _with(_explainers(STEPS[-1][1], SALIENCY, GXI, GRADCAM, SISE, {"method": "xgrad_cam"}),
                 data__n_samples=20)
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    shutil.copytree(grown, reference)
    shutil.copytree(grown, crashed)
    run(grow, reference)
    cfg = tmp_path / "grow.yaml"
    cfg.write_text(yaml.safe_dump(grow))
    for point in ("grow.after_resize:1", "explain.after_write:3"):
        killed = cli(["run", str(cfg), "--run-dir", str(crashed)], {"ATTRIFLOW_FAULT": point}, prefect_server)
        assert killed.returncode == -9, killed.stderr[-2000:]
        xr.open_zarr(crashed / "store.zarr").load()  # a reader of the interrupted store sees whole arrays
    resumed = cli(["run", str(cfg), "--run-dir", str(crashed)], {}, prefect_server)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # 9 explain shards to write (the new shard of 4 explainers, 5 of xgrad_cam); killed after the
    # 3rd write, before its record: the rerun computes exactly the 7 without a record
    assert "explain: 7 computed, 18 reused" in resumed.stdout, resumed.stdout
    _assert_same_view(crashed, reference)
    ours = {k: v[0] for k, v in files(crashed / "store.zarr", reproducible=True).items()}
    ref = {k: v[0] for k, v in files(reference / "store.zarr", reproducible=True).items()}
    assert ours.keys() == ref.keys()
    assert [k for k in ours if ours[k] != ref[k]] == []


def test_a_schema_2_store_is_refused_then_migrated_in_place(prefect_server, tmp_path) -> None:
    """A store written by the previous attriflow (``fixtures/store-v2``: 8 embedded samples,
    saliency and Grad-CAM, made by commit 83aa66e) is refused with the command that migrates
    it; after ``attriflow migrate`` every finished shard is reused and the store equals a fresh run's."""
    from attriflow.tasks.stages.plan import plan_run

    fixtures = Path(__file__).parent / "fixtures"
    run_dir = tmp_path / "old"
    shutil.copytree(fixtures / "store-v2", run_dir / "store.zarr")
    cfg = yaml.safe_load((fixtures / "store-v2.yaml").read_text())
    plan = plan_run(parse_config(cfg).model_dump_json(), run_dir)
    assert plan["store"] == "other-layout" and "attriflow migrate RUN_DIR" in plan["reason"]
    migrated = cli(["migrate", str(run_dir)], {}, prefect_server)
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    assert "explain: 2 record(s) kept, 0 to redo" in migrated.stdout
    assert (run_dir / "store-v2-metadata" / "zarr.json").exists()
    plan = plan_run(parse_config(cfg).model_dump_json(), run_dir)
    assert plan["store"] == "ready" and all(c["computed"] == 0 for c in plan["stages"].values()), plan["stages"]
    from attriflow.tasks.stages import prepare_run

    prepare_run.fn(parse_config(cfg).model_dump_json(), str(run_dir))  # what a rerun does before finding nothing to do
    run(cfg, tmp_path / "fresh")
    _assert_same_view(run_dir, tmp_path / "fresh")
