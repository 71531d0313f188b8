"""Regenerate ``benchmarks/ZOO.md``: run the zoo test (``tests/explainers/test_zoo.py``) with
``ATTRIFLOW_ZOO_TABLE`` pointing at the table, so the published outcomes are the test's own.

Usage: ``.venv/bin/python benchmarks/zoo.py [PYTEST ARGS]`` (for example ``-k resnet18`` for
one architecture; the table then holds only the pairs that ran). Exits with pytest's status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "benchmarks" / "ZOO.md"


def main(argv: list[str]) -> int:
    """Run the zoo test and write the table; returns pytest's exit status."""
    env = {**os.environ, "ATTRIFLOW_ZOO_TABLE": str(TABLE)}
    cmd = [sys.executable, "-m", "pytest", "tests/explainers/test_zoo.py", "-q", "-p", "no:cacheprovider",
           "--no-header", "-rN", *argv]
    status = subprocess.call(cmd, cwd=ROOT, env=env)
    print(f"wrote {TABLE.relative_to(ROOT)} (pytest exit status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
