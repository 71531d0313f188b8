"""Render ``benchmarks/results/*.json`` (from ``peers.py`` and ``pipeline.py``) as
``benchmarks/RESULTS.md``; the hand-written analysis in ``benchmarks/RESULTS-notes.md`` is
appended. Usage: ``.venv/bin/python benchmarks/results.py``."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

GRAD_CAMS = {"grad_cam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam"}
LRP = {"lrp_composite", "lrp_epsilon", "lrp_zplus", "lrp_alpha_beta"}
MODEL_NAMES = {"resnet50": "ResNet-50, 224x224", "vgg16": "VGG-16, 224x224", "reference": "reference CNN, 64x64"}


def ratio(x: float | None) -> str:
    """A ratio as ``N.NNx`` (an em dash when unknown)."""
    return "—" if x is None else f"{x:.2f}x"


def secs(x: float | None) -> str:
    """Seconds per image with three significant digits."""
    if x is None:
        return "—"
    return f"{x:.3g} s" if x >= 0.01 else f"{x * 1e3:.3g} ms"


def passes_of(row: dict) -> tuple[str, float]:
    """(limit kind, passes per image) the method needs (Ablation-CAM: one forward)."""
    kind, n = row["passes"]
    if row["ours"] == "ablation_cam":
        return "fwd", 1.0
    return kind, float(n)


def targets(row: dict, model: str) -> list[tuple[str, float | None, float, str]]:
    """(label, measured, bound, "<=" or ">=") for each target the issue sets on this row."""
    s = row["seconds"]
    ours, best, default = s.get("ours"), s.get("peer best"), s.get("peer")
    out: list[tuple[str, float | None, float, str]] = []
    peer_best = best if best is not None else default
    if row["peer"] != "(no peer)" and peer_best is not None and ours:
        out.append(("peer best/ours", peer_best / ours, 1.0, ">="))
    lim = row.get("ours_limit")
    if row["ours"] in GRAD_CAMS or row["ours"] == "eigen_cam":
        out.append(("ours/limit", lim, 1.3, "<="))
        if row["ours"] in GRAD_CAMS and row["peer"].startswith("grad-cam") and default:
            out.append(("grad-cam/ours", default / ours, 2.3, ">="))
    big = model in ("resnet50", "vgg16")  # the LRP and Ablation-CAM targets name these models
    if row["ours"] in LRP and big:
        out.append(("ours/limit", lim, 1.5, "<="))
        if default:
            out.append(("zennit/ours", default / ours, 3.0, ">="))
    if row["ours"] == "ablation_cam" and default and big:
        out.append(("grad-cam/ours", default / ours, 100.0, ">="))
    if row["sampling"]:
        out.append(("ours/limit", lim, 1.1, "<="))
        if row.get("mem_ratio") is not None:
            out.append(("peak/one batch", row["mem_ratio"], 1.5, "<="))
    return out


def verdict(checks: list[tuple[str, float | None, float, str]]) -> str:
    """"met" or the targets missed with their measured value."""
    missed = [f"{label} {ratio(v)} (target {op} {b:g})" for label, v, b, op in checks
              if v is None or (v < b if op == ">=" else v > b)]
    return "met" if not missed else "missed: " + "; ".join(missed)


def annotate(result: dict) -> None:
    """Add ``ours_limit`` and ``mem_ratio`` to every row."""
    for row in result["rows"]:
        limit = row.get("limit") or result["limit_seconds_per_image"]  # the row's own run
        kind, n = passes_of(row)
        ours = row["seconds"].get("ours")
        row["ours_limit"] = ours / (n * limit[kind]) if ours and n else None
        need = limit.get(f"{kind} peak MiB @{row['batch_size']}")
        peak = row["peak_mib"].get("ours")
        row["mem_ratio"] = peak / need if need and peak is not None and row["sampling"] else None


def merge(runs: dict[str, dict]) -> None:
    """Fold ``<model>-fp32-rerun*`` rows (measured again after a change, or cases added
    since) into ``<model>-fp32``
    and the peers' defaults under glibc's default allocator (``-peer-defaults-glibc``) into
    each row as ``peer glibc``; the merged-in runs are dropped from ``runs``."""
    for key in sorted(k for k in runs if "-rerun" in k):  # later reruns override earlier ones
        base, rerun = runs.get(key.split("-rerun")[0]), runs.pop(key)
        if base is None:
            continue
        fresh = {r["case"]: r for r in rerun["rows"]}
        base["rows"] = [dict(fresh[r["case"]], limit=rerun["limit_seconds_per_image"],
                             note=(r.get("note") + "; " if r.get("note") else "")
                             + f"measured again {rerun['date']} (limit of that run: forward "
                               f"{rerun['limit_seconds_per_image']['fwd'] * 1e3:.2f} ms, forward + input gradient "
                               f"{rerun['limit_seconds_per_image']['fwd+bwd'] * 1e3:.2f} ms per image)")
                        if r["case"] in fresh else r for r in base["rows"]]
        known = {r["case"] for r in base["rows"]}  # cases added since the base run: appended
        base["rows"] += [dict(r, limit=rerun["limit_seconds_per_image"],
                              note=(r.get("note") + "; " if r.get("note") else "")
                              + f"measured {rerun['date']}")
                         for r in rerun["rows"] if r["case"] not in known]
    for key in [k for k in runs if k.endswith("-peer-defaults-glibc")]:
        glibc = runs.pop(key)
        base = runs.get(key[: -len("-peer-defaults-glibc")])
        if base is None:
            continue
        by_case = {r["case"]: r for r in glibc["rows"]}
        for row in base["rows"]:
            other = by_case.get(row["case"])
            if other is not None and "peer" in other["seconds"]:
                row["seconds"]["peer glibc"] = other["seconds"]["peer"]
                row["peak_mib"]["peer glibc"] = other["peak_mib"]["peer"]


def fp32_table(result: dict) -> list[str]:
    lines = [
        "| explainer | peer | images | ours | peer (defaults, glibc malloc) | peer (defaults) | peer (best) | "
        "peer/ours defaults, glibc malloc | peer/ours defaults | peer/ours best | ours/limit | "
        "peak MiB ours / peer / best | ours peak / one batch | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        s, m = row["seconds"], row["peak_mib"]
        ours = s.get("ours")
        d = s.get("peer")
        b = s.get("peer best")
        errs = row.get("errors", {})
        d_txt = secs(d) if d is not None else ("fails" if "peer" in errs else "—")
        mem = " / ".join("—" if m.get(k) is None else f"{m[k]:.0f}" for k in ("ours", "peer", "peer best"))
        g = s.get("peer glibc")
        lines.append(
            f"| {row['case']} | {row['peer']} | {row['images']} | {secs(ours)} | {secs(g)} | {d_txt} | {secs(b)} | "
            f"{ratio(g / ours if g and ours else None)} | "
            f"{ratio(d / ours if d and ours else None)} | {ratio(b / ours if b and ours else None)} | "
            f"{ratio(row['ours_limit'])} | {mem} | {ratio(row['mem_ratio'])} | {verdict(targets(row, result['model']))} |")
    return lines


def bf16_table(bf16: dict, fp32: dict | None) -> list[str]:
    peers = {r["case"]: r for r in fp32["rows"]} if fp32 else {}
    lines = ["| explainer | images | ours bf16 | ours bf16/limit bf16 | peer fp32 defaults, glibc malloc | "
             "peer fp32 defaults, tuned malloc | peer fp32 defaults (glibc) / ours bf16 (target >= 2.5) | "
             "same, tuned malloc |", "|---|---|---|---|---|---|---|---|"]
    for row in bf16["rows"]:
        ours = row["seconds"].get("ours")
        fp = peers.get(row["case"], {}).get("seconds", {})
        g, ref = fp.get("peer glibc"), fp.get("peer")
        lines.append(f"| {row['case']} | {row['images']} | {secs(ours)} | {ratio(row['ours_limit'])} | {secs(g)} | "
                     f"{secs(ref)} | {ratio(g / ours if g and ours else None)} | "
                     f"{ratio(ref / ours if ref and ours else None)} |")
    return lines


def stages_section(r: dict | None) -> list[str]:
    """The stages around the explainers at 224 px (``results/stages_224.json``): each stage's
    task seconds against the model-evaluation seconds inside it."""
    if not r:
        return []
    t, m, q = r["stage_task_seconds"], r["stage_model_seconds"], r["stage_task_over_model"]
    intro = (
        "The issue reported a 14-image ResNet-18 run at 224 px whose neurons, evaluate and sanity stages "
        "took 11 times the explainers' time. `benchmarks/stages_224.yaml` runs those stages on ResNet-18 "
        "(random weights) at 224 x 224: 8 embedded images, saliency and Grad-CAM, 32 deletion/insertion "
        "steps, 50 neuron copies and a 4-sample block-level sanity check. "
        f"`benchmarks/pipeline.py --config {r['config']}` ran at {r['date']} with {r['threads']} threads. "
        "A stage's **task / model** ratio divides its summed task seconds by the model-evaluation seconds "
        "inside its tasks; 1.0 would be the stage's own model-evaluation limit. The goal is 1.5x or less.")
    out = ["## The stages around the explainers at 224 px", "", intro, "",
           "| stage | summed task seconds | inside model evaluation | task / model |", "|---|---|---|---|"]
    out += [f"| {k} | {t[k]:.1f} | {m[k]:.1f} | {q[k]:.2f}x |" for k in q]
    met = all(q[k] <= 1.5 for k in ("neurons", "evaluate", "sanity"))
    verdict = "all within" if met else "not all within"
    out += ["", f"Neurons {q['neurons']:.2f}x, evaluate {q['evaluate']:.2f}x, sanity {q['sanity']:.2f}x: "
            f"**{verdict} 1.5x** of their limit. These stages make many model evaluations per image: "
            "evaluate makes 2 x 33 curve points and 4 drop/increase passes per map, neurons evaluates 50 "
            "perturbed copies, and sanity makes one attribution per depth. So they take most of the run, "
            "but that time is spent in the model, not around it. The report's cost section shows it per "
            f"stage. Whole run: {r['wall_seconds']:.1f} s wall, {100 * r['outside_model_share']:.1f} % "
            f"outside model evaluation (report {t['report']:.1f} s).", ""]
    return out


def main() -> None:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))
            if not p.stem.startswith("scale-")}  # scale.py renders its own page (SCALE.md)
    merge(runs)
    peer_runs = {k: v for k, v in runs.items() if "rows" in v}
    for r in peer_runs.values():
        annotate(r)
    any_run = next(iter(peer_runs.values()))
    m = any_run["machine"]
    out = [
        "# Benchmark results: attriflow against Captum, pytorch-grad-cam and zennit",
        "",
        "Generated by `benchmarks/results.py` from `benchmarks/results/*.json`; the measurements",
        "come from `benchmarks/peers.py` (one process per model and precision: every contender on the",
        "same model, inputs and threads, alternating over repetitions after a warm-up) and",
        "`benchmarks/pipeline.py`. `make bench` measures everything again and regenerates this file.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, Python {m['python']}, "
        f"no GPU; glibc tunables `{m['glibc_tunables']}` (the CLI's, for every contender). "
        "Versions: " + ", ".join(f"{k} {v}" for k, v in any_run["versions"].items()) + ".",
        "Dates: " + ", ".join(sorted({r["date"] for r in peer_runs.values()})) + ".",
        "",
        "Seconds are medians per image. *peer (defaults)* calls the library as its documentation",
        "shows; *peer (best)* tunes it (batch size for this machine; parameters frozen so no",
        "weight gradient is computed). The *limit* is measured in the same process: the best",
        "seconds per image of one forward (`fwd`) or one forward plus input gradient (`fwd+bwd`)",
        "over batch sizes, times the passes the method needs. *peak* is the largest growth of",
        "malloc's bytes in use during one call; *peak/one batch* divides ours by the peak of one",
        "plain pass at the batch size ours used. This 2-core VM drifts 10-15 % over minutes:",
        "read ratios within 0.9-1.1 as equal.",
        "",
    ]
    for key, r in peer_runs.items():
        if r["precision"] != "fp32":
            continue
        lim = r["limit_seconds_per_image"]
        out += [f"## {MODEL_NAMES[r['model']]}, fp32",
                "",
                f"Limit: forward {lim['fwd'] * 1e3:.2f} ms per image, forward + input gradient "
                f"{lim['fwd+bwd'] * 1e3:.2f} ms per image. Source: `results/{key}.json`.",
                ""]
        out += fp32_table(r)
        notes = [f"- {row['case']}: {row['note']}" for row in r["rows"] if row.get("note")]
        notes += [f"- {row['case']}, {k}: {v}" for row in r["rows"] for k, v in row.get("errors", {}).items()]
        out += ["", *notes, ""] if notes else [""]
    for key, r in peer_runs.items():
        if r["precision"] != "bf16":
            continue
        fp32 = next((v for v in peer_runs.values() if v["model"] == r["model"] and v["precision"] == "fp32"
                     and any(row["sampling"] for row in v["rows"])), None)
        lim = r["limit_seconds_per_image"]
        out += [f"## {MODEL_NAMES[r['model']]}, bf16 autocast + channels-last (ours only)",
                "",
                f"Limit (bf16): forward {lim['fwd'] * 1e3:.2f} ms per image, forward + input gradient "
                f"{lim['fwd+bwd'] * 1e3:.2f} ms per image. Source: `results/{key}.json`.",
                ""]
        out += bf16_table(r, fp32) + [""]
    pipe = runs.get("pipeline")
    if pipe:
        out += ["## The default pipeline end to end", "",
                f"`{pipe['config']}` ({pipe['date']}): wall time {pipe['wall_seconds']:.1f} s after the Prefect "
                f"server is up; {pipe['model_evaluation_seconds']:.1f} s inside model evaluation (forward "
                f"calls of the model and autograd backwards, union over threads); outside model evaluation "
                f"**{pipe['outside_model_share'] * 100:.1f} %** (target <= 10 %).", "",
                "| stage | summed task seconds | inside model evaluation | outside |", "|---|---|---|---|"]
        inside = pipe.get("stage_model_seconds", {})
        for k, v in pipe["stage_task_seconds"].items():
            m = inside.get(k, 0.0 if k == "report" else None)  # the report runs no model
            out.append(f"| {k} | {v:.1f} | {'—' if m is None else f'{m:.1f}'} | "
                       f"{'—' if m is None else f'{v - m:.1f}'} |")
        tasks = sum(pipe["stage_task_seconds"].values())
        out += [f"| outside every stage (prepare, orchestration, waits) | {pipe['wall_seconds'] - tasks:.1f} | | |", ""]
    out += stages_section(runs.get("stages_224"))
    notes = HERE / "RESULTS-notes.md"
    if notes.exists():
        out += [notes.read_text().rstrip(), ""]
    (HERE / "RESULTS.md").write_text("\n".join(out))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
