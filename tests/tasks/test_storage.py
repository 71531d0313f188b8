"""Store layout, records and the run-directory lock."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import xarray as xr

from attriflow.tasks import storage


def _layout(n=10, entries=(("a", "gradient", "saliency"), ("b", "cam", "grad_cam")), **kw):
    base = dict(sample_ids=tuple(range(n)), sample_names=tuple(f"s{i}" for i in range(n)),
                sample_keys=tuple(f"s{i}#k" for i in range(n)), height=4, width=4, shard_size=4,
                entries=tuple(storage.Entry(f"{e}@0", e, f, m, "{}") for e, f, m in entries),
                has_mask=True, has_box=False, n_points=3)
    base.update(kw)
    return storage.StoreLayout(**base)


def test_init_template_and_region_writes(tmp_path) -> None:
    path = tmp_path / "store.zarr"
    storage.init_store(path, _layout(), {"manifest": "{}"})
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


def test_an_opened_store_groups_by_family_and_plots_maps_right_side_up(tmp_path) -> None:
    """``storage.open_dataset`` (what ``attriflow.open_run`` reads): coordinates in memory
    (``groupby("family")``, ``where(..., drop=True)``) and ``y`` ordered for display, so
    xarray's ``.plot()`` and ``.plot.imshow()`` draw the image's top rows at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "store.zarr"
    storage.init_store(path, _layout(), {"manifest": "{}"})
    maps = np.zeros((2, 10, 4, 4), np.float32)
    maps[:, :, 0] = 1.0  # the top row of every map
    storage.write_region(path, {"attribution": (("explainer", "sample", "y", "x"), maps)},
                         {"explainer": slice(0, 2), "sample": slice(0, 10)})
    ds = storage.open_dataset(path)
    assert ds["attribution"].groupby("family").mean(...).sizes["family"] == 2
    assert list(ds.where(ds["family"] == "cam", drop=True)["explainer"].values) == [str(ds["explainer"].values[1])]
    assert ds["y"].values.tolist() == [3, 2, 1, 0] and ds["x"].values.tolist() == [0, 1, 2, 3]
    for kind in ("pcolormesh", "imshow"):
        fig = plt.figure(figsize=(2, 2), dpi=40)
        ax = fig.add_axes((0, 0, 1, 1))
        getattr(ds["attribution"].isel(explainer=0, sample=0).plot, kind)(ax=ax, add_colorbar=False, cmap="gray",
                                                                           vmin=0, vmax=1)
        ax.set_axis_off()
        fig.canvas.draw()
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., 0].astype(float)
        plt.close(fig)
        assert pixels[:15].mean() > 250 and pixels[-15:].mean() < 5, kind  # bright at the top


def test_store_ref_keeps_urls_and_makes_file_urls_paths(tmp_path) -> None:
    from pathlib import Path

    assert storage.store_ref(f"file://{tmp_path}/s.zarr") == Path(f"{tmp_path}/s.zarr")
    assert storage.store_ref("memory://x/s.zarr") == "memory://x/s.zarr"
    assert storage.store_ref(tmp_path / "s.zarr") == tmp_path / "s.zarr"


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


