"""What a run would compute and reuse, found from the store's records before any work.

Every stage task skips a shard whose stored completion record equals the provenance digest
it would write (``expected_record`` in each stage's module). The plan computes those digests
for every (stage, explainer, shard) the same way, so it predicts the flow's receipts
exactly; it decodes the images (the load record covers them) but evaluates no model. A run
whose plan computes nothing needs neither Prefect nor its server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks import storage
from tasks.runtime import get_runtime
from tasks.stages import evaluate, explain, load, neurons, sanity
from tasks.stages.common import STORE_POINTER, store_path
from tasks.stages.prepare import _layout

STAGES = ("load", "explain", "neurons", "evaluate", "sanity")


class _WorkFound(Exception):
    """Raised by the early-stopping plan at the first shard that would be computed."""


def plan_run(config_json: str, run_dir: str | Path, stop_early: bool = False) -> dict[str, Any]:
    """Per stage, the shards a run of the config into ``run_dir`` would compute and reuse.

    Parameters
    ----------
    config_json : str
        The validated run config as JSON.
    run_dir : str or Path
        The run directory.
    stop_early : bool
        Stop at the first shard that would be computed (``store: "work"``, counts partial):
        enough to know that a flow is needed, without decoding every image.

    Returns
    -------
    dict
        ``store``: ``new`` (no store yet: everything is computed), ``ready``,
        ``other-layout`` (the run would be refused) or, with ``stop_early``, ``work``; ``stages``: per stage ``{"computed":
        n, "reused": m}`` (``neurons`` / ``sanity`` are empty when disabled); ``explainers``:
        the same per explainer for explain, evaluate and sanity.

    Raises
    ------
    Exception
        The runtime's planning errors (model, data, explainers), as ``attriflow run``.
    """
    rt = get_runtime(config_json)
    cfg = rt.config
    path = store_path(run_dir)
    pointer = Path(run_dir) / STORE_POINTER
    moved = bool(cfg.store) != pointer.exists() or (cfg.store and pointer.read_text().strip() != cfg.store)
    state = "new"
    records: dict[str, Any] = {}
    if not moved and storage.exists(path):
        state = "ready" if storage.read_layout_key(path) == _layout(config_json).key() else "other-layout"
        records = storage.read_records(path) if state == "ready" else {}
    names = [e.name for e in cfg.explain.explainers]
    shards = storage.plan_shards(len(rt.source), cfg.shard_size)
    counts = {s: {"computed": 0, "reused": 0} for s in STAGES}
    per = {n: {s: {"computed": 0, "reused": 0} for s in ("explain", "evaluate", "sanity")} for n in names}

    def tally(stage: str, done: bool, name: str | None = None) -> None:
        key = "reused" if done else "computed"
        if stop_early and not done:
            raise _WorkFound
        counts[stage][key] += 1
        if name is not None:
            per[name][stage][key] += 1

    def stored(stage: str, shard: int, k: int | None = None) -> int:
        arr = records.get(stage)
        if arr is None:
            return 0
        return int(arr[shard] if k is None else arr[k, shard])

    if stop_early and state != "ready":
        return {"store": state, "stages": counts, "explainers": per}
    try:
        _tally_all(rt, shards, names, stored, tally)
    except _WorkFound:
        return {"store": "work", "stages": counts, "explainers": per}
    return {"store": state, "stages": counts, "explainers": per}


def _tally_all(rt: Any, shards: list[Any], names: list[str], stored: Any, tally: Any) -> None:
    cfg = rt.config
    explain_expected: dict[tuple[int, int], int] = {}
    for s in shards:
        batch = rt.source.load(s.start, s.stop)
        load_rec = load.expected_record(rt, batch)
        tally("load", stored("load", s.index) == load_rec)
        if cfg.neurons.enabled:
            tally("neurons", stored("neurons", s.index) == neurons.expected_record(rt, load_rec))
        for k, name in enumerate(names):
            exp_rec = explain.expected_record(rt, name, load_rec)
            explain_expected[(k, s.index)] = exp_rec
            tally("explain", stored("explain", s.index, k) == exp_rec, name)
            tally("evaluate", stored("evaluate", s.index, k) == evaluate.expected_record(rt, exp_rec), name)
    if cfg.sanity.enabled:
        first = sanity.sanity_shards(rt)
        for k, name in enumerate(names):
            rec = sanity.expected_record(rt, [explain_expected[(k, s.index)] for s in first])
            tally("sanity", stored("sanity", k) == rec, name)


def nothing_to_do(plan: dict[str, Any], run_dir: str | Path) -> bool:
    """Whether the run would compute nothing and its report exists (so no flow is needed)."""
    return (plan["store"] == "ready" and all(c["computed"] == 0 for c in plan["stages"].values())
            and (Path(run_dir) / "report" / "summary.md").exists())
