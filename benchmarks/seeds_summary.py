"""Summarise a run of configs/seeds.yaml: localisation and faithfulness of SISE, NeuroMask
and Grad-CAM, with 95 % bootstrap intervals and the paired SISE - Grad-CAM difference.

    .venv/bin/python benchmarks/seeds_summary.py runs/seeds > benchmarks/SEEDS.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from attriflow.tasks.storage import open_dataset


def bootstrap(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    v = values[np.isfinite(values)]
    means = rng.choice(v, size=(n, len(v)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(run_dir: str) -> None:
    ds = open_dataset(Path(run_dir) / "store.zarr")
    manifest = json.loads(ds.attrs["manifest"])
    metrics = [str(m) for m in ds["metric"].values]
    score = ds["score"].values
    names = [str(e) for e in ds["explainer"].values]
    print(f"# Seed methods on the embedded dataset ({ds.sizes['sample']} test images)\n")
    print(f"Run `{manifest['name']}`, config hash `{manifest['config_hash'][:16]}`, "
          f"attriflow git `{manifest['git_commit'][:12]}`, torch {manifest['versions']['torch']}, "
          f"device {manifest['device']}.\n")
    print("| explainer | " + " | ".join(metrics) + " | forward passes / image |")
    print("|---|" + "---|" * (len(metrics) + 1))
    for i, name in enumerate(names):
        cells = []
        for m in range(len(metrics)):
            v = score[i, :, m]
            lo, hi = bootstrap(v)
            cells.append(f"{np.nanmean(v):.4f} [{lo:.4f}, {hi:.4f}]")
        passes = ds["forward_passes"].values[i]
        print(f"| `{name}` | " + " | ".join(cells) + f" | {passes.mean():.1f} |")
    if "sise" in names and "grad_cam" in names:
        e = metrics.index("energy_pointing_game")
        diff = score[names.index("sise"), :, e] - score[names.index("grad_cam"), :, e]
        lo, hi = bootstrap(diff)
        print(f"\nPaired EBPG difference SISE - Grad-CAM: {np.nanmean(diff):+.4f} "
              f"(95 % bootstrap interval [{lo:+.4f}, {hi:+.4f}]); SISE >= Grad-CAM on "
              f"{np.mean(diff[np.isfinite(diff)] >= 0):.1%} of the images.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/seeds")