def _tree(path):
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_growth_appends_chunk_rows_and_an_interrupted_grow_is_redone(tmp_path, monkeypatch) -> None:
    """Entries and samples are appended by ``resize``: finished chunks are not rewritten; a
    grow interrupted after its resizes leaves readers the old consolidated shapes and is
    redone by the next call into the store an uninterrupted grow gives."""
    import attriflow.tasks.runtime

    metrics = tuple(storage.METRICS)
    small = _layout(metrics=metrics[:-1])  # a metric attriflow added since the store was made
    big = _layout(n=14, entries=(("a", "gradient", "saliency"), ("b", "cam", "grad_cam"), ("c", "cam", "grad_cam")),
                  metrics=metrics)
    paths = {name: tmp_path / name / "store.zarr" for name in ("straight", "interrupted")}
    for path in paths.values():
        storage.init_store(path, small, {"manifest": "{}"})
        data = np.ones((1, 4, 4, 4), np.float32)
        storage.write_region(path, {"attribution": (("explainer", "sample", "y", "x"), data)},
                             {"explainer": slice(0, 1), "sample": slice(0, 4)})
        storage.set_record(path, "explain", 0, 7, 0)
    before = {k: v for k, v in _tree(paths["straight"]).items() if k.startswith("attribution/c/")}
    storage.grow_store(paths["straight"], big, storage.read_state(paths["straight"]), {"manifest": "{}"})
    after = _tree(paths["straight"])
    assert all(after[k] == v for k, v in before.items())  # same bytes, same mtime
    ds = xr.open_zarr(paths["straight"])
    assert ds["attribution"].shape == (3, 14, 4, 4) and list(ds["entry"].values) == ["a@0", "b@0", "c@0"]
    assert list(ds["explainer"].values) == ["a", "b", "c@0"] and list(ds["active_order"].values) == [0, 1, -1]
    assert list(ds["sample_order"].values[10:]) == [-1] * 4 and list(ds["sample_key"].values[-1:]) == ["s13#k"]
    assert (ds["attribution"].values[0, :4] == 1).all() and np.isnan(ds["attribution"].values[:, 10:]).all()
    assert storage.read_records(paths["straight"])["explain"].tolist() == [[7, 0, 0, 0]] + [[0, 0, 0, 0]] * 2
    assert list(ds["metric"].values) == list(metrics) and ds["score"].shape == (3, 14, len(metrics))
    assert ds["category"].values[-1] == storage.METRICS[metrics[-1]]["category"]

    class Killed(Exception):
        pass

    def die(name):
        if name == "grow.after_resize":
            raise Killed

    path = paths["interrupted"]
    monkeypatch.setattr(attriflow.tasks.runtime, "fault_point", die)
    with pytest.raises(Killed):
        storage.grow_store(path, big, storage.read_state(path), {"manifest": "{}"})
    monkeypatch.undo()
    reader = xr.open_zarr(path)  # the consolidated metadata of before the grow: whole, old shapes
    assert reader["attribution"].shape == (2, 10, 4, 4) and (reader["attribution"].values[0, :4] == 1).all()
    state = storage.read_state(path)
    assert len(state.entries) == 2 and len(state.sample_keys) == 10  # the markers were not committed
    import zarr

    zarr.open_group(str(path), mode="r+", use_consolidated=False)["entry"].resize((3,))  # killed after the
    assert storage.read_state(path).entries == ["a@0", "b@0"]  # marker's resize, before its values
    storage.grow_store(path, big, state, {"manifest": "{}"})
    ours = {k: v[0] for k, v in _tree(path).items()}
    ref = {k: v[0] for k, v in _tree(paths["straight"]).items()}
    assert ours == ref


@pytest.mark.parametrize("dtype,codec", [("float16", "blosc-lz4"), ("bfloat16", "blosc-zstd"), ("float32", "none")])
def test_attribution_dtype_and_codec_are_stored_read_and_kept_when_grown(tmp_path, dtype, codec) -> None:
    """Maps are rounded as ``store.attribution_dtype`` says, read back through xarray as
    those values, the codec is the array's, and a grown store keeps both."""
    import json

    import torch

    path = tmp_path / "store.zarr"
    storage.init_store(path, _layout(attribution_dtype=dtype, codec=codec), {"manifest": "{}"})
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(4, 4, 4)).astype(np.float32) * np.float32(3.0)
    stored, overflow, imprecise = storage.round_maps(maps, dtype)
    assert not overflow.any() and not imprecise.any()
    storage.write_region(path, {"attribution": (("explainer", "sample", "y", "x"), stored[None])},
                         {"explainer": slice(0, 1), "sample": slice(0, 4)})
    back = xr.open_zarr(path)["attribution"].values[0, :4]
    expected = {"float32": maps, "float16": maps.astype(np.float16).astype(np.float32),
                "bfloat16": torch.from_numpy(maps).bfloat16().float().numpy()}[dtype]
    np.testing.assert_array_equal(back.astype(np.float32), expected)
    if dtype == "bfloat16":  # the low 16 bits are zero: what the shuffling codecs store for free
        assert not (back.view(np.uint32) & 0xFFFF).any()
    meta = json.loads((path / "attribution" / "zarr.json").read_text())
    names = [c["name"] for c in meta["codecs"]]
    assert names == {"none": ["bytes"], "zstd": ["bytes", "zstd"]}.get(codec, ["bytes", "blosc"])
    assert meta["data_type"] == ("float16" if dtype == "float16" else "float32")
    state = storage.read_state(path)
    assert (state.fixed["attribution_dtype"], state.fixed["codec"]) == (dtype, codec)
    grown = _layout(n=14, attribution_dtype=dtype, codec=codec)
    storage.grow_store(path, grown, state, {"manifest": "{}"})
    assert json.loads((path / "attribution" / "zarr.json").read_text())["codecs"] == meta["codecs"]
    np.testing.assert_array_equal(xr.open_zarr(path)["attribution"].values[0, :4].astype(np.float32), expected)


