"""The ``attriflow`` command line: run, plan, gc, migrate, status, methods, report, train-reference."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _fail(message: str, code: int = 2) -> int:
    print(f"attriflow: error: {message}", file=sys.stderr)
    return code


def _finished_answer(args: argparse.Namespace) -> int | None:
    """Answer a rerun of a finished run from its marker (:mod:`tasks.finished`) without
    loading torch, Prefect or the store; None when the full check is needed (also when
    runner options are given: the full path validates them)."""
    from attriflow.tasks import finished

    if args.dask_address or args.dask_workers is not None or args.retries is not None:
        return None
    try:
        raw = finished.read_raw(args.config)
        run_dir = (Path(args.run_dir) if args.run_dir else finished.default_run_dir(raw)).resolve()
        counts = finished.check(run_dir, finished.config_key(raw, args.config, run_dir))
    except Exception:  # noqa: BLE001 - any doubt: the full path checks (and reports a bad file properly)
        return None
    if counts is None:
        return None
    print(f"nothing to compute: every shard of {run_dir} is finished and its report written")
    _print_counts(counts)
    return 0


def _snapshot(args: argparse.Namespace, raw: Any, cfg: Any, run_dir: Path) -> dict[str, Any] | None:
    """The finished marker's stamps of this run's config, code and inputs, taken before the
    runtime reads any input; None when they cannot be taken (then no marker is left)."""
    from attriflow.tasks import finished

    try:
        files, roots = finished.inputs_of(cfg, raw)
        return finished.snapshot(finished.config_key(raw, args.config, run_dir), files, roots, run_dir)
    except Exception:  # noqa: BLE001 - no marker, never a failed run
        return None


def _leave_marker(run_dir: Path, before: dict[str, Any] | None, counts: dict[str, dict[str, int]],
                  source: Any) -> None:
    """After a run (or a full check) that left nothing to compute: the finished marker,
    unless the config, code or inputs changed since ``before`` or the dataset read a file
    that was not stamped."""
    from attriflow.tasks import finished

    if before is None:
        return
    totals = {stage: {"computed": 0, "reused": c.get("computed", 0) + c.get("reused", 0)}
              for stage, c in counts.items()}
    try:
        finished.write(run_dir, before, totals, getattr(source, "files", ()))
    except OSError:
        pass  # no marker: the next rerun takes the full check


def cmd_run(args: argparse.Namespace) -> int:
    answered = _finished_answer(args)
    if answered is not None:
        return answered
    from attriflow.tasks import finished
    from attriflow.tasks.config import ConfigError, load_config, parse_config

    try:
        raw = finished.read_raw(args.config)  # what the marker stamps: the config as this run read it
    except Exception:  # noqa: BLE001 - load_config below says what is wrong with the file
        raw = None
    try:  # the config as read once: what runs is what the marker stamps
        cfg = parse_config(raw, repr(str(args.config))) if raw is not None else load_config(args.config)
        cfg = with_runner_options(cfg, args)
    except ConfigError as err:
        return _fail(str(err))
    run_dir = Path(args.run_dir or Path("runs") / cfg.name).resolve()
    from attriflow.tasks.runtime import get_runtime, planning_errors
    from attriflow.tasks.stages.plan import nothing_to_do, plan_run
    from attriflow.tasks.storage import RunLockedError, run_lock

    # the finished marker's stamps, before the runtime reads any input
    before = _snapshot(args, raw, cfg, run_dir) if raw is not None or args.config is None else None
    try:  # model, data and explainers checked before Prefect starts or the run directory exists
        rt = get_runtime(cfg.model_dump_json())  # cached: the flow in this process reuses it
    except planning_errors() as err:
        return _fail(str(err), 1)
    skipped = rt.source.skipped
    if skipped:  # said now, not only at the end of the report
        shown = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
        more = f"; ... ({len(skipped)} in all, listed in the manifest and the report)" if len(skipped) > 3 else ""
        print(f"attriflow: warning: {len(skipped)} input file(s) skipped: {shown}{more}", file=sys.stderr)

    try:
        with run_lock(run_dir):  # fail at once, before Prefect starts
            plan = plan_run(cfg.model_dump_json(), run_dir, stop_early=True)
            if plan["store"] == "other-layout":  # a store this config cannot grow: said before Prefect starts
                return _fail(plan["reason"], 1)
            if (run_dir / "report" / "summary.md").exists():  # a finished run: no flow, no Prefect server
                if nothing_to_do(plan, run_dir):
                    if plan["config_changed"]:  # e.g. a dropped explainer: new selection, new report
                        from attriflow.tasks.stages import prepare_run, render_report

                        prepare_run.fn(cfg.model_dump_json(), str(run_dir))
                        render_report(run_dir)
                        print(f"nothing to compute: every shard of {run_dir} is finished; the store's selection "
                              "and the report were updated for this config")
                    else:
                        print(f"nothing to compute: every shard of {run_dir} is finished and its report written")
                    _print_counts(plan["stages"])
                    _leave_marker(run_dir, before, plan["stages"], rt.source)
                    return 0
            # the flow takes the same lock again in this process (re-entrant)
            code, counts = _run_flow(cfg, run_dir)
            if code == 0 and counts is not None and not any(c.get("failed") for c in counts.values()):
                _leave_marker(run_dir, before, counts, rt.source)
            return code
    except RunLockedError as err:
        return _fail(str(err))


def _print_counts(counts: dict[str, dict[str, int]]) -> None:
    for stage, c in counts.items():
        print(f"{stage:>9}: {c['computed']} computed, {c['reused']} reused")


def cmd_plan(args: argparse.Namespace) -> int:
    """What ``attriflow run`` would compute and reuse, per stage and explainer; no work done."""
    from attriflow.tasks.config import ConfigError, load_config
    from attriflow.tasks.runtime import planning_errors
    from attriflow.tasks.stages.plan import plan_run

    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        return _fail(str(err))
    run_dir = Path(args.run_dir or Path("runs") / cfg.name).resolve()
    try:
        plan = plan_run(cfg.model_dump_json(), run_dir)
    except planning_errors() as err:
        return _fail(str(err), 1)
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    print_plan(plan, run_dir)
    return 1 if plan["store"] == "other-layout" else 0


def print_plan(plan: dict[str, Any], run_dir: Path) -> None:
    """The plan in words: the store's state, counts per stage and explainer, what is kept inactive."""
    state = {"new": "no store yet: everything is computed",
             "ready": "store found: finished shards are reused",
             "grows": (f"store found; it grows by {plan['new_entries']} entr{'y' if plan['new_entries'] == 1 else 'ies'}"
                       f" and {plan['new_samples']} sample(s); finished shards are reused"),
             "other-layout": f"`attriflow run` would refuse this run directory: {plan.get('reason', '')}"}
    print(f"{run_dir}: {state[plan['store']]}")
    if plan["store"] == "other-layout":
        return
    if plan["stored_samples"]:
        grows = f", {plan['new_samples']} to add" if plan["new_samples"] else ""
        print(f"  samples: {plan['samples']} configured; the store holds {plan['stored_samples']}{grows}")
    _print_counts(plan["stages"])
    for name, stages in plan["explainers"].items():
        parts = ", ".join(f"{st} {c['computed']} computed / {c['reused']} reused" for st, c in stages.items()
                          if isinstance(c, dict) and (c["computed"] or c["reused"]))
        print(f"  {name} ({stages['entry']}): {parts}")
    for feature in plan["recreated"]:
        print(f"  {feature}: its settings changed; its results are redone")
    if plan["inactive"]:
        shown = "in the report (report.include_inactive)" if plan.get("include_inactive") else "not in the report"
        print(f"  kept inactive (in the store, {shown}; `attriflow gc` lists and removes them): "
              f"{', '.join(plan['inactive'])}")


