"""Summaries of a run store as tables and Markdown (no file writes here).

Everything is computed from the store alone: the ``score``, ``curve``, ``sanity``,
``forward_passes``/``backward_passes`` variables, the stage timings (``*_seconds``,
``tasks.storage.TIMINGS``) and the manifest.
Intervals are percentile bootstrap intervals of the mean over samples, drawn from a
generator seeded by (run seed, metric), so the report is reproducible and equal data
(a one-explainer family and its sub-total) gets equal intervals.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from attriflow.analysis.metrics.sanity import SIMILARITIES, collapse_depth


@dataclass(frozen=True)
class ReportOptions:
    """How intervals are drawn and what the sanity check calls a collapse."""

    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    threshold: float = 0.5
    grid_samples: int = 6
    include_inactive: bool = False  # also the store's entries the config no longer uses
    svg: bool = False  # every figure also as SVG

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ReportOptions:
        """Options recorded with the run (defaults where an older manifest lacks them)."""
        cfg = manifest.get("config", {})
        rep, san = cfg.get("report", {}), cfg.get("sanity", {})
        return cls(
            bootstrap=int(rep.get("bootstrap", cls.bootstrap)),
            confidence=float(rep.get("confidence", cls.confidence)),
            seed=int(manifest.get("seed", cls.seed)),
            threshold=float(san.get("threshold", cls.threshold)),
            grid_samples=int(rep.get("grid_samples", cls.grid_samples)),
            include_inactive=bool(rep.get("include_inactive", False)),
            svg=bool(rep.get("svg", False)),
        )


def manifest_of(ds: xr.Dataset) -> dict[str, Any]:
    """The run manifest stored in the group attributes."""
    return json.loads(ds.attrs.get("manifest", "{}"))


def taxonomy(ds: xr.Dataset) -> dict[str, str]:
    """Family -> taxonomy path, in taxonomy order (the manifest's ``taxonomy`` pairs)."""
    return {str(f): str(path) for f, path in manifest_of(ds).get("taxonomy", [])}


def family_order(ds: xr.Dataset) -> list[str]:
    """Families of the run in taxonomy order, then any other family in order of appearance."""
    known = list(taxonomy(ds))
    present = list(dict.fromkeys(str(f) for f in ds["family"].values))
    return [f for f in known if f in present] + [f for f in present if f not in known]


def explainer_order(ds: xr.Dataset) -> list[int]:
    """Explainer indices ordered by taxonomy family, then by their order in the config."""
    families = family_order(ds)
    fam = [str(f) for f in ds["family"].values]
    return sorted(range(len(fam)), key=lambda i: (families.index(fam[i]), i))


def bootstrap_mean(values: np.ndarray, n_boot: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """Mean of the finite values and its percentile bootstrap interval.

    Returns
    -------
    (mean, low, high)
        NaN for all three when no value is finite; low = high = mean for one value.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    if n_boot * v.size <= _RESAMPLE_BLOCK:
        means = v[_resamples(seed, n_boot, v.size)].mean(axis=1)
    else:  # many samples: the resamples in blocks, so memory stays bounded
        rng, means = np.random.default_rng(seed), np.empty(n_boot)
        step = max(1, _RESAMPLE_BLOCK // v.size)
        for b in range(0, n_boot, step):
            k = min(step, n_boot - b)
            means[b:b + k] = v[rng.integers(0, v.size, size=(k, v.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(v.mean()), float(lo), float(hi)


#: Index matrices up to this many entries (32 MiB) are drawn whole and kept (four of them);
#: larger bootstraps draw blocks of this size.
_RESAMPLE_BLOCK = 2**22


@functools.lru_cache(maxsize=4)
def _resamples(seed: int, n_boot: int, size: int) -> np.ndarray:
    """The bootstrap's indices (n_boot, size), drawn once per (seed, size): every explainer
    of a metric with as many finite values is resampled the same way (the seed is per
    metric), so the report draws them once, not once per explainer."""
    out = np.random.default_rng(seed).integers(0, size, size=(n_boot, size))
    out.setflags(write=False)
    return out


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little")


#: Family suffix of the store's inactive entries in a report with ``report.include_inactive``:
#: they keep the scores of the evaluation settings they were last scored with, so they get
#: their own sub-totals and are never marked best.
INACTIVE_SUFFIX = "-inactive"


def subtotal_label(family: str) -> str:
    """Row label of a family's sub-total (all its explainers' samples pooled)."""
    return f"all {family}"


def metric_summary(ds: xr.Dataset, options: ReportOptions | None = None) -> pd.DataFrame:
    """One row per (explainer or family sub-total, metric) with the mean, its interval and
    whether it is the best of its metric.

    Parameters
    ----------
    ds : xr.Dataset
        The run store.
    options : ReportOptions, optional
        Defaults to the ones recorded in the manifest.

    Returns
    -------
    pd.DataFrame
        Columns ``family, explainer, subtotal, metric, category, higher_is_better, mean,
        low, high, n, best``; rows in taxonomy order, each family's explainers followed by
        its sub-total (families of two or more explainers); metrics that no explainer could
        score (no ground truth) are left out. ``best`` marks the best explainer per metric
        and, separately, the best family sub-total (ties all marked; nothing is marked
        among fewer than two candidates).
    """
    options = options or ReportOptions.from_manifest(manifest_of(ds))
    score = np.asarray(ds["score"].values, dtype=np.float64)
    metrics = [str(m) for m in ds["metric"].values]
    better = dict(zip(metrics, (bool(b) for b in ds["higher_is_better"].values)))
    category = dict(zip(metrics, (str(c) for c in ds["category"].values))) if "category" in ds.coords else {}
    names = [str(e) for e in ds["explainer"].values]
    fams = [str(f) for f in ds["family"].values]
    keep = [m for m in range(len(metrics)) if np.isfinite(score[:, :, m]).any()]
    groups = []
    for family in family_order(ds):
        members = [i for i in explainer_order(ds) if fams[i] == family]
        groups += [(family, names[i], False, score[i]) for i in members]
        if len(members) > 1:  # a one-member family's total is its explainer's row
            groups.append((family, subtotal_label(family), True, np.concatenate([score[i] for i in members])))
    # metric by metric, so that the bootstrap's draws (seeded per metric) are made once
    stats = {(g, m): bootstrap_mean(groups[g][3][:, m], options.bootstrap, options.confidence,
                                    _seed(options.seed, metrics[m]))
             for m in keep for g in range(len(groups))}
    rows = []
    for g, (family, label, subtotal, values) in enumerate(groups):
        for m in keep:
            mean, lo, hi = stats[(g, m)]
            rows.append({
                "family": family, "explainer": label, "subtotal": subtotal, "metric": metrics[m],
                "category": category.get(metrics[m], ""), "higher_is_better": better[metrics[m]],
                "mean": mean, "low": lo, "high": hi, "n": int(np.isfinite(values[:, m]).sum()),
            })
    df = pd.DataFrame(rows, columns=["family", "explainer", "subtotal", "metric", "category",
                                     "higher_is_better", "mean", "low", "high", "n"])
    df["best"] = False
    if df.empty:  # nothing scored yet (every evaluate shard failed): an empty table, same columns
        return df
    ranked = ~df["family"].astype(str).str.endswith(INACTIVE_SUFFIX)  # inactive entries are shown, not ranked
    for (metric, subtotal), part in df[ranked].groupby(["metric", "subtotal"]):
        finite = part["mean"].dropna()
        if len(finite) < 2:  # a single candidate is not "the best" of anything
            continue
        target = finite.max() if better[str(metric)] else finite.min()
        df.loc[part.index[part["mean"] == target], "best"] = True
    return df


def wide_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Means as a table: index (family, explainer), one column per metric."""
    rows = {key: dict(zip(part["metric"], part["mean"]))
            for key, part in summary.groupby(["family", "explainer"], sort=False)}
    table = pd.DataFrame.from_dict(rows, orient="index")[list(dict.fromkeys(summary["metric"]))]
    table.index = pd.MultiIndex.from_tuples(table.index, names=["family", "explainer"])
    return table


STAGE_COST_NOTE = ("Wall seconds of each stage's tasks, summed (tasks that ran side by side each count): the "
                   "explain stage's are the attributions alone, the others' include reading their inputs. "
                   "Per image and share come from the timed tasks (tasks done before the store kept timings "
                   "have none). Per explainer: attribution and evaluation seconds per image, the sanity "
                   "check's seconds.")


def _shard_sizes(ds: xr.Dataset) -> np.ndarray:
    """The number of (configured) samples of each shard of ``ds``."""
    if "shard_samples" in ds.coords:  # a store's current view: the configured samples of each shard
        return np.asarray(ds["shard_samples"].values, dtype=np.float64)
    n = ds.sizes["sample"]
    shard = int(manifest_of(ds).get("config", {}).get("shard_size", n)) or n
    return np.array([min(shard, n - s) for s in range(0, n, shard)], dtype=np.float64)


def _per_image(seconds: np.ndarray, sizes: np.ndarray) -> float:
    """Seconds per image over the timed shards (NaN: none timed)."""
    timed = np.isfinite(seconds)
    if not timed.any() or not sizes[timed].sum():
        return float("nan")
    return float(seconds[timed].sum() / sizes[timed].sum())


def cost_table(ds: xr.Dataset) -> pd.DataFrame:
    """Per explainer: wall seconds per image of its attribution (``explain_seconds``) and of
    its evaluation (``evaluate_seconds``: the metrics, reading included), its sanity check's
    wall seconds (``sanity_seconds``), and forward / backward passes per image (mean; NaN
    where the method could not count them or a task was not timed; 0 for a method whose
    recorded cost is no pass at all, a sanity baseline)."""
    sizes = _shard_sizes(ds)
    static = manifest_of(ds).get("explainers", {})
    rows = []
    for i in explainer_order(ds):
        row: dict[str, Any] = {"family": str(ds["family"].values[i]), "explainer": str(ds["explainer"].values[i])}
        cost = static.get(row["explainer"], {}).get("cost", {})
        for stage in ("explain", "evaluate"):
            if f"{stage}_seconds" in ds:
                sec = np.asarray(ds[f"{stage}_seconds"].values[i], dtype=np.float64)
                row[f"{stage}_seconds_per_image"] = _per_image(sec, sizes)
        if "sanity_seconds" in ds:
            row["sanity_seconds"] = float(ds["sanity_seconds"].values[i])
        # a map costs at least one forward pass: 0 marks a sample not explained (yet)
        explained = np.asarray(ds["forward_passes"].values[i]) != 0 if "forward_passes" in ds else None
        for kind in ("forward", "backward"):
            var = f"{kind}_passes"
            if var in ds:
                p = np.asarray(ds[var].values[i], dtype=np.float64)
                p = p[explained & (p >= 0)] if explained is not None else p[p >= 0]
                row[f"{kind}_per_image"] = float(p.mean()) if p.size else float("nan")
                if cost.get("forward") == 0 and cost.get(kind) == 0:  # a sanity baseline reads no model
                    row[f"{kind}_per_image"] = 0.0
        rows.append(row)
    return pd.DataFrame(rows)


#: The stages in the order they run, with the variable timing their tasks.
STAGE_TIMINGS = (("load", "load_seconds"), ("explain", "explain_seconds"), ("neurons", "neurons_seconds"),
                 ("evaluate", "evaluate_seconds"), ("sanity", "sanity_seconds"))


def stage_costs(ds: xr.Dataset) -> pd.DataFrame:
    """Per stage (in the order they run; a stage the store lacks is left out):

    - ``seconds``: the summed wall seconds of its timed tasks (tasks that ran side by side
      each count; NaN when none was timed);
    - ``tasks``, ``timed``: how many tasks it has over the run's samples and explainers, and
      how many were timed (a task done before the store kept timings was not);
    - ``seconds_per_image``: seconds per image of the run, from the timed tasks (per
      explainer over the samples of its timed shards, summed over the explainers; the sanity
      check's mean timed task times its tasks), NaN when an explainer has no timed task;
    - ``share``: of all stages' seconds per image (NaN when a stage's is unknown).

    The explain stage's seconds are the attributions alone; the other stages' include
    reading their inputs."""
    n = float(ds.sizes["sample"])
    sizes = _shard_sizes(ds)
    rows = []
    for stage, var in STAGE_TIMINGS:
        if var not in ds:
            continue
        sec = np.asarray(ds[var].values, dtype=np.float64)
        timed = np.isfinite(sec)
        if "shard" in ds[var].dims:
            per_row = sec.reshape(-1, sec.shape[-1])
            per_image = float(sum(_per_image(r, sizes) for r in per_row)) if len(per_row) else float("nan")
        else:  # one task per explainer over the sanity samples
            per_image = float(sec[timed].mean() * sec.size / n) if timed.any() and n else float("nan")
        rows.append({"stage": stage, "seconds": float(sec[timed].sum()) if timed.any() else float("nan"),
                     "tasks": int(sec.size), "timed": int(timed.sum()), "seconds_per_image": per_image})
    df = pd.DataFrame(rows, columns=["stage", "seconds", "tasks", "timed", "seconds_per_image"])
    total = df["seconds_per_image"].sum(skipna=False)
    df["share"] = df["seconds_per_image"] / total if np.isfinite(total) and total > 0 else np.nan
    return df


def sanity_curves(ds: xr.Dataset) -> pd.DataFrame | None:
    """Mean similarity per (explainer, depth, similarity) over the samples with finite maps
    (the stage stores 0 for a constant map's Spearman), or None without a sanity check."""
    if "sanity" not in ds:
        return None
    values = np.asarray(ds["sanity"].values, dtype=np.float64)  # (E, S, D, 3)
    if not np.isfinite(values).any():
        return None
    rows = []
    units = [str(u) for u in ds["randomised"].values]
    for i in explainer_order(ds):
        for d, unit in enumerate(units):
            for s, sim in enumerate(SIMILARITIES):
                rows.append({"family": str(ds["family"].values[i]), "explainer": str(ds["explainer"].values[i]),
                             "depth": d + 1, "randomised": unit, "similarity": sim,
                             "value": _nanmean(values[i, :, d, s])})
    return pd.DataFrame(rows)


def sanity_table(ds: xr.Dataset, threshold: float = 0.5) -> pd.DataFrame | None:
    """Per explainer and similarity, the depth at which the mean similarity first falls
    below ``threshold`` (as "depth (unit)"; "never" when it does not)."""
    curves = sanity_curves(ds)
    if curves is None:
        return None
    rows = []
    for explainer, part in curves.groupby("explainer", sort=False):
        row = {"family": part["family"].iloc[0], "explainer": explainer}
        for sim in SIMILARITIES:
            s = part[part["similarity"] == sim].sort_values("depth")
            d = collapse_depth(s["value"].to_numpy(), threshold)
            row[sim] = "never" if d is None else f"{d} ({s['randomised'].iloc[d - 1]})"
        rows.append(row)
    return pd.DataFrame(rows)


def flagged_counts(ds: xr.Dataset) -> dict[str, int]:
    """Per explainer, the maps flagged non-finite (map or model output NaN/inf): they are
    kept in the store as computed and left out of every mean."""
    if "flagged" not in ds:
        return {}
    flags = np.asarray(ds["flagged"].values, dtype=bool)
    return {str(e): int(flags[i].sum()) for i, e in enumerate(ds["explainer"].values) if flags[i].any()}


def coverage_note(ds: xr.Dataset, summary: pd.DataFrame) -> str:
    """One sentence naming the metrics scored on fewer samples than the run has (the
    localisation metrics need a box or mask of the explained class), or an empty string."""
    if summary.empty:
        return ""
    total = ds.sizes["sample"]
    rows = summary[~summary["subtotal"].astype(bool)]
    most = rows.groupby("metric", sort=False)["n"].max()
    short = [f"{m} {int(n)}" for m, n in most.items() if n < total]
    if not short:
        return ""
    return (f"Scored on fewer than the run's {total} samples (at most, per explainer): {', '.join(short)}. "
            "Localisation metrics need ground truth of the explained class; non-finite maps are left out.")


def incomplete_note(ds: xr.Dataset) -> str:
    """One sentence naming the stages and explainers whose shards are not all finished (from
    the completion records of the run's view), or an empty string for a finished run. Its
    numbers then cover only the finished shards."""
    parts = []
    names = [str(e) for e in ds["explainer"].values] if "explainer" in ds.dims else []
    for stage in ("explain", "evaluate"):
        var = f"record_{stage}"
        if var not in ds:
            continue
        done = np.asarray(ds[var].values) != 0
        for i in explainer_order(ds):
            if not done[i].all():
                parts.append(f"{names[i]} {stage} {int(done[i].sum())}/{done[i].size} shards")
    if "record_neurons" in ds:
        done = np.asarray(ds["record_neurons"].values) != 0
        if not done.all():
            parts.append(f"neurons {int(done.sum())}/{done.size} shards")
    if "record_sanity" in ds and "sanity" in ds:
        missing = [names[i] for i in explainer_order(ds) if not ds["record_sanity"].values[i]]
        if missing:
            parts.append(f"sanity check not done for {', '.join(missing)}")
    if not parts:
        return ""
    return ("Incomplete run: " + "; ".join(parts) + ". Its numbers cover the finished shards only, and "
            "explainers scored on different samples are not comparable; run the same command to finish.")


def flagged_note(ds: xr.Dataset) -> str:
    """One sentence on flagged maps, or an empty string when there are none."""
    counts = flagged_counts(ds)
    if not counts:
        return ""
    parts = ", ".join(f"{e}: {k}" for e, k in counts.items())
    return (f"Non-finite maps (the model's output or the map is NaN/inf) are flagged and left out of "
            f"every mean: {parts}.")


def preprocess_text(p: dict[str, Any] | None) -> str:
    """How images became model inputs, in words (``p``: ``Preprocess.to_json()``)."""
    if not p:
        return "rendered by the embedded dataset (at most 128 px, resized above)"
    h, w = p["size"]
    r = p.get("resize")
    if isinstance(r, list):
        how = f"scaled to cover {r[0]} x {r[1]} px (aspect ratio kept), centre crop {h} x {w}"
    elif r:
        how = f"shorter side resized to {r} px, centre crop {h} x {w}"
    else:
        how = f"resized to {h} x {w}, aspect ratio not kept"
    return f"{how} ({p.get('interpolation', '?')}, antialias {p.get('antialias', '?')})"


def normalisation_text(n: dict[str, Any] | None) -> str:
    """The mean and std the model's inputs were normalised with."""
    if not n:
        return "?"
    return f"(x - mean) / std, mean {list(n['mean'])}, std {list(n['std'])} ({n.get('source', '?')})"


def boxes_text(m: dict[str, Any]) -> str:
    """Boxes the crop clipped or dropped (a multi-object image's ground truth is the union of
    the explained class's boxes)."""
    if not m.get("ground_truth", True):
        return "none (the dataset has no annotations)"
    dropped, clipped = int(m.get("boxes_dropped") or 0), int(m.get("boxes_clipped") or 0)
    if not dropped and not clipped:
        return "none clipped or dropped by the crop; several boxes of a class: their union"
    return (f"{clipped} clipped to the crop, {dropped} outside it dropped; several boxes of a class: "
            "their union")


def maps_stored_text(layout: dict[str, Any]) -> str:
    """``store.attribution_dtype`` and ``store.codec`` in words (older stores: float32, zstd)."""
    dtype, codec = layout.get("attribution_dtype", "float32"), layout.get("codec", "zstd")
    note = "exact" if dtype == "float32" else f"rounded to {dtype}; the metrics score the rounded maps"
    return f"{dtype} ({note}), {codec} compression"


def provenance(ds: xr.Dataset) -> list[tuple[str, str]]:
    """(field, value) pairs describing where the numbers come from."""
    m = manifest_of(ds)
    versions = m.get("versions", {})
    acc = float("nan")
    if "prediction" in ds and "label" in ds:
        acc = float((ds["prediction"].values == ds["label"].values).mean())
    classes = [str(c) for c in m.get("classes", [])]
    shown = ", ".join(classes[:20]) + (f", … ({len(classes)} in all)" if len(classes) > 20 else "")
    return [
        ("run", str(m.get("name", "?"))),
        ("config hash", str(m.get("config_hash", "?"))),
        ("seed", str(m.get("seed", "?"))),
        ("model", str(m.get("model", "?"))),
        ("model weights sha256", str(m.get("model_digest", "?"))),
        ("model accuracy on these samples", f"{acc:.4f}" if np.isfinite(acc) else "n/a"),
        ("data", f"{m.get('data', '?')} ({ds.sizes['sample']} samples)"),
        ("image size", f"{ds.sizes['y']} x {ds.sizes['x']} (height x width)" if "y" in ds.sizes else "?"),
        ("preprocessing", preprocess_text(m.get("preprocess"))),
        ("normalisation", normalisation_text(m.get("normalisation"))),
        ("ground-truth boxes", boxes_text(m)),
        ("classes", shown or "?"),
        ("device", str(m.get("device", "?"))),
        ("maps stored as", maps_stored_text(m.get("layout", {}))),
        ("git commit", str(m.get("git_commit", "?"))),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))),
    ]


