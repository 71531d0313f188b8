"""Shared helpers of the end-to-end tests: the small config, running the flow and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from attriflow.tasks.config import parse_config

ROOT = Path(__file__).resolve().parents[2]

SMALL = {
    "name": "small",
    "shard_size": 8,
    "data": {"n_samples": 24},
    "explain": {"batch_size": 8, "explainers": [{"method": "saliency"}, {"method": "grad_cam"}]},
    "evaluate": {"steps": 8, "batch_size": 64},
}


def files(store: Path, reproducible: bool = False) -> dict[str, tuple[bytes, int]]:
    """Relative path -> (content, mtime_ns) of every file in a store (``reproducible``:
    without the wall-clock variables, the only ones two identical runs may differ in)."""
    from attriflow.tasks.storage import NONDETERMINISTIC

    files = {
        str(p.relative_to(store)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(store.rglob("*")) if p.is_file()
    }
    if reproducible:
        files = {k: v for k, v in files.items() if k.split("/")[0] not in NONDETERMINISTIC}
    return files


def run(cfg: dict, run_dir: Path) -> dict:
    from attriflow.flows.run import execute

    return execute(parse_config(cfg), str(run_dir))


def cli(args: list[str], env_extra: dict[str, str], server: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": server, **env_extra}
    return subprocess.run([sys.executable, "-m", "attriflow.flows.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