def with_runner_options(cfg: Any, args: argparse.Namespace) -> Any:
    """Apply ``--dask-workers`` / ``--dask-address`` / ``--retries`` over the config's runner."""
    from attriflow.tasks.config import parse_config

    runner = dict(cfg.runner.model_dump())
    if args.dask_address:
        runner.update(kind="dask", address=args.dask_address)
    if args.dask_workers is not None:
        runner.update(kind="dask", workers=args.dask_workers)
    if args.retries is not None:
        runner["retries"] = args.retries
    if runner == cfg.runner.model_dump():
        return cfg
    return parse_config({**cfg.model_dump(mode="json"), "runner": runner}, "the command line")


def _run_flow(cfg: Any, run_dir: Path) -> tuple[int, dict[str, dict[str, int]] | None]:
    """Run the flow; (exit code, per-stage counts of a run that finished). A first Ctrl-C
    (SIGINT) lets the running shard tasks finish and exits 130 saying how to resume; a second
    one exits at once."""
    import signal
    import threading

    from attriflow.flows.run import INTERRUPTED, interrupt

    INTERRUPTED.clear()
    handler = signal.getsignal(signal.SIGINT)
    # only over Python's own handler: an ignored SIGINT (a background job of a script) stays ignored
    ours = threading.current_thread() is threading.main_thread() and handler is signal.default_int_handler
    if ours:  # a Ctrl-C is noted even where its KeyboardInterrupt is swallowed
        signal.signal(signal.SIGINT, interrupt)
    try:
        return _execute_flow(cfg, run_dir)
    finally:
        if ours:
            signal.signal(signal.SIGINT, handler)
        INTERRUPTED.clear()


