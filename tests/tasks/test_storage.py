"""Store layout, records and the run-directory lock."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import xarray as xr

from tasks import storage


def _layout(**kw):
    base = dict(sample_ids=tuple(range(10)), sample_names=tuple(f"s{i}" for i in range(10)), height=4,
                width=4, shard_size=4, explainers=("a", "b"), families=("gradient", "cam"),
                methods=("saliency", "grad_cam"), has_mask=True, has_box=False, n_points=3)
    base.update(kw)
    return storage.StoreLayout(**base)


def test_init_template_and_region_writes(tmp_path) -> None:
    path = tmp_path / "store.zarr"
    storage.init_store(path, _layout(), ["{}", '{"layer": "x"}'], {"manifest": "{}"})
    ds = xr.open_zarr(path)
    assert ds["attribution"].dims == ("explainer", "sample", "y", "x")
    assert ds["attribution"].encoding["chunks"] == (1, 4, 4, 4)
    assert list(ds["family"].values) == ["gradient", "cam"]
    assert not any(p.name == "c" for p in (path / "attribution").iterdir()), "no data chunk at init"
    # the last shard is short: 8..10
    data = np.arange(2 * 16, dtype=np.float32).reshape(1, 2, 4, 4)
    storage.write_region(path, {"attribution": (("explainer", "sample", "y", "x"), data)},
                         {"explainer": slice(1, 2), "sample": slice(8, 10)})
    assert storage.get_record(path, "explain", 2, 1) == 0
    storage.set_record(path, "explain", 2, 12345, 1)
    ds = xr.open_zarr(path)
    np.testing.assert_array_equal(ds["attribution"].values[1, 8:10], data[0])
    assert np.isnan(ds["attribution"].values[0]).all()
    assert storage.read_records(path)["explain"].tolist() == [[0, 0, 0], [0, 0, 12345]]


def test_plan_shards() -> None:
    assert storage.plan_shards(10, 4) == [storage.Shard(0, 0, 4), storage.Shard(1, 4, 8), storage.Shard(2, 8, 10)]


def _hold(run_dir, ready, release):
    with storage.run_lock(run_dir):
        ready.set()
        release.wait(30)


def test_lock_refuses_a_second_process_and_frees_on_exit(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    proc.start()
    try:
        assert ready.wait(60)
        with pytest.raises(storage.RunLockedError, match=rf"in use .*pid {proc.pid}"):
            with storage.run_lock(tmp_path):
                pass
    finally:
        release.set()
        proc.join(30)
    with storage.run_lock(tmp_path):  # free again once the holder is gone
        with storage.run_lock(tmp_path):  # and re-entrant within one process
            pass


def test_digest64_is_stable_and_nonzero() -> None:
    assert storage.digest64("a", 1, {"b": 2}) == storage.digest64("a", 1, {"b": 2})
    assert storage.digest64("a", 1) != storage.digest64("a", 2)
    assert storage.digest64("x") > 0
