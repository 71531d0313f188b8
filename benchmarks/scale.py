"""How a run's cost grows with the number of samples, and what its store costs on disk.

Two measurements, written as JSON under ``benchmarks/results/`` and rendered into
``benchmarks/SCALE.md`` by ``--render``:

``--samples N`` (one process per size, so that peak memory is this size's):
    the default stages (load, explain, neurons, evaluate, sanity, report) on ``N`` images of
    the embedded dataset's train split with 8 explainers, instrumented like
    ``benchmarks/pipeline.py``: per stage, summed task seconds and throughput (maps or
    images per second), the share of wall time outside model evaluation, the store's size
    on disk (all of it, and the maps), the report's seconds and the peak resident memory.
    ``--settings default`` keeps the default per-image settings; ``--settings light``
    (evaluate.steps 8, neurons.copies 10) makes a 4,096-image run fit in about half an
    hour on two cores and shows the same growth (every stage's cost is per image).

``--encodings RUN_DIR``:
    the maps of a finished run written again with every ``store.attribution_dtype`` x
    ``store.codec``: bytes per map on disk, write and read throughput (MB/s of float32
    maps), and the largest error against the float32 maps.

Usage::

    .venv/bin/python benchmarks/scale.py --samples 512 [--settings light]
    .venv/bin/python benchmarks/scale.py --encodings /tmp/attriflow-scale-512-light
    .venv/bin/python benchmarks/scale.py --render
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"

#: Eight explainers across the families, one or a few passes per image each.
EXPLAINERS = [
    {"method": "saliency"}, {"method": "gradient_x_input"}, {"method": "guided_backprop"},
    {"method": "lrp_epsilon"}, {"method": "lrp_composite"}, {"method": "grad_cam"},
    {"method": "grad_cam_plus_plus"}, {"method": "occlusion", "params": {"window": 16, "stride": 8}},
]
LIGHT = {"evaluate": {"steps": 8}, "neurons": {"copies": 10}}
#: ImageNet validation: images, explainers, pixels per map.
IMAGENET = (50_000, 12, 224 * 224)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_size(n: int, settings: str, device: str = "auto") -> dict:
    """One instrumented run of ``n`` images on ``device``; its figures."""
    from pipeline import instrumented_run

    from attriflow.tasks.config import parse_config

    raw = {"name": f"scale-{n}", "device": device, "data": {"split": "train", "n_samples": n},
           "explain": {"explainers": EXPLAINERS}}
    if settings == "light":
        raw.update(LIGHT)
    config = parse_config(raw, "scale.py")
    run_dir = Path(tempfile.gettempdir()) / f"attriflow-scale-{n}-{settings}{'-cuda' if device == 'cuda' else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)
    out = instrumented_run(config, str(run_dir))
    store = run_dir / "store.zarr"
    maps = n * len(EXPLAINERS)
    st = out["stage_task_seconds"]
    out.update(
        samples=n, explainers=len(EXPLAINERS), settings=settings, run_dir=str(run_dir), device=device,
        store_bytes=_du(store), attribution_bytes=_du(store / "attribution"),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        throughput={"explain maps/s": maps / st["explain"], "evaluate maps/s": maps / st["evaluate"],
                    "neurons images/s": n / st["neurons"] if st.get("neurons") else None,
                    "load images/s": n / st["load"]},
    )
    return out


def encodings(run_dir: Path) -> dict:
    """Every attribution dtype x codec on the maps of ``run_dir``."""
    import numpy as np
    import xarray as xr

    from attriflow.tasks import storage

    maps = xr.open_zarr(run_dir / "store.zarr")["attribution"].values.astype(np.float32)
    e, n, h, w = maps.shape
    rows = []
    for dtype in storage.ATTRIBUTION_DTYPES:
        for codec in storage.CODECS:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "store.zarr"
                layout = storage.StoreLayout(
                    height=h, width=w, shard_size=64, has_mask=False, has_box=False,
                    entries=tuple(storage.Entry(f"e{i}@0", f"e{i}", "gradient", "saliency", "{}") for i in range(e)),
                    sample_ids=tuple(range(n)), sample_names=tuple(map(str, range(n))),
                    sample_keys=tuple(f"{i}#k" for i in range(n)), n_points=2,
                    attribution_dtype=dtype, codec=codec)
                storage.init_store(path, layout, {"manifest": "{}"})
                t0 = time.perf_counter()
                rounded = []
                for k in range(e):
                    stored, _, _ = storage.round_maps(maps[k], dtype)
                    rounded.append(stored.astype(np.float32))
                    storage.write_region(path, {"attribution": (("explainer", "sample", "y", "x"), stored[None])},
                                         {"explainer": slice(k, k + 1), "sample": slice(0, n)})
                write = time.perf_counter() - t0
                t0 = time.perf_counter()
                back = xr.open_zarr(path)["attribution"].values
                read = time.perf_counter() - t0
                size = _du(path / "attribution")
                ref = np.abs(maps).reshape(e, n, -1).max(axis=2)[..., None, None]
                rel = np.abs(back.astype(np.float32) - maps) / np.where(ref > 0, ref, 1)
                rows.append({"dtype": dtype, "codec": codec, "bytes_per_map": size / (e * n),
                             "bytes_per_value": size / maps.size,
                             "write_MBps": maps.nbytes / 2**20 / write, "read_MBps": maps.nbytes / 2**20 / read,
                             "max_error_of_map_peak": float(np.nanmax(rel))})
                assert np.array_equal(np.stack(rounded), back.astype(np.float32), equal_nan=True), (dtype, codec)
    return {"maps": int(e * n), "height": h, "width": w, "source": str(run_dir), "rows": rows,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _gb(x: float) -> str:
    return f"{x / 1e9:,.0f} GB" if x >= 1e10 else f"{x / 1e9:,.1f} GB"


def render() -> str:
    """``benchmarks/SCALE.md`` from the JSON results."""
    runs = sorted((json.loads(p.read_text()) for p in RESULTS.glob("scale-*.json") if "encodings" not in p.name),
                  key=lambda r: (r["settings"], r["samples"]))
    sizes = ", ".join(f"{r['samples']:,}" for r in runs) or "none yet"
    lines = ["# Scale: cost per number of images, map encodings, and the ImageNet-validation projection", "",
             f"Sizes measured: {sizes} images (`make scale` measures 512 and 4,096).", "",
             "Generated by `benchmarks/scale.py --render` from `benchmarks/results/scale-*.json`; "
             "measured on this 2-core CPU (no GPU), the reference CNN at 64x64, 8 explainers "
             f"({', '.join(e['method'] for e in EXPLAINERS)}), every default stage.", ""]
    stages = ["load", "explain", "neurons", "evaluate", "sanity", "report"]
    lines += ["| images | settings | wall | outside model | " + " | ".join(f"{s} s" for s in stages)
              + " | explain maps/s | evaluate maps/s | neurons img/s | store | maps on disk | peak RSS |",
              "|---" * (10 + len(stages)) + "|"]
    for r in runs:
        st, tp = r["stage_task_seconds"], r["throughput"]
        lines.append(
            f"| {r['samples']:,} | {r['settings']}{' (CUDA)' if r.get('device') == 'cuda' else ''} | {r['wall_seconds']:.0f} s | {r['outside_model_share']:.1%} | "
            + " | ".join(f"{st.get(s, 0):.1f}" for s in stages)
            + f" | {tp['explain maps/s']:.0f} | {tp['evaluate maps/s']:.1f} | "
            f"{tp['neurons images/s'] or 0:.1f} | {r['store_bytes'] / 2**20:.0f} MiB | "
            f"{r['attribution_bytes'] / (r['samples'] * r['explainers']):,.0f} B/map | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    enc_path = RESULTS / "scale-encodings.json"
    if enc_path.exists():
        enc = json.loads(enc_path.read_text())
        n_img, n_exp, px = IMAGENET
        lines += ["", "## Map encodings (`store.attribution_dtype` x `store.codec`)", "",
                  f"{enc['maps']:,} maps of {enc['height']}x{enc['width']} from `{Path(enc['source']).name}`, "
                  "written again with each setting (write includes rounding; read is `xarray.open_zarr(...).values`). "
                  "Error: largest |stored - float32| relative to the map's peak |value|. "
                  f"ImageNet projection: {n_img:,} images x {n_exp} explainers x 224x224 maps at the measured bytes "
                  "per value (maps of a 224-pixel model may compress differently from these 64-pixel ones; "
                  "float32 without compression is the upper bound).", "",
                  "| dtype | codec | bytes per value | bytes per 64x64 map | write MB/s | read MB/s | max error | ImageNet (50k x 12) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in enc["rows"]:
            projected = row["bytes_per_value"] * n_img * n_exp * px
            lines.append(f"| {row['dtype']} | {row['codec']} | {row['bytes_per_value']:.2f} | "
                         f"{row['bytes_per_map']:,.0f} | {row['write_MBps']:.0f} | {row['read_MBps']:.0f} | "
                         f"{row['max_error_of_map_peak']:.1e} | {_gb(projected)} |")
    notes = ROOT / "benchmarks" / "SCALE-notes.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int)
    ap.add_argument("--settings", choices=["default", "light"], default="default")
    ap.add_argument("--encodings", type=Path, metavar="RUN_DIR")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.samples:
        from pipeline import reexec_with_tuned_allocator

        reexec_with_tuned_allocator()
        result = run_size(args.samples, args.settings, args.device)
        cuda = "-cuda" if args.device == "cuda" else ""
        (RESULTS / f"scale-{args.samples}-{args.settings}{cuda}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
    if args.encodings:
        result = encodings(args.encodings)
        (RESULTS / "scale-encodings.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
    if args.render:
        (ROOT / "benchmarks" / "SCALE.md").write_text(render())


if __name__ == "__main__":
    main()
