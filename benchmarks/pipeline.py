"""The default pipeline end to end: wall time per stage and the share outside model evaluation.

Runs ``attriflow.flows.run.execute`` on the default config (``configs/default.yaml``) in this process
(re-executed once with the CLI's allocator settings) into a fresh run directory and records:

* per stage, the summed seconds of its tasks (from each task's receipt; tasks of one stage
  may overlap in the local runner's threads);
* the time inside model evaluation: the union of the intervals spent in a forward call of
  the model (the root module) or in an autograd backward (``torch.autograd.grad``,
  ``Tensor.backward``), whatever thread made them;
* the total wall time of the flow (after the temporary Prefect server is up), and the
  report's own seconds (``report`` in the stage table).

Each stage's ``task / model`` ratio is its summed task seconds over the model-evaluation
seconds inside its tasks: how far the stage is from its own model-evaluation limit (1.0).

Usage: ``.venv/bin/python benchmarks/pipeline.py [--config configs/default.yaml]
[--out benchmarks/results/pipeline.json]`` (``benchmarks/stages_224.yaml``: the stages
around the explainers at 224 px).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def instrumented_run(config, run_dir: str) -> dict:
    """Run ``config`` into ``run_dir`` (inside a Prefect test harness) with the model and
    the stages timed: wall seconds, seconds inside model evaluation (union over threads),
    the share outside it, summed task seconds per stage and the report's seconds, and the
    model-evaluation seconds inside each stage's tasks.

    Call once per process: it installs global forward hooks and wraps autograd."""
    import torch
    from prefect.testing.utilities import prefect_test_harness

    import attriflow.tasks.stages.common as stages
    import attriflow.tasks.stages.report as report
    from attriflow.flows.run import execute

    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()
    local = threading.local()
    root = type(None)

    stage_of_task = {"load-shard": "load", "explain-shard": "explain", "select-neurons": "neurons",
                     "evaluate-shard": "evaluate", "sanity-check": "sanity", "prepare-run": "prepare",
                     "write-report": "report"}
    stage_model: dict[str, float] = defaultdict(float)

    def current_stage() -> str:
        from prefect.context import TaskRunContext

        ctx = TaskRunContext.get()
        return stage_of_task.get(ctx.task.name, "other") if ctx is not None else "other"

    def pre(module, _inp):
        if isinstance(module, root) and not getattr(local, "depth", 0):
            local.t0 = time.perf_counter()
            local.stage = current_stage()
        if isinstance(module, root):
            local.depth = getattr(local, "depth", 0) + 1

    def post(module, _inp, _out):
        if isinstance(module, root):
            local.depth -= 1
            if not local.depth:
                t1 = time.perf_counter()
                with lock:
                    intervals.append((local.t0, t1))
                    stage_model[local.stage] += t1 - local.t0

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                t1 = time.perf_counter()
                with lock:
                    intervals.append((t0, t1))
                    if not getattr(local, "depth", 0):  # a backward outside a forward
                        stage_model[current_stage()] += t1 - t0
        return wrapper

    stage_seconds: dict[str, float] = defaultdict(float)
    receipt = stages.receipt

    def logging_receipt(stage, shard, skipped, t0, **extra):
        r = receipt(stage, shard, skipped, t0, **extra)
        with lock:
            stage_seconds[stage] += r["seconds"]
        return r

    render = report.render_report

    def timed_render(*a, **k):
        t0 = time.perf_counter()
        try:
            return render(*a, **k)
        finally:
            stage_seconds["report"] += time.perf_counter() - t0

    stages.receipt = logging_receipt
    report.render_report = timed_render
    torch.autograd.grad = timed(torch.autograd.grad)
    torch.Tensor.backward = timed(torch.Tensor.backward)
    torch.nn.modules.module.register_module_forward_pre_hook(pre)
    torch.nn.modules.module.register_module_forward_hook(post)
    from attriflow.tasks.runtime import get_runtime

    root = type(get_runtime(config.model_dump_json()).module)  # the model's own class: its outermost call
    with prefect_test_harness():
        t0 = time.perf_counter()
        execute(config, run_dir)
        wall = time.perf_counter() - t0
    model = union_seconds(intervals)
    return {"wall_seconds": wall, "model_evaluation_seconds": model, "outside_model_share": 1 - model / wall,
            "stage_task_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
            "stage_model_seconds": {k: round(v, 3) for k, v in stage_model.items()},
            "stage_task_over_model": {k: round(v / stage_model[k], 3) for k, v in stage_seconds.items()
                                      if stage_model.get(k)},
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def reexec_with_tuned_allocator() -> None:
    """Re-execute this script once with the CLI's allocator settings (as ``attriflow`` runs)."""
    from attriflow.flows.cli import allocator_env

    env = allocator_env(dict(os.environ), sys.platform, platform.libc_ver()[0])
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="attriflow-bench-prefect-"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline.json")
    args = ap.parse_args()
    reexec_with_tuned_allocator()
    from attriflow.tasks.config import load_config

    config = load_config(args.config)
    run_dir = tempfile.mkdtemp(prefix="attriflow-bench-run-")
    where = args.config.resolve()
    name = str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else str(args.config)
    result = {"config": name, **instrumented_run(config, run_dir)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