def fmt(value: float, digits: int = 4) -> str:
    """A number for a table; an en dash for NaN."""
    return "–" if not np.isfinite(value) else f"{value:.{digits}f}"


def share(value: float) -> str:
    """A share (0-1) as a percentage for a table; an en dash for NaN."""
    return "–" if not np.isfinite(value) else f"{100 * value:.1f} %"


def _interval(row: pd.Series) -> str:
    if not np.isfinite(row["mean"]):
        return "–"
    return f"{row['mean']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"


def render_markdown(ds: xr.Dataset, figures: Sequence[tuple[str, str]] = (),
                    summary: pd.DataFrame | None = None) -> str:
    """The Markdown summary of a run.

    Parameters
    ----------
    ds : xr.Dataset
        The run store.
    figures : list of (file name, caption)
        Figures written next to the summary, linked at the end.
    summary : pd.DataFrame, optional
        :func:`metric_summary` of ``ds`` with the manifest's options (computed when not given).
    """
    manifest = manifest_of(ds)
    options = ReportOptions.from_manifest(manifest)
    summary = metric_summary(ds, options) if summary is None else summary
    lines = [f"# attriflow run `{manifest.get('name', '?')}`", ""]
    if incomplete_note(ds):  # before any number
        lines += [f"> **Warning:** {incomplete_note(ds)}", ""]
    lines += [f"- {k}: {v}" for k, v in provenance(ds)] + [""]
    pct = round(options.confidence * 100)
    lines += [f"## Metrics (mean [{pct}% bootstrap interval] over samples)", ""]
    lines += markdown_metric_table(summary)
    lines += ["", "↑ higher is better, ↓ lower is better; best explainer per metric and best family "
              "sub-total in bold; `all <family>` pools the family's explainers' samples.", ""]
    if flagged_note(ds):
        lines += [f"**{flagged_note(ds)}**", ""]
    if coverage_note(ds, summary):
        lines += [coverage_note(ds, summary), ""]
    lines += ["## Cost", "", STAGE_COST_NOTE, "",
              "| stage | task seconds | seconds / image | share | timed tasks |", "|---|---|---|---|---|"]
    for _, r in stage_costs(ds).iterrows():
        lines.append(f"| {r['stage']} | {fmt(r['seconds'], 1)} | {fmt(r['seconds_per_image'], 4)} | "
                     f"{share(r['share'])} | {r['timed']}/{r['tasks']} |")
    lines += ["", "| family | explainer | explain s / image | evaluate s / image | sanity s | "
              "forward passes / image | backward passes / image |", "|---|---|---|---|---|---|---|"]
    for _, r in cost_table(ds).iterrows():
        cells = [fmt(r.get("explain_seconds_per_image", np.nan), 5),
                 fmt(r.get("evaluate_seconds_per_image", np.nan), 5), fmt(r.get("sanity_seconds", np.nan), 2), fmt(r.get("forward_per_image", np.nan), 1),
                 fmt(r.get("backward_per_image", np.nan), 1)]
        lines.append(f"| {r['family']} | `{r['explainer']}` | " + " | ".join(cells) + " |")
    lines.append("")
    sanity = sanity_table(ds, options.threshold)
    if sanity is not None:
        lines += [f"## Sanity check: depth where similarity falls below {options.threshold}", "",
                  "Cascading model-parameter randomisation, top layer first (depth 1 = the top unit).", "",
                  "| family | explainer | " + " | ".join(SIMILARITIES) + " |", "|---|---|" + "---|" * len(SIMILARITIES)]
        for _, r in sanity.iterrows():
            lines.append(f"| {r['family']} | `{r['explainer']}` | " + " | ".join(str(r[s]) for s in SIMILARITIES) + " |")
        lines.append("")
    if "overlap_code" in ds:
        lines += neuron_section(ds)
    skipped = manifest.get("skipped", [])
    if skipped:
        lines += [f"## Skipped inputs ({len(skipped)})", "",
                  "Files left out of the run (missing, undecodable, too large, or without an object of a "
                  "known class):", ""]
        lines += [f"- `{s['file']}`: {s['reason']}" for s in skipped]
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{caption}]({name})" for name, caption in figures]
        lines.append("")
    return "\n".join(lines)


