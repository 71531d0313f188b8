"""Several runs side by side: what may be compared, and which differences are real.

Pure functions on run stores (``xarray.Dataset`` views as the report reads them):

* :func:`paired_tests`: each explainer against itself (never a family total, which may pool
  different methods), per metric, on the samples both runs scored (matched by
  ``sample_key``: name and content digest), by the Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``, two-sided; pairs with a zero difference are dropped, so a
  hit-or-miss metric reduces to the sign test of its discordant pairs), each later run
  against the first, Holm-corrected over every test of the comparison (explainers x metrics
  x runs), the direction of a difference being the test's own (the larger signed-rank sum),
  not the sign of the mean difference;
* :func:`comparison_warnings`: what makes the numbers of two runs incomparable (other
  samples, model, data, image size or evaluation settings);
* :func:`config_diff`: the settings that differ, as dotted keys.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

#: Differences are marked when the Holm-adjusted p-value is below this.
ALPHA = 0.05
#: Fewer non-zero paired differences than this cannot reach ALPHA two-sided: no test.
MIN_PAIRS = 6
TEST_NAME = ("Wilcoxon signed-rank (two-sided, paired over shared samples, Holm-corrected over every explainer, "
             "metric and run compared)")


def _manifest(ds: xr.Dataset) -> dict[str, Any]:
    return json.loads(ds.attrs.get("manifest", "{}"))


def _keys(ds: xr.Dataset) -> np.ndarray:
    name = "sample_key" if "sample_key" in ds.coords else "sample_name" if "sample_name" in ds.coords else "sample"
    return np.asarray([str(k) for k in ds[name].values])


def _holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``p`` (NaN kept)."""
    finite = [(v, i) for i, v in enumerate(p) if np.isfinite(v)]
    out = [float("nan")] * len(p)
    running = 0.0
    for rank, (v, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (len(finite) - rank) * v))
        out[i] = running
    return out


#: The ``evaluate`` settings each metric's score depends on (``batch_size`` changes no
#: score); a metric not listed depends on every setting.
SCORE_SETTINGS: dict[str, tuple[str, ...]] = {
    "deletion_auc": ("steps", "blur_kernel", "blur_sigma"),
    "insertion_auc": ("steps", "blur_kernel", "blur_sigma"),
    "average_drop_soft": (), "increase_soft": (),
    "average_drop_top": ("drop_top_fraction",), "increase_top": ("drop_top_fraction",),
    "pointing_game": ("pointing_tolerance",), "energy_pointing_game": (), "bbox_accuracy": (), "iou": (),
    "gini": (),
}


