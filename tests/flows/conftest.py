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