def _execute_flow(cfg: Any, run_dir: Path) -> tuple[int, dict[str, dict[str, int]] | None]:
    from attriflow.flows.run import INTERRUPT_NOTICE, INTERRUPTED, RunFailedError, execute
    from attriflow.flows.server import ServerStartError, prefect_api
    from attriflow.tasks.runtime import planning_errors
    from attriflow.tasks.storage import StoreLayoutError

    try:
        with prefect_api(stop_at_exit=True):  # PREFECT_API_URL, or a temporary server that dies with us
            try:
                result = execute(cfg, str(run_dir))
            except KeyboardInterrupt:
                if not INTERRUPTED.is_set():  # the handler says it at once; without it, say it now
                    print(INTERRUPT_NOTICE, file=sys.stderr, flush=True)
                _join_task_threads()
                return _fail(f"interrupted: finished shards are kept in {run_dir}; run the same command to "
                             "resume (`attriflow plan` shows what is left)", 130), None
    except KeyboardInterrupt:  # while the server starts or stops (a second Ctrl-C exits in the handler)
        return _fail(f"interrupted: finished shards are kept in {run_dir}; run the same command to resume", 130), None
    except (RunFailedError, StoreLayoutError, ServerStartError, *planning_errors()) as err:
        return _fail(str(err), 1), None
    print(f"store:   {result['store']}")
    print(f"report:  {Path(result['report']).with_name('index.html')} (self-contained, opens offline)")
    print(f"summary: {result['report']}")
    _print_counts(result["counts"])
    return 0, result["counts"]


def _join_task_threads(timeout: float = 300.0) -> None:
    """Wait for the task runner's worker threads (their running shard tasks) to end, so that
    they finish writing and logging while the Prefect API is still there."""
    import threading
    import time

    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon and t.name.startswith("ThreadPoolExecutor"):
            t.join(max(0.0, deadline - time.monotonic()))