def markdown_metric_table(summary: pd.DataFrame) -> list[str]:
    """Rows per explainer (and family sub-total), columns per metric."""
    metrics = list(dict.fromkeys(summary["metric"]))
    better = dict(zip(summary["metric"], summary["higher_is_better"]))
    head = ["family", "explainer", *[f"{m} {'↑' if better[m] else '↓'}" for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last_family = None
    for (family, explainer), part in summary.groupby(["family", "explainer"], sort=False):
        by_metric = part.set_index("metric")
        subtotal = bool(part["subtotal"].iloc[0])
        cells = [f"**{family}**" if family != last_family else "",
                 f"*{explainer}*" if subtotal else f"`{explainer}`"]
        for m in metrics:
            r = by_metric.loc[m]
            cell = _interval(r)
            cells.append(f"**{cell}**" if r["best"] else cell)
        lines.append("| " + " | ".join(cells) + " |")
        last_family = family
    return lines


def neuron_section(ds: xr.Dataset) -> list[str]:
    """Markdown lines: per layer, the mean overlap of the two selected sets and the mean
    score of the selected neurons (figures come with the HTML report)."""
    lines = ["## Neuron selection (input resampling)", "",
             "| layer | overlap (code: #A∩B / (#A + #B)) | Jaccard (#A∩B / #A∪B) | mean abs. correlation of "
             "the correlation-selected |", "|---|---|---|---|"]
    for row in neuron_rows(ds):
        lines.append(f"| `{row[0]}` | {row[2]:.3f} | {row[3]:.3f} | {row[1]:.3f} |")
    lines += ["", "Overlap 0.5 (code formula) or 1 (Jaccard) means both metrics pick the same channels.", ""]
    return lines


def neuron_rows(ds: xr.Dataset) -> list[tuple[str, float, float, float]]:
    """Per layer: (layer, mean |correlation| of the correlation-selected channels, mean
    overlap (code formula), mean Jaccard)."""
    code = ds["overlap_code"].values
    jac = ds["overlap_jaccard"].values
    corr = ds["neuron_correlation"].values
    sel_c = ds["selected_correlation"].values
    unit_layer = np.asarray([str(v) for v in ds["unit_layer"].values])
    out = []
    for li, layer in enumerate(ds["layer"].values):
        cols = unit_layer == str(layer)
        chosen = corr[:, cols][sel_c[:, cols]]
        out.append((str(layer), _nanmean(chosen), _nanmean(code[:, li]), _nanmean(jac[:, li])))
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
