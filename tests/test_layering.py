"""Imports flow one way: flows -> tasks -> {explainers, analysis}; those two are independent;
and every import of attriflow's own code goes through the ``attriflow`` namespace."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "explainers": {"tasks", "flows", "analysis", "prefect", "data"},
    "analysis": {"tasks", "flows", "explainers", "prefect", "data"},
    "tasks": {"flows"},
    "data": {"tasks", "flows", "explainers", "analysis", "prefect"},
}


PACKAGES = ("analysis", "data", "explainers", "flows", "tasks")


def _modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _imports(path: Path) -> set[str]:
    """Top-level names imported, attriflow's subpackages by their folder (``tasks``)."""
    return {m.split(".")[1] if m.startswith("attriflow.") else m.split(".")[0] for m in _modules(path)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package])
        for p in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_own_code_is_imported_through_the_attriflow_namespace() -> None:
    """A bare ``import tasks`` / ``from data import ...`` would pick up a user's own
    ``tasks.py`` or ``data.py`` (the working directory comes first on the path)."""
    files = [p for d in (*PACKAGES, "attriflow", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    bare = {str(p.relative_to(ROOT)): sorted(m for m in _modules(p) if m.split(".")[0] in PACKAGES)
            for p in files}
    assert {k: v for k, v in bare.items() if v} == {}