def status_of(run_dir: Path) -> dict[str, Any]:
    """Done and total shards per stage and explainer of the store's current config (the shards
    holding its samples; its entries), read from the store's records."""
    import numpy as np

    from attriflow.tasks.stages import store_path
    from attriflow.tasks.storage import exists, open_dataset, read_records

    path = store_path(run_dir)
    if not exists(path):
        raise FileNotFoundError(f"no store at {str(path)!r}")
    ds = open_dataset(path)
    records = read_records(path)
    size = int(json.loads(ds.attrs["fixed"])["shard_size"])
    shards = np.unique(np.flatnonzero(ds["sample_order"].values >= 0) // size)
    order = ds["active_order"].values
    active = [int(i) for i in np.flatnonzero(order >= 0)[np.argsort(order[order >= 0], kind="stable")]]
    names = [str(ds["explainer"].values[i]) for i in active]
    n_shards = len(shards)
    out: dict[str, Any] = {"run_dir": str(run_dir), "n_samples": int((ds["sample_order"].values >= 0).sum()),
                           "stored_samples": int(ds.sizes["sample"]), "n_shards": n_shards,
                           "inactive": [str(x) for x in ds["entry"].values[order < 0]], "stages": {}}
    out["stages"]["load"] = {"done": int((records["load"][shards] != 0).sum()), "total": n_shards}
    if "neurons" in records:
        out["stages"]["neurons"] = {"done": int((records["neurons"][shards] != 0).sum()), "total": n_shards}
    if "sanity" in records:
        out["stages"]["sanity"] = {name: {"done": int(records["sanity"][i] != 0), "total": 1}
                                   for i, name in zip(active, names)}
    for stage in ("explain", "evaluate"):
        out["stages"][stage] = {name: {"done": int((records[stage][i][shards] != 0).sum()), "total": n_shards}
                                for i, name in zip(active, names)}
    return out


def cmd_status(args: argparse.Namespace) -> int:
    try:
        st = status_of(Path(args.run_dir))
    except FileNotFoundError as err:
        return _fail(str(err))
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"{st['run_dir']}: {st['n_samples']} samples in {st['n_shards']} shards")
    if st["inactive"]:
        print(f"  kept inactive: {', '.join(st['inactive'])}")
    load = st["stages"]["load"]
    print(f"  load      {load['done']}/{load['total']}")
    if "neurons" in st["stages"]:
        print(f"  neurons   {st['stages']['neurons']['done']}/{st['stages']['neurons']['total']}")
    for stage in ("explain", "evaluate", "sanity"):
        for name, c in st["stages"].get(stage, {}).items():
            print(f"  {stage:<9} {name:<24} {c['done']}/{c['total']}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """List the store's inactive entries; with ``--delete``, remove them."""
    from attriflow.tasks.stages import store_path
    from attriflow.tasks.storage import RunLockedError, exists, inactive_entries, remove_inactive, run_lock

    run_dir = Path(args.run_dir)
    path = store_path(run_dir)
    if not exists(path):
        return _fail(f"no store at {str(path)!r}")
    try:
        with run_lock(run_dir):
            rows = inactive_entries(path)
            if args.json and not args.delete:
                print(json.dumps(rows, indent=2))
                return 0
            if not rows:
                print(f"{run_dir}: no inactive entry")
                return 0
            for r in rows:
                size = "" if r["attribution_bytes"] is None else f", {r['attribution_bytes'] / 2**20:.1f} MiB of maps"
                print(f"  {r['entry']:<28} {r['method']} {json.dumps(r['params'])} "
                      f"({r['explain_shards_done']} explain shard(s) done{size})")
            if not args.delete:
                print(f"{len(rows)} inactive entr{'y' if len(rows) == 1 else 'ies'}; `attriflow gc {run_dir} --delete` "
                      "removes them")
                return 0
            try:
                removed = remove_inactive(path)
            except ValueError as err:
                return _fail(str(err))
            print(f"removed {len(removed)} inactive entr{'y' if len(removed) == 1 else 'ies'}")
            if (run_dir / "report" / "summary.md").exists():  # it may have shown them (report.include_inactive)
                from attriflow.tasks.stages import render_report

                print(f"report:  {render_report(run_dir).with_name('index.html')} (rewritten)")
            return 0
    except RunLockedError as err:
        return _fail(str(err))


def cmd_migrate(args: argparse.Namespace) -> int:
    """Convert a store written by an older attriflow (schema 2) in place."""
    from attriflow.tasks.migrate import MigrationError, migrate
    from attriflow.tasks.storage import RunLockedError, run_lock

    run_dir = Path(args.run_dir)
    try:
        with run_lock(run_dir):
            result = migrate(run_dir)
    except (MigrationError, RunLockedError, FileNotFoundError) as err:
        return _fail(str(err))
    if result.get("current"):
        print(f"{run_dir}: the store already has schema 3; nothing to migrate")
        return 0
    print(f"migrated {run_dir} to store schema 3 (old metadata in {result['backup']})")
    for stage, kept in result["kept"].items():
        print(f"{stage:>9}: {kept} record(s) kept, {result['cleared'][stage]} to redo")
    return 0


def methods_table() -> list[dict[str, Any]]:
    """Every registered explainer with its family, taxonomy path, access and costs."""
    from attriflow.explainers import list_explainers

    rows = []
    for cls in list_explainers():
        spec = cls.spec
        params = {k: (f.default if not callable(f.default) else None)
                  for k, f in cls.Params.model_fields.items()}
        rows.append({
            "name": spec.name, "family": str(spec.family), "taxonomy": spec.taxonomy,
            "access": list(spec.access), "stochastic": spec.stochastic, "version": spec.version,
            "summary": spec.summary, "default_params": params,
            "cost_per_image": cls.estimate_cost(cls.Params()),
        })
    return rows


def resolved_explainers(config: str) -> list[dict[str, Any]]:
    """The explainers of a config with the parameters resolved on its model and data
    (automatic layers included), without running anything."""
    from attriflow.tasks.config import load_config
    from attriflow.tasks.runtime import get_runtime

    cfg = load_config(config)
    rt = get_runtime(cfg.model_dump_json())
    return [
        {"name": e.name, "method": e.method, "family": str(rt.explainers[e.name].spec.family),
         "params": rt.explainers[e.name].params(), "cost_per_image": rt.explainers[e.name].cost()}
        for e in cfg.explain.explainers
    ]


def cmd_methods(args: argparse.Namespace) -> int:
    if args.config:
        from attriflow.tasks.config import ConfigError

        try:
            rows_cfg = resolved_explainers(args.config)
        except (ConfigError, KeyError, ValueError) as err:
            return _fail(str(err))
        if args.json:
            print(json.dumps(rows_cfg, indent=2, default=str))
        else:
            for r in rows_cfg:
                print(f"{r['name']:<24} [{r['family']}] {json.dumps(r['params'], default=str)}")
        return 0
    rows = methods_table()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    from attriflow.explainers import TAXONOMY, Family

    for family in Family:
        members = [r for r in rows if r["family"] == family.value]
        if not members:
            continue
        print(f"{TAXONOMY[family]}  [{family.value}]")
        for i, r in enumerate(members):
            branch = "└──" if i == len(members) - 1 else "├──"
            cost = r["cost_per_image"]
            passes = f"{cost['forward']} fwd + {cost['backward']} bwd per image"
            print(f"  {branch} {r['name']:<20} {r['summary']}  [needs {', '.join(r['access']) or 'no model'}; {passes}]")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from attriflow.tasks.stages import render_comparison, render_report, store_path
    from attriflow.tasks.storage import exists

    for run_dir in args.run_dirs:
        if not exists(store_path(run_dir)):
            return _fail(f"no store at {str(store_path(run_dir))!r}")
    if len(args.run_dirs) == 1:
        if args.out:
            return _fail("--out is for comparisons (several run directories); one run's report goes to RUN_DIR/report")
        path = render_report(args.run_dirs[0], svg=True if args.svg else None)
        print(f"report:  {path.with_name('index.html')}")
        print(f"summary: {path}")
        return 0
    out = Path(args.out) if args.out else Path(args.run_dirs[0]).parent / (
        "compare-" + "-vs-".join(Path(r).resolve().name for r in args.run_dirs))
    page, warnings = render_comparison(args.run_dirs, out)
    for warning in warnings:  # said on the console too, not only at the top of the page
        print(f"attriflow: warning: {warning}", file=sys.stderr)
    print(f"comparison: {page}")
    return 0


def cmd_train_reference(args: argparse.Namespace) -> int:
    from attriflow.data import REFERENCE_RECORD, REFERENCE_WEIGHTS
    from attriflow.tasks.models import train_reference

    out = Path(args.out) if args.out else REFERENCE_WEIGHTS
    record = Path(args.out).with_suffix(".json") if args.out else REFERENCE_RECORD
    train_reference(out, record)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attriflow", description="Explain image-classification CNNs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run or resume the pipeline")
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded default run)")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    p.add_argument("--dask-workers", type=int, metavar="N",
                   help="run the shards on a new Dask LocalCluster of N worker processes")
    p.add_argument("--dask-address", metavar="ADDR",
                   help="run the shards on an existing Dask scheduler (e.g. tcp://10.0.0.5:8786)")
    p.add_argument("--retries", type=int, metavar="K", help="retries of a failing shard task (default: runner.retries)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("plan", help="what `run` would compute and reuse, before any work")
    p.add_argument("config", nargs="?", help="YAML config (default: the embedded default run)")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("gc", help="list the store's inactive entries (dropped explainers, earlier settings); "
                                  "--delete removes them")
    p.add_argument("run_dir")
    p.add_argument("--delete", action="store_true", help="remove the inactive entries from the store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("migrate", help="convert a run directory's store written by an older attriflow in place")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("status", help="done/total shards per stage and explainer")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("methods", help="the registered explainers by taxonomy")
    p.add_argument("--json", action="store_true")
    p.add_argument("--config", help="show this config's explainers with parameters resolved on its model "
                                    "(automatic layers included)")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("report", help="regenerate a run's report from its store, or compare several runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="one run directory (report into RUN_DIR/report) or several (side-by-side comparison)")
    p.add_argument("--out", help="comparison output directory (default: compare-A-vs-B next to the first run)")
    p.add_argument("--svg", action="store_true", help="also write every figure as SVG (default: the run's report.svg)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("train-reference", help="train the shipped reference CNN")
    p.add_argument("--out", help="weights path (default: data/reference_cnn.pt)")
    p.set_defaults(func=cmd_train_reference)
    return parser


#: glibc malloc settings that keep large freed buffers in the process instead of returning
#: them to the kernel and page-faulting them back on the next batch (perf-cpu.md: the
#: default run went from 96 s to 81 s with identical stores).
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=68719476736"


def allocator_env(environ: dict[str, str], platform: str, libc: str) -> dict[str, str] | None:
    """The environment to re-execute with so that the allocator settings apply from the
    interpreter's start (glibc reads them only then), or None when nothing should change:
    not Linux/glibc, the user set ``GLIBC_TUNABLES`` already, or ``ATTRIFLOW_ALLOCATOR=default``."""
    if platform != "linux" or libc != "glibc" or "GLIBC_TUNABLES" in environ:
        return None
    if environ.get("ATTRIFLOW_ALLOCATOR", "tuned") != "tuned":
        return None
    return {**environ, "GLIBC_TUNABLES": GLIBC_TUNABLES}


#: The program of the re-executed command: the console script's ``main`` with the working
#: directory off the import path.
REEXEC = ("import sys; sys.path.pop(0); sys.argv[0] = 'attriflow'; "
          "from attriflow.flows.cli import main; sys.exit(main())")


def _reexec_with_tuned_allocator(command: str) -> None:
    import platform as _platform

    if command not in ("run", "report"):
        return
    env = allocator_env(dict(os.environ), sys.platform, _platform.libc_ver()[0])
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        # not ``python -m``, which puts the working directory first on the path: an attriflow/
        # folder there (a checkout, a copy) would replace the installed package; ``-c`` puts
        # "" there, removed before the import, as the console script's own path has no cwd
        os.execve(sys.executable, [sys.executable, "-c", REEXEC, *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``attriflow`` console script (re-executes itself once, before any
    work, with the tuned allocator settings of :data:`GLIBC_TUNABLES`; the same pid)."""
    args = build_parser().parse_args(argv)
    if argv is None:
        _reexec_with_tuned_allocator(args.command)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # runs are offline; no telemetry banner
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # the Dask runner's workers inherit it
    try:
        code = int(args.func(args))
    except BrokenPipeError:  # `attriflow plan ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:  # before any work started (importing, checking the config)
        print("attriflow: interrupted before any shard task started", file=sys.stderr, flush=True)
        code = 130
    if code == 130 and argv is None and _running_task_threads():
        from attriflow.flows.run import exit_now

        exit_now(130)  # task threads still in the model: do not wait for them at shutdown
    return code


def _running_task_threads() -> bool:
    """Whether a task runner's worker thread is still running (a shard task in progress)."""
    import threading

    return any(t.is_alive() and not t.daemon and t.name.startswith("ThreadPoolExecutor")
               for t in threading.enumerate() if t is not threading.main_thread())


if __name__ == "__main__":
    sys.exit(main())
