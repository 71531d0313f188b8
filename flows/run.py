"""The ``run_experiment`` flow: prepare -> load -> explain -> {evaluate, sanity} (+ neurons) -> report."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from attriflow.tasks.config import RunConfig, RunnerConfig
from attriflow.tasks.runtime import failure_of, is_deterministic, retry_transient
from attriflow.tasks.stages import (
    evaluate_shard,
    explain_shard,
    load_shard,
    prepare_run,
    sanity_check,
    select_neurons,
    write_report,
)
from attriflow.tasks.storage import Shard, run_lock

#: Set by the CLI's SIGINT handler (:func:`interrupt`). The waits of the flow check it, so
#: that a Ctrl-C whose ``KeyboardInterrupt`` was swallowed (raised inside a logging call
#: of Prefect's, say) still stops the run at the next wait.
INTERRUPTED = threading.Event()


INTERRUPT_NOTICE = ("attriflow: interrupted: letting the running shard tasks finish (Ctrl-C again to stop at "
                    "once)")


def interrupt(signum: int, frame: Any) -> None:
    """SIGINT handler of ``attriflow run``. The first: note the interrupt, say at once what
    happens next, and raise ``KeyboardInterrupt`` as Python's default handler does (the run
    lets its running shard tasks finish). The second: :func:`exit_now` with status 130."""
    if INTERRUPTED.is_set():  # the second: exit now, whatever is running
        print("attriflow: interrupted at once: finished shards are kept; run the same command to resume",
              file=sys.stderr, flush=True)
        exit_now(130)
    INTERRUPTED.set()
    print(INTERRUPT_NOTICE, file=sys.stderr, flush=True)
    raise KeyboardInterrupt


def exit_now(code: int) -> None:
    """Leave the process at once (``os._exit``: no waiting for task threads still inside the
    model, whose interpreter shutdown can abort inside torch's thread pool), after stopping
    the temporary Prefect server and clearing the run directory's lock."""
    import os

    from attriflow.flows.server import stop_temporary_servers
    from attriflow.tasks.storage import clear_held_locks

    stop_temporary_servers()
    clear_held_locks()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` when :data:`INTERRUPTED` is set. (The flow function calls
    this rather than reading the event: Dask's client pickles the flow function by value,
    and an event holds a lock, which cannot be pickled.)"""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


def _wait(fut: PrefectFuture[Any]) -> None:
    """``fut.wait()``, polling :data:`INTERRUPTED` twice a second.

    Raises
    ------
    KeyboardInterrupt
        Once :data:`INTERRUPTED` is set.
    """
    inner = getattr(fut, "wrapped_future", None)
    while not INTERRUPTED.is_set():
        if inner is None:
            fut.wait()
            return
        fut.wait(0.5)
        if inner.done():
            fut.wait()  # the future's final state, read from its result
            return
    raise KeyboardInterrupt


class RunFailedError(RuntimeError):
    """Some shards failed; finished shards are kept and a rerun does only the rest."""


def failure_message(failed: list[tuple[str, str]], retries: int) -> str:
    """What failed and what to do, from (description, kind) pairs, kind one of
    ``deterministic`` (an error a rerun would repeat: not retried; its cause must be fixed),
    ``transient`` (still failing after the retries: "rerun to finish"), ``lost`` (crashed,
    cancelled, or its worker lost: "rerun to finish") and ``upstream`` (not run because a task
    it waits for did not finish)."""
    groups = {kind: [label for label, k in failed if k == kind]
              for kind in ("deterministic", "transient", "lost", "upstream")}
    parts = [f"{len(failed)} shard task(s) did not finish; finished shards are kept"]
    if groups["deterministic"]:
        parts.append(f"{len(groups['deterministic'])} failed with an error that a rerun would repeat (not "
                     "retried): fix its cause, then run the same command: "
                     + "; ".join(groups["deterministic"]))
    if groups["transient"]:
        tries = f"after {retries} retr{'y' if retries == 1 else 'ies'}" if retries else "(runner.retries: 0)"
        parts.append(f"{len(groups['transient'])} failed {tries}; rerun to finish: "
                     + "; ".join(groups["transient"]))
    if groups["lost"]:
        parts.append(f"{len(groups['lost'])} crashed, were cancelled or lost their worker; rerun to finish: "
                     + "; ".join(groups["lost"]))
    if groups["upstream"]:
        parts.append(f"{len(groups['upstream'])} not run because a task they wait for did not finish: "
                     + "; ".join(groups["upstream"]))
    return ". ".join(parts)


def _collect(stage: str, futures: Iterable[tuple[str, PrefectFuture[Any]]], started: float
             ) -> list[tuple[str, str]]:
    """Wait for futures with a progress bar (on a terminal); then one line in the flow run's
    log (shown by the Prefect UI and on the console, terminal or not) with the counts and the
    seconds since the run started. Returns (description, kind) of each task that did not
    finish, kind as :func:`failure_message` reads it (deterministic errors,
    :func:`~attriflow.tasks.runtime.is_deterministic`, were not retried)."""
    from prefect import get_run_logger

    items = list(futures)
    failed = []
    with tqdm(total=len(items), desc=stage, unit="shard", file=sys.stderr, disable=None) as bar:
        for label, fut in items:
            _wait(fut)
            state = fut.state
            if not state.is_completed():
                kind = ("upstream" if state.is_pending() else "lost" if not state.is_failed() else
                        "deterministic" if is_deterministic(failure_of(state)) else "transient")
                said = label if kind == "upstream" else f"{label} ({state.name}: {state.message or ''})"
                failed.append((said, kind))  # (Prefect's message for a task not run names task-run ids)
            bar.update(1)
    if items:
        get_run_logger().info(
            f"{stage}: {len(items) - len(failed)}/{len(items)} shard task(s) done"
            f"{f', {len(failed)} failed' if failed else ''} ({time.perf_counter() - started:.1f} s into the run)")
    return failed


def _tag_flow_run(names: list[str]) -> None:
    """Tag the current flow run (not its task runs: Prefect checks every tagged task run
    against tag concurrency limits, a server round trip and a lease per task, which cost
    about 2 s per shard task on a local server). Tags only label the run: a server that
    refuses them is logged as a warning, and the run goes on."""
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=[*flow_run.tags, *names])
    except Exception as err:  # noqa: BLE001 - labels, not results
        get_run_logger().warning(f"could not tag the flow run with {names}: {err}")


def run_tags(config: RunConfig) -> list[str]:
    """The Prefect tags of a run's flow run: its name, model and explainers."""
    model = config.model
    source = model.factory or model.program or model.arch
    return [f"run:{config.name}", f"model:{source}", *dict.fromkeys(f"explainer:{e.method}"
                                                                     for e in config.explain.explainers)]


def make_task_runner(runner: RunnerConfig) -> Any:
    """The Prefect task runner of a run: a thread pool here, or Prefect's Dask task runner
    on a new ``LocalCluster`` of worker processes or on an existing scheduler."""
    if runner.kind == "local":
        return ThreadPoolTaskRunner(max_workers=runner.threads)
    from prefect_dask import DaskTaskRunner

    if runner.address:
        return DaskTaskRunner(address=runner.address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": runner.workers, "threads_per_worker": runner.threads, "processes": True,
                        "dashboard_address": None},
    )


def execute(config: RunConfig, run_dir: str) -> dict[str, Any]:
    """Run (or resume) ``config`` into ``run_dir`` on the task runner its ``runner`` names."""
    import logging

    # the stage lines are INFO records of the flow run's logger: shown in the UI and on the
    # console even where the CLI quiets Prefect (PREFECT_LOGGING_LEVEL=WARNING hides the
    # per-task chatter, which stays hidden)
    flow_logger = logging.getLogger("prefect.flow_runs")
    level = flow_logger.level
    if flow_logger.getEffectiveLevel() > logging.INFO:
        flow_logger.setLevel(logging.INFO)
    run_name = f"{config.name}-{config.digest()[:8]}"
    # a callable: Prefect formats a string name as a template ("{" in a run name)
    named = run_experiment.with_options(task_runner=make_task_runner(config.runner), flow_run_name=lambda: run_name)
    try:
        return named(config, run_dir)
    finally:
        flow_logger.setLevel(level)  # as it was (a notebook's own logging settings)


@flow(name="attriflow-run", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=False)
def run_experiment(config: RunConfig, run_dir: str) -> dict[str, Any]:
    """Run (or resume) the whole pipeline into ``run_dir``.

    Parameters
    ----------
    config : RunConfig
        The validated configuration.
    run_dir : str
        Where the store, the manifest and the report go.

    Returns
    -------
    dict
        Store path, report path and per-stage counts of computed and reused shards.

    Raises
    ------
    RunFailedError
        Naming the shards that failed (all others are complete and kept).
    """
    _tag_flow_run(run_tags(config))
    config_json = config.model_dump_json()
    retry = {"retries": config.runner.retries, "retry_delay_seconds": config.runner.retry_delay_seconds,
             "retry_condition_fn": retry_transient}  # errors a retry would repeat are not retried
    load_task, explain_task, neurons_task, evaluate_task, sanity_task = (
        t.with_options(**retry) for t in (load_shard, explain_shard, select_neurons, evaluate_shard, sanity_check))
    started = time.perf_counter()
    with run_lock(Path(run_dir)):
        plan = prepare_run(config_json, run_dir)
        shards = [Shard(*s) for s in plan["shards"]]
        loads = {s.index: load_task.submit(config_json, run_dir, s) for s in shards}
        explains = {
            (e, s.index): explain_task.submit(config_json, run_dir, e, s, wait_for=[loads[s.index]])
            for e in plan["explainers"] for s in shards
        }
        neurons = {
            s.index: neurons_task.submit(config_json, run_dir, s, wait_for=[loads[s.index]])
            for s in shards if config.neurons.enabled
        }
        evals = {
            key: evaluate_task.submit(config_json, run_dir, key[0], s, wait_for=[explains[key]])
            for key in explains for s in shards if s.index == key[1]
        }
        first = [s for s in shards if s.index in plan["sanity_shards"]]
        sanity = {
            e: sanity_task.submit(config_json, run_dir, e, wait_for=[explains[(e, s.index)] for s in first])
            for e in plan["explainers"] if config.sanity.enabled
        }
        failed = _collect("load", ((f"load shard {i}", f) for i, f in loads.items()), started)
        failed += _collect("explain", ((f"explain {e} shard {i}", f) for (e, i), f in explains.items()), started)
        failed += _collect("neurons", ((f"neurons shard {i}", f) for i, f in neurons.items()), started)
        failed += _collect("evaluate", ((f"evaluate {e} shard {i}", f) for (e, i), f in evals.items()), started)
        failed += _collect("sanity", ((f"sanity {e}", f) for e, f in sanity.items()), started)
        wait([*evals.values(), *sanity.values()])
        _raise_if_interrupted()  # a Ctrl-C swallowed after the last wait: no report, exit as interrupted
        report = write_report(run_dir)
        from prefect import get_run_logger

        get_run_logger().info(f"report: {Path(report).with_name('index.html')} "
                              f"({time.perf_counter() - started:.1f} s into the run)")
        counts: dict[str, dict[str, int]] = {}
        stages: tuple[tuple[str, dict[Any, PrefectFuture[Any]]], ...] = (
            ("load", loads), ("explain", explains), ("neurons", neurons), ("evaluate", evals),
            ("sanity", sanity))
        for stage, futs in stages:
            done = [f.result() for f in futs.values() if f.state.is_completed()]
            counts[stage] = {
                "computed": sum(not r["skipped"] for r in done),
                "reused": sum(r["skipped"] for r in done),
                "failed": len(futs) - len(done),
            }
        if failed:
            raise RunFailedError(failure_message(failed, config.runner.retries))
        return {"store": plan["store"], "report": report, "counts": counts}
