"""The finished-run marker answers a rerun only while everything it stamped is unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attriflow.tasks import finished
from attriflow.tasks.storage import run_lock

ROOT = Path(__file__).resolve().parents[2]
COUNTS = {"load": {"computed": 0, "reused": 2}, "explain": {"computed": 0, "reused": 4}}


def _finished_run(tmp_path: Path) -> tuple[Path, Path, Path, str, dict]:
    """A run directory with the files a finished run has, a data folder and a config."""
    run_dir, data = tmp_path / "run", tmp_path / "images"
    for p in ("store.zarr/zarr.json", "store.zarr/record_load/zarr.json", "report/summary.md",
              "report/index.html"):
        (run_dir / p).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / p).write_text("{}")
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "a.png").write_bytes(b"png")
    raw = {"name": "x", "data": {"kind": "imagefolder", "root": str(data)}}
    cfg = tmp_path / "x.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    key = finished.config_key(finished.read_raw(str(cfg)), str(cfg), run_dir)
    assert finished.write(run_dir, finished.snapshot(key, [], [str(data)], run_dir), COUNTS)
    return run_dir, data, cfg, key, raw


def test_the_marker_answers_until_anything_it_stamped_changes(tmp_path) -> None:
    run_dir, data, cfg, key, raw = _finished_run(tmp_path)
    assert finished.check(run_dir, key) == COUNTS
    # comments and key order are not the config
    cfg.write_text("# a comment\n" + yaml.safe_dump(dict(reversed(list(raw.items())))))
    assert finished.config_key(finished.read_raw(str(cfg)), str(cfg), run_dir) == key
    # a changed setting is another config; other visible GPUs another device
    changed = {**raw, "seed": 1}
    assert finished.check(run_dir, finished.config_key(changed, str(cfg), run_dir)) is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "7")
        assert finished.check(run_dir, finished.config_key(raw, str(cfg), run_dir)) is None

    def fresh() -> None:
        assert finished.write(run_dir, finished.snapshot(key, [], [str(data)], run_dir), COUNTS)
        assert finished.check(run_dir, key) == COUNTS

    for edit in (
        lambda: (data / "cat" / "b.png").write_bytes(b"new image"),  # an image added
        lambda: (data / "cat" / "a.png").write_bytes(b"PNG!"),  # an image overwritten in place
        lambda: (run_dir / "store.zarr" / "record_load" / "zarr.json").write_text('{"x": 1}'),  # store metadata
        lambda: (run_dir / "report" / "index.html").write_text("<html>"),  # report rewritten
        lambda: (run_dir / "report" / "summary.md").unlink(),  # report removed
    ):
        fresh()
        edit()  # each edit changes a size or a listing: seen whatever the clock's resolution
        assert finished.check(run_dir, key) is None
        (run_dir / "report" / "summary.md").write_text("{}")


def test_new_code_or_packages_invalidate_the_marker(tmp_path, monkeypatch) -> None:
    run_dir, _, _, key, _ = _finished_run(tmp_path)
    monkeypatch.setattr(finished, "code_stamp", lambda: "another version")
    assert finished.check(run_dir, key) is None


def test_taking_the_run_directory_removes_the_marker(tmp_path) -> None:
    run_dir, _, _, key, _ = _finished_run(tmp_path)
    with run_lock(run_dir):
        assert not (run_dir / finished.MARKER).exists()
    assert finished.check(run_dir, key) is None


def test_a_remote_store_gets_no_marker(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert not finished.write(run_dir, finished.snapshot("k", [], [], run_dir), COUNTS)  # no store.zarr here
    assert not (run_dir / finished.MARKER).exists()
    # a store.zarr left behind when the config moved the store to a URL is not stamped either
    local, _, _, key, _ = _finished_run(tmp_path / "moved")
    (local / "store-url").write_text("memory://elsewhere\n")
    assert finished.check(local, key) is None
    assert not finished.write(local, finished.snapshot(key, [], [], local), COUNTS)


def test_inputs_changed_while_the_run_computed_leave_no_marker(tmp_path) -> None:
    """The stamps are taken before the run computes: an image added (or the config or the
    code changed) meanwhile means the results may be the old inputs', so no marker."""
    run_dir, data, _, key, _ = _finished_run(tmp_path)
    before = finished.snapshot(key, [], [str(data)], run_dir)
    (data / "cat" / "late.png").write_bytes(b"added during the run")
    assert not finished.write(run_dir, before, COUNTS)
    assert finished.check(run_dir, key) is None  # the data changed since the marker, too
    before = finished.snapshot(key, [], [str(data)], run_dir)
    assert finished.write(run_dir, before, COUNTS)


def test_a_copied_run_directory_is_checked_in_full(tmp_path) -> None:
    import shutil

    run_dir, _, cfg, _, raw = _finished_run(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, copy_function=shutil.copy2)
    assert finished.check(copy, finished.config_key(raw, str(cfg), copy)) is None


def test_a_finished_rerun_loads_neither_torch_nor_prefect(tmp_path) -> None:
    """The command line answers from the marker before importing anything heavy (the
    marker's key holds the working directory: the subprocess runs in this one)."""
    run_dir, _, cfg, _, _ = _finished_run(tmp_path)
    code = ("import sys; from attriflow.flows.cli import main; rc = main(['run', sys.argv[1], '--run-dir', sys.argv[2]]); "
            "print('heavy:', sorted(m for m in ('torch', 'prefect', 'xarray', 'zarr') if m in sys.modules)); "
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(cfg), str(run_dir)], capture_output=True, text=True,
                         cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nothing to compute" in out.stdout and "explain: 0 computed, 4 reused" in out.stdout
    assert "heavy: []" in out.stdout


def test_factories_and_unstamped_data_files_get_no_marker(tmp_path) -> None:
    """A factory's code may read a checkpoint no config names: no marker, always the full
    check. A dataset that listed a file outside the stamped files and roots: no marker."""
    from attriflow.tasks.config import parse_config

    cfg = parse_config({"model": {"factory": "my_nets.py:build"}}, "test")
    with pytest.raises(ValueError, match="model.factory"):
        finished.inputs_of(cfg, {"model": {"factory": "my_nets.py:build"}})
    run_dir, data, _, key, _ = _finished_run(tmp_path)
    before = finished.snapshot(key, [], [str(data)], run_dir)
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(b"x")
    assert not finished.write(run_dir, before, COUNTS, [data / "cat" / "a.png", elsewhere])
    assert finished.write(run_dir, before, COUNTS, [data / "cat" / "a.png"])


def test_a_run_directory_inside_a_data_root_does_not_stamp_itself(tmp_path) -> None:
    """``data.root: .`` with the run directory below it: the run's own files are not inputs,
    so the marker still answers after the run wrote them."""
    run_dir, data, _, key, _ = _finished_run(tmp_path)
    before = finished.snapshot(key, [], [str(tmp_path)], run_dir)  # the root holds the run directory
    (run_dir / "store.zarr" / "record_load" / "c").mkdir()
    (run_dir / "store.zarr" / "record_load" / "c" / "0").write_bytes(b"done")
    assert finished.write(run_dir, before, COUNTS)
    assert finished.check(run_dir, key) == COUNTS
    (data / "cat" / "new.png").write_bytes(b"an image added under the root")
    assert finished.check(run_dir, key) is None
