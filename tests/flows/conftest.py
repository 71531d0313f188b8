"""The reference run shared by the end-to-end test modules (one per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.flows.helpers import SMALL, run


@pytest.fixture(scope="session")
def reference_run(prefect_server, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    result = run(SMALL, run_dir)
    assert result["counts"]["explain"] == {"computed": 6, "reused": 0, "failed": 0}
    return run_dir


@pytest.fixture
def in_process_cli(monkeypatch):
    """``attriflow.flows.cli.main`` run in this process: the environment defaults it sets
    (Prefect logging, telemetry) are restored, or removed, after the test."""
    from attriflow.flows import cli

    for key in ("PREFECT_LOGGING_LEVEL", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK",
                "DASK_LOGGING__DISTRIBUTED"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return cli.main
