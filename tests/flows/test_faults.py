"""Scale-out and faults: the Dask runner, kills at several points, retries, failing shards,
stale locks. Every interrupted or failing run is finished by a plain rerun into a store
equal to the uninterrupted reference run (wall-clock timings aside)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.flows.helpers import ROOT, SMALL, cli, files, run

pytestmark = pytest.mark.slow


def _same_store(a: Path, b: Path) -> None:
    ours = {k: v[0] for k, v in files(a / "store.zarr", reproducible=True).items()}
    ref = {k: v[0] for k, v in files(b / "store.zarr", reproducible=True).items()}
    assert ours.keys() == ref.keys()
    assert [k for k in ours if ours[k] != ref[k]] == []


def test_dask_local_cluster_gives_the_local_runners_store(reference_run, tmp_path) -> None:
    result = run({**SMALL, "runner": {"kind": "dask", "workers": 2}}, tmp_path / "dask")
    assert result["counts"]["explain"] == {"computed": 6, "reused": 0, "failed": 0}
    _same_store(tmp_path / "dask", reference_run)
    manifest = json.loads((tmp_path / "dask" / "manifest.json").read_text())
    assert "runner" not in manifest["config"]  # execution settings are not provenance


def test_killed_during_analysis_then_report_resumes_to_the_same_store(reference_run, prefect_server, tmp_path) -> None:
    """Killed during evaluation, then (rerun) while writing the report; the third run finishes
    into the uninterrupted run's store. (Kills during explanation and store growth:
    ``test_growth.py``.)"""
    from attriflow.flows.cli import status_of

    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    run_dir = tmp_path / "run"
    killed = cli(["run", str(cfg), "--run-dir", str(run_dir)], {"ATTRIFLOW_FAULT": "evaluate.after_write:3"},
                 prefect_server)
    assert killed.returncode == -9, killed.stderr[-2000:]
    stages = status_of(run_dir)["stages"]
    assert sum(c["done"] for c in stages["explain"].values()) == 6
    assert sum(c["done"] for c in stages["evaluate"].values()) == 2  # the 3rd write's record never landed
    killed = cli(["run", str(cfg), "--run-dir", str(run_dir)], {"ATTRIFLOW_FAULT": "report.after_figures:1"},
                 prefect_server)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = cli(["run", str(cfg), "--run-dir", str(run_dir)], {}, prefect_server)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "explain: 0 computed, 6 reused" in resumed.stdout
    assert "evaluate: 0 computed, 6 reused" in resumed.stdout  # the second run finished them
    # without a terminal: one line per stage on the console, and in the flow run's log in the UI
    assert "explain: 6/6 shard task(s) done" in resumed.stderr and "report: " in resumed.stderr
    import httpx

    from attriflow.tasks.config import parse_config

    name = f"small-{parse_config(SMALL).digest()[:8]}"
    runs = httpx.post(f"{prefect_server}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}}},
                      timeout=30).json()
    logs = httpx.post(f"{prefect_server}/logs/filter", timeout=30, json={
        "logs": {"flow_run_id": {"any_": [r["id"] for r in runs]}}, "limit": 200}).json()
    assert any(m["message"].startswith("explain: 6/6 shard task(s) done") for m in logs)
    _same_store(run_dir, reference_run)
    assert (run_dir / "report" / "index.html").stat().st_size > 100_000


def test_a_failing_shard_is_retried(reference_run, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ATTRIFLOW_RAISE", "explain-grad_cam-1:1")
    result = run({**SMALL, "runner": {"retries": 1}}, tmp_path / "run")
    assert result["counts"]["explain"] == {"computed": 6, "reused": 0, "failed": 0}
    assert (tmp_path / "run" / ".faults" / "explain-grad_cam-1").read_bytes() == b".."  # failed, then passed
    _same_store(tmp_path / "run", reference_run)


def test_a_shard_that_keeps_failing_fails_the_run_alone(reference_run, tmp_path, monkeypatch, prefect_server,
                                                        caplog) -> None:
    from attriflow.flows.run import RunFailedError

    run_dir = tmp_path / "run"
    # a transient error (retried) and one that a retry would repeat (a ValueError: not retried)
    monkeypatch.setenv("ATTRIFLOW_RAISE",
                       "explain-grad_cam-1:always,evaluate-saliency-2:always:deterministic")
    with pytest.raises(RunFailedError) as err:
        run({**SMALL, "runner": {"retries": 2}}, run_dir)
    message = str(err.value)
    assert "explain grad_cam shard 1 (Failed" in message and "InjectedFault" in message
    assert (run_dir / ".faults" / "explain-grad_cam-1").read_bytes() == b"..."  # 1 try + 2 retries
    assert (run_dir / ".faults" / "evaluate-saliency-2").read_bytes() == b"."  # not retried
    repeat, rerun, upstream = message.split(". ")[1:]
    assert repeat.startswith("1 failed with an error that a rerun would repeat (not retried): fix its cause")
    assert "evaluate saliency shard 2" in repeat and "InjectedInputError" in repeat
    assert rerun.startswith("1 failed after 2 retries; rerun to finish: explain grad_cam shard 1")
    assert upstream == ("2 not run because a task they wait for did not finish: evaluate grad_cam shard 1; "
                        "sanity grad_cam")
    # the error that was not retried is logged with its traceback (Prefect logs one only once
    # the retries are spent)
    logged = [r for r in caplog.records if r.getMessage().startswith("not retried: InjectedInputError")]
    assert logged and logged[0].exc_info and logged[0].exc_info[0].__name__ == "InjectedInputError"
    # the report written anyway says so before any number, and counts no pass for the
    # samples never explained
    summary = (run_dir / "report" / "summary.md").read_text()
    warning = summary[summary.index("> **Warning:** Incomplete run: "):summary.index("## Metrics")]
    assert "grad_cam explain 2/3 shards" in warning and "saliency evaluate 2/3 shards" in warning
    assert "sanity check not done for grad_cam" in warning and "neurons" not in warning
    assert any(line.startswith("| cam | `grad_cam` |") and line.endswith("| 1.0 | 1.0 |")  # its cost row
               for line in summary.splitlines())
    status = json.loads(cli(["status", str(run_dir), "--json"], {}, prefect_server).stdout)["stages"]
    assert status["explain"]["saliency"]["done"] == 3 and status["explain"]["grad_cam"]["done"] == 2
    assert status["evaluate"]["grad_cam"]["done"] == 2 and status["neurons"]["done"] == 3
    assert status["evaluate"]["saliency"]["done"] == 2
    assert status["sanity"] == {"saliency": {"done": 1, "total": 1}, "grad_cam": {"done": 0, "total": 1}}
    monkeypatch.delenv("ATTRIFLOW_RAISE")
    result = run(SMALL, run_dir)
    assert result["counts"]["explain"] == {"computed": 1, "reused": 5, "failed": 0}
    assert result["counts"]["evaluate"] == {"computed": 2, "reused": 4, "failed": 0}
    assert result["counts"]["sanity"] == {"computed": 1, "reused": 1, "failed": 0}
    _same_store(run_dir, reference_run)
    assert "Incomplete run" not in (run_dir / "report" / "summary.md").read_text()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path) -> None:
    from attriflow.tasks.storage import run_lock

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from attriflow.tasks.storage import run_lock\n"
         "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)", str(run_dir)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (run_dir / ".attriflow.lock").read_text() == str(holder.pid)  # left behind
    with pytest.warns(UserWarning, match=f"left by process {holder.pid}, which is gone"):
        with run_lock(run_dir):
            assert (run_dir / ".attriflow.lock").read_text() == str(os.getpid())


@pytest.mark.parametrize("url", ["memory://attriflow-tests/small.zarr"])  # file:// URLs: test_storage.py
def test_store_at_an_fsspec_url_equals_the_local_store(url, reference_run, tmp_path) -> None:
    import xarray as xr

    from attriflow.tasks.stages import store_path
    from attriflow.tasks.storage import NONDETERMINISTIC, open_dataset

    url = url.format(tmp=tmp_path)
    run_dir = tmp_path / "run"
    result = run({**SMALL, "store": url}, run_dir)
    assert result["counts"]["explain"]["computed"] == 6
    assert not (run_dir / "store.zarr").exists() and (run_dir / "store-url").read_text().strip() == url
    again = run({**SMALL, "store": url}, run_dir)
    assert all(c["computed"] == 0 for c in again["counts"].values())
    ours = open_dataset(store_path(run_dir)).drop_vars(NONDETERMINISTIC).load()
    ref = open_dataset(reference_run / "store.zarr").drop_vars(NONDETERMINISTIC).load()
    xr.testing.assert_equal(ours, ref)
    assert ours.attrs["manifest"] == ref.attrs["manifest"]
    assert (run_dir / "report" / "index.html").exists()


def test_a_memory_store_cannot_go_to_dask_workers() -> None:
    from attriflow.tasks.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="memory:// store lives in one process"):
        parse_config({"store": "memory://x", "runner": {"kind": "dask"}})
