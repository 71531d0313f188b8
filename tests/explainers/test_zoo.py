"""The zoo (issue #13): every registered explainer on one small member of every torchvision
classification family; each pair either returns a map that passes the method's check or
refuses with ``UnsupportedModelError`` naming the reason.

The cases (parameters and checks per explainer) and the architectures live in
``tests/explainers/zoo_support.py``. The outcome table is written by this module when the
environment variable ``ATTRIFLOW_ZOO_TABLE`` names a file (a plain test run writes nothing,
so CI leaves the tree clean); ``python benchmarks/zoo.py`` runs this test with it set to
``benchmarks/ZOO.md``. Pairs run in architecture order and each model is built once (the
previous one is dropped). ``pytest -k "resnet18 and lrp"`` runs a subset.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from attriflow.explainers import REGISTRY
from tests.explainers.zoo_support import ARCHS, CASES, Outcome, Zoo, build, render_table, run_pair

NAMES = sorted(REGISTRY)
PAIRS = [(a, n) for a in ARCHS for n in NAMES]

_OUTCOMES: dict[tuple[str, str], Outcome] = {}
_BUILD_S: dict[str, float] = {}
_MODELS: dict[str, Zoo] = {}


_START: list[float] = []


def _write_table() -> None:
    """Write the table of the pairs run so far when ``ATTRIFLOW_ZOO_TABLE`` is set."""
    path = os.environ.get("ATTRIFLOW_ZOO_TABLE")
    if path and _OUTCOMES:
        Path(path).write_text(render_table(_OUTCOMES, _BUILD_S, time.perf_counter() - _START[0]))


@pytest.fixture(scope="module", autouse=True)
def _zoo_models():
    _START.append(time.perf_counter())
    yield
    _MODELS.clear()


def _zoo(arch: str) -> Zoo:
    if arch not in _MODELS:
        _MODELS.clear()  # one model at a time: VGG alone is half a gigabyte
        threads = torch.get_num_threads()
        _MODELS[arch] = build(arch)
        torch.set_num_threads(threads)
        _BUILD_S[arch] = _MODELS[arch].build_s
    return _MODELS[arch]


def test_every_explainer_has_a_case() -> None:
    assert set(CASES) == set(REGISTRY), "add the new explainer to zoo_support.CASES"


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "name"), PAIRS, ids=[f"{a}-{n}" for a, n in PAIRS])
def test_zoo(arch: str, name: str) -> None:
    outcome = run_pair(_zoo(arch), name)
    _OUTCOMES[(arch, name)] = outcome
    _write_table()  # after every pair, so an interrupted run still leaves its table
    if not outcome.passed:
        pytest.fail(f"{name} on {arch}: {outcome.detail}", pytrace=False)
