"""Peak memory of the default pipeline against the number of images.

Runs ``attriflow run`` (the default config with ``data.n_samples`` set to N and to 10 N)
as child processes against one temporary Prefect server started here, so that the child's
peak RSS (``wait4``'s ``ru_maxrss``) is the pipeline alone. Usage::

    .venv/bin/python benchmarks/memory.py [--n 64] [--factor 10] [--out benchmarks/MEMORY.md]

The acceptance bound (issue #7): the 10x run's peak stays within 1.2x the small run's.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def peak_rss(config: dict, run_dir: Path, env: dict[str, str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one ``attriflow run``."""
    cfg = run_dir.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(config))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "attriflow.flows.cli", "run", str(cfg), "--run-dir", str(run_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"run failed ({status}): {proc.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "MEMORY.md"))
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="attriflow-bench-"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from attriflow.tasks.config import RunConfig

    base = RunConfig().model_dump(mode="json")
    rows = []
    with prefect_test_harness(server_startup_timeout=60), tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "WARNING"}
        for n in (args.n, args.n * args.factor):
            cfg = {**base, "name": f"memory-{n}", "data": {**base["data"], "n_samples": n}}
            mib, seconds = peak_rss(cfg, Path(tmp) / f"run-{n}", env)
            rows.append((n, mib, seconds))
            print(f"n={n}: peak RSS {mib:.0f} MiB, {seconds:.0f} s", flush=True)
    ratio = rows[1][1] / rows[0][1]
    verdict = "within" if ratio <= 1.2 else "OVER"
    text = [
        "# Peak memory against the number of images", "",
        f"`benchmarks/memory.py --n {args.n} --factor {args.factor}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.",
        "The default config with `data.n_samples` = N; the pipeline process's peak RSS (`wait4`), the Prefect",
        "server excluded (it runs in the benchmark process).", "",
        "| images | peak RSS (MiB) | wall (s) |", "|---|---|---|",
        *[f"| {n} | {mib:.0f} | {s:.0f} |" for n, mib, s in rows], "",
        f"Ratio {ratio:.3f}: {verdict} the 1.2x bound of issue #7.", "",
    ]
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