def settings_differ(metric: str, a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    """The ``evaluate`` settings that differ between two runs and change ``metric``'s score
    (:data:`SCORE_SETTINGS`; all differing settings but ``batch_size`` for another metric)."""
    a, b = a or {}, b or {}
    keys = SCORE_SETTINGS.get(metric, tuple(k for k in {*a, *b} if k != "batch_size"))
    return sorted(k for k in keys if a.get(k) != b.get(k))


def paired_tests(runs: dict[str, xr.Dataset]) -> pd.DataFrame:
    """Every (explainer, metric) scored by the first run and another run, compared on the
    samples both scored.

    Parameters
    ----------
    runs : dict of label to Dataset
        Run stores (``score`` over explainer, sample, metric; coordinate ``sample_key``),
        the first is the reference.

    Returns
    -------
    pd.DataFrame
        One row per (explainer, metric, run other than the first) with columns
        ``explainer, metric, run, reference, n`` (pairs with both scores finite), ``nonzero``
        (pairs that differ),
        ``mean_difference`` (run minus reference over those pairs), ``p`` (Wilcoxon
        signed-rank, NaN with fewer than :data:`MIN_PAIRS` non-zero differences), ``up``
        (the positive differences' rank sum is the larger), ``p_holm`` (over all rows) and
        ``verdict``: ``better`` / ``worse`` (Holm-adjusted p below :data:`ALPHA`, the
        direction ``up`` read in the metric's sense), ``not significant``, ``identical
        scores``, ``too few pairs``, or ``not compared: other evaluation settings`` (the
        runs' ``evaluate`` settings that this metric depends on differ, so the same map
        scores differently, :func:`settings_differ`: no test, ``comparable`` False).
    """
    from scipy.stats import rankdata, wilcoxon

    labels = list(runs)
    ref_label, ref = labels[0], runs[labels[0]]
    ref_keys = _keys(ref)
    ref_pos = {k: i for i, k in enumerate(ref_keys)}
    ref_names = [str(e) for e in ref["explainer"].values]
    ref_metrics = [str(m) for m in ref["metric"].values]
    better = dict(zip(ref_metrics, (bool(b) for b in ref["higher_is_better"].values)))
    ref_score = np.asarray(ref["score"].values, dtype=np.float64)
    rows: list[dict[str, Any]] = []
    ref_eval = _manifest(ref).get("config", {}).get("evaluate")
    for label in labels[1:]:
        other = runs[label]
        other_eval = _manifest(other).get("config", {}).get("evaluate")
        keys = _keys(other)
        shared = [(ref_pos[k], j) for j, k in enumerate(keys) if k in ref_pos]
        ri = np.array([a for a, _ in shared], dtype=np.int64)
        oi = np.array([b for _, b in shared], dtype=np.int64)
        names = [str(e) for e in other["explainer"].values]
        metrics = [str(m) for m in other["metric"].values]
        score = np.asarray(other["score"].values, dtype=np.float64)
        for e, name in enumerate(names):
            if name not in ref_names:
                continue
            re_ = ref_names.index(name)
            for m, metric in enumerate(metrics):
                if metric not in ref_metrics:
                    continue
                a = ref_score[re_, ri, ref_metrics.index(metric)] if len(ri) else np.empty(0)
                b = score[e, oi, m] if len(oi) else np.empty(0)
                ok = np.isfinite(a) & np.isfinite(b)
                if not ok.any():
                    continue
                d = b[ok] - a[ok]
                p, up = float("nan"), False
                comparable = not settings_differ(metric, ref_eval, other_eval)
                nz = d[d != 0]
                if comparable and len(nz) >= MIN_PAIRS:
                    p = float(wilcoxon(b[ok], a[ok], zero_method="wilcox", alternative="two-sided").pvalue)
                    ranks = rankdata(np.abs(nz))
                    up = bool(ranks[nz > 0].sum() > ranks[nz < 0].sum())  # the test's own direction
                rows.append({"explainer": name, "metric": metric, "run": label, "reference": ref_label,
                             "n": int(ok.sum()), "nonzero": int(np.count_nonzero(d)),
                             "mean_difference": float(d.mean()), "p": p, "up": up, "comparable": comparable,
                             "higher_is_better": better.get(metric, True)})
    df = pd.DataFrame(rows, columns=["explainer", "metric", "run", "reference", "n", "nonzero", "mean_difference",
                                     "p", "up", "comparable", "higher_is_better"])
    df["p_holm"] = _holm(list(df["p"]))  # over every test of the table: explainers, metrics and runs
    verdicts = []
    for _, r in df.iterrows():
        if not r["comparable"]:
            verdicts.append("not compared: other evaluation settings")
        elif not np.isfinite(r["p_holm"]):
            verdicts.append("too few pairs" if r["nonzero"] else "identical scores")
        elif r["p_holm"] >= ALPHA:
            verdicts.append("not significant")
        else:
            verdicts.append("better" if bool(r["up"]) == bool(r["higher_is_better"]) else "worse")
    df["verdict"] = verdicts
    return df


def comparison_warnings(runs: dict[str, xr.Dataset]) -> list[str]:
    """Sentences naming what differs between the first run and each other one that makes
    their numbers not directly comparable: the samples (shared / each run's count), the
    model (weights digest), the data, the image size, the evaluation settings."""
    labels = list(runs)
    ref_label, ref = labels[0], runs[labels[0]]
    ref_m = _manifest(ref)
    ref_keys = set(_keys(ref))
    out = []
    for label in labels[1:]:
        ds, m = runs[label], _manifest(runs[label])
        keys = set(_keys(ds))
        shared = len(ref_keys & keys)
        if keys != ref_keys:
            out.append(f"`{label}` and `{ref_label}` scored different samples ({shared} shared of {len(keys)} and "
                       f"{len(ref_keys)}): the paired tests use the shared ones only; means over all samples are "
                       "not comparable")
        if m.get("model_digest") != ref_m.get("model_digest"):
            out.append(f"`{label}` explains another model than `{ref_label}` ({m.get('model', '?')} against "
                       f"{ref_m.get('model', '?')}): differences mix the model and the explainer")
        if m.get("data") != ref_m.get("data") or m.get("preprocess") != ref_m.get("preprocess"):
            out.append(f"`{label}` reads other data or preprocessing than `{ref_label}` ({m.get('data', '?')} "
                       f"against {ref_m.get('data', '?')})")
        if (ds.sizes.get("y"), ds.sizes.get("x")) != (ref.sizes.get("y"), ref.sizes.get("x")):
            out.append(f"`{label}` maps are {ds.sizes.get('y')}x{ds.sizes.get('x')} pixels, `{ref_label}`'s "
                       f"{ref.sizes.get('y')}x{ref.sizes.get('x')}")
        ev, ref_ev = m.get("config", {}).get("evaluate") or {}, ref_m.get("config", {}).get("evaluate") or {}
        differ = sorted(k for k in {*ev, *ref_ev} if k != "batch_size" and ev.get(k) != ref_ev.get(k))
        if differ:
            said = ", ".join(f"{k}: {ev.get(k)} against {ref_ev.get(k)}" for k in differ)
            out.append(f"`{label}` was evaluated with other settings than `{ref_label}` (evaluate.{said}): the "
                       "metrics that depend on them score the same map differently and are not compared")
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(value, sort_keys=True)}


def config_diff(runs: dict[str, xr.Dataset]) -> pd.DataFrame:
    """The config settings (dotted keys, JSON values) that differ between the runs: index
    the setting, one column per run ('' where a run does not have it)."""
    flat = {label: _flatten(_manifest(ds).get("config", {})) for label, ds in runs.items()}
    keys = sorted(set().union(*(f.keys() for f in flat.values())))
    rows = {k: [flat[label].get(k, "") for label in runs] for k in keys}
    diff = {k: v for k, v in rows.items() if len(set(v)) > 1}
    return pd.DataFrame.from_dict(diff, orient="index", columns=list(runs)) if diff else \
        pd.DataFrame(columns=list(runs))
