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

import numpy as np

from attriflow.tasks import storage
from attriflow.tasks.runtime import get_runtime
from attriflow.tasks.stages import evaluate, explain, load, neurons, sanity
from attriflow.tasks.stages.common import STORE_POINTER, accepted, entry_key, shard_views, store_path
from attriflow.tasks.stages.prepare import target

STAGES = ("load", "explain", "neurons", "evaluate", "sanity")


class _WorkFound(Exception):
    """Raised by the early-stopping plan at the first shard that would be computed."""


def _records(state: storage.StoreState | None, layout: storage.StoreLayout, recreated: list[str]) -> dict[str, np.ndarray]:
    """The store's records placed on the grown layout's axes (zeros where nothing is stored,
    and for the features a grow recreates)."""
    e, k = len(layout.entries), layout.n_shards
    out = {"load": np.zeros(k, np.uint64), "neurons": np.zeros(k, np.uint64), "sanity": np.zeros(e, np.uint64),
           "explain": np.zeros((e, k), np.uint64), "evaluate": np.zeros((e, k), np.uint64)}
    if state is None:
        return out
    e0, k0 = len(state.entries), -(-len(state.sample_keys) // layout.shard_size)
    for stage, arr in state.records.items():
        if stage in ("neurons", "sanity") and stage in recreated:
            continue
        if arr.ndim == 2:
            out[stage][:e0, :k0] = arr[:e0, :k0]
        else:
            n = e0 if stage == "sanity" else k0
            out[stage][:n] = arr[:n]
    if "preview" in recreated and layout.n_previews:
        out["load"][: -(-layout.n_previews // layout.shard_size)] = 0
    return out


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
        enough to know that a flow is needed.

    Returns
    -------
    dict
        ``store``: ``new`` (no store yet: everything is computed), ``ready``, ``grows``
        (entries or samples are appended), ``other-layout`` (the run would be refused; the
        reason in ``reason``) or, with ``stop_early``, ``work``; ``stages``: per stage
        ``{"computed": n, "reused": m}`` (``neurons`` / ``sanity`` are empty when disabled);
        ``explainers``: the same per explainer for explain, evaluate and sanity, with its
        ``entry``; ``inactive``: the stored entries the config does not use (kept);
        ``new_entries``, ``new_samples``, ``samples`` (configured), ``stored_samples``,
        ``recreated`` (features whose results are redone) and ``config_changed`` (the store
        was last prepared for another config: its selection and report are redone).

    Raises
    ------
    Exception
        The runtime's planning errors (model, data, explainers), as ``attriflow run``.
    """
    rt = get_runtime(config_json)
    cfg = rt.config
    path = store_path(run_dir)
    pointer = Path(run_dir) / STORE_POINTER
    url = cfg.store.url
    moved = bool(url) != pointer.exists() or (url and pointer.read_text().strip() != url)
    state = storage.read_state(path) if not moved and storage.exists(path) else None
    names = [e.name for e in cfg.explain.explainers]
    counts = {s: {"computed": 0, "reused": 0} for s in STAGES}
    per = {n: {"entry": entry_key(rt, n), **{s: {"computed": 0, "reused": 0} for s in ("explain", "evaluate", "sanity")}}
           for n in names}
    out: dict[str, Any] = {"store": "new", "stages": counts, "explainers": per, "inactive": [],
                           "new_entries": len(names), "new_samples": len(rt.source), "samples": len(rt.source),
                           "stored_samples": 0, "recreated": [], "config_changed": True,
                           "include_inactive": cfg.report.include_inactive}
    try:
        goal = target(config_json, state)
    except storage.StoreLayoutError as err:
        return {**out, "store": "other-layout", "reason": str(err)}
    layout = goal.layout
    if state is not None:
        out.update(store="grows" if goal.new_entries or goal.new_samples else "ready",
                   inactive=[e.key for e, a in zip(layout.entries, goal.active_order) if a < 0],
                   new_entries=goal.new_entries, new_samples=goal.new_samples,
                   stored_samples=len(state.sample_keys), recreated=goal.recreated,
                   config_changed=state.config_hash != cfg.digest())
    records = _records(state, layout, goal.recreated)

    def tally(stage: str, done: bool, name: str | None = None) -> None:
        if stop_early and not done:
            raise _WorkFound
        key = "reused" if done else "computed"
        counts[stage][key] += 1
        if name is not None:
            per[name][stage][key] += 1

    if stop_early and state is None:
        return {**out, "store": "new"}
    index = {e.key: i for i, e in enumerate(layout.entries)}
    try:
        _tally_all(rt, layout, records, [(n, index[per[n]["entry"]]) for n in names], tally)
    except _WorkFound:
        return {**out, "store": "work"}
    return out


def _tally_all(rt: Any, layout: storage.StoreLayout, records: dict[str, np.ndarray],
               entries: list[tuple[str, int]], tally: Any) -> None:
    cfg = rt.config
    after: dict[tuple[str, int], int] = {}  # explain record of (name, shard) once the run is done
    for view in shard_views(rt.source, layout.sample_keys, layout.shard_size):
        s = view.shard.index
        tally("load", accepted(int(records["load"][s]), load.candidates(rt, view)))
        if cfg.neurons.enabled:
            tally("neurons", accepted(int(records["neurons"][s]), neurons.candidates(rt, view)))
        for name, k in entries:
            cands = explain.candidates(rt, name, view)
            stored = int(records["explain"][k, s])
            done = accepted(stored, cands)
            tally("explain", done, name)
            after[(name, s)] = stored if done else cands[-1]
            tally("evaluate", accepted(int(records["evaluate"][k, s]), evaluate.candidates(rt, after[(name, s)], view)),
                  name)
    if cfg.sanity.enabled:
        keys, _ = sanity.sanity_samples(rt, layout.sample_keys)
        first = sanity.sanity_shards(rt, layout.sample_keys)
        for name, k in entries:
            rec = sanity.expected_record(rt, keys, [after[(name, s)] for s in first])
            tally("sanity", int(records["sanity"][k]) == rec, name)


def nothing_to_do(plan: dict[str, Any], run_dir: str | Path) -> bool:
    """Whether the run would compute nothing (so no flow is needed; when the config changed,
    the store's selection and the report are still redone, without Prefect)."""
    return (plan["store"] == "ready" and all(c["computed"] == 0 for c in plan["stages"].values())
            and (Path(run_dir) / "report" / "summary.md").exists())