def test_float16_maps_out_of_range_are_named() -> None:
    maps = np.stack([np.full((2, 2), 7e4, np.float32), np.full((2, 2), 1e-6, np.float32),
                     np.zeros((2, 2), np.float32), np.full((2, 2), 0.5, np.float32),
                     np.full((2, 2), 2e-8, np.float32), np.full((2, 2), 65510.0, np.float32)])
    stored, overflow, imprecise = storage.round_maps(maps, "float16")
    # too large (inf), lost entirely (all zero): flagged; 65510 rounds to 65504, still finite
    assert overflow.tolist() == [True, False, False, False, True, False]
    assert imprecise.tolist() == [False, True, False, False, False, False]  # an all-zero map loses nothing
    assert np.isinf(stored[0]).all() and not stored[4].any() and stored.dtype == np.float16


def test_stores_from_before_the_encodings_read_as_float32_zstd(tmp_path) -> None:
    import json

    import zarr

    path = tmp_path / "store.zarr"
    storage.init_store(path, _layout(), {"manifest": "{}"})
    group = zarr.open_group(str(path), mode="r+")
    fixed = json.loads(group.attrs["fixed"])
    del fixed["attribution_dtype"], fixed["codec"]
    group.attrs["fixed"] = json.dumps(fixed)
    storage.consolidate(path)
    state = storage.read_state(path)
    assert (state.fixed["attribution_dtype"], state.fixed["codec"]) == ("float32", "zstd")


def test_a_store_from_before_the_stage_timings_gets_them_untimed_when_grown(tmp_path) -> None:
    import zarr

    path = tmp_path / "store.zarr"
    layout = _layout(sanity_units=("fc",), n_sanity=2)
    storage.init_store(path, layout, {"manifest": "{}"})
    storage.write_region(path, {"explain_seconds": (("explainer", "shard"), np.array([[2.5]]))},
                         {"explainer": slice(0, 1), "shard": slice(1, 2)})
    group = zarr.open_group(str(path), mode="r+")
    for name in ("load_seconds", "evaluate_seconds", "sanity_seconds"):
        del group[name]  # as written before the store kept them
    storage.consolidate(path)
    grown = _layout(n=14, sanity_units=("fc",), n_sanity=2)
    storage.grow_store(path, grown, storage.read_state(path), {"manifest": "{}"})
    assert storage.grow_store(path, grown, storage.read_state(path), {"manifest": "{}"}) == {"recreated": []}
    ds = storage.open_dataset(path)
    assert ds["load_seconds"].dims == ("shard",) and ds["load_seconds"].shape == (4,)
    assert ds["evaluate_seconds"].shape == (2, 4) and ds["sanity_seconds"].shape == (2,)
    for name in ("load_seconds", "evaluate_seconds", "sanity_seconds"):
        assert np.isnan(ds[name].values).all()  # not timed, never a made-up zero
    assert ds["explain_seconds"].values[0, 1] == 2.5  # kept
    assert "neurons_seconds" not in ds  # only with the neurons feature ...
    with_neurons = _layout(n=14, sanity_units=("fc",), n_sanity=2, neuron_layers=(("l", 2),))
    assert storage.grow_store(path, with_neurons, storage.read_state(path), {"manifest": "{}"}) == {
        "recreated": ["neurons"]}  # ... created whole with it
    ds = storage.open_dataset(path)
    assert ds["neurons_seconds"].shape == (4,) and np.isnan(ds["neurons_seconds"].values).all()
    assert set(storage.TIMINGS) <= set(ds.data_vars)
