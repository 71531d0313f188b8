"""Comparing runs: explainers against themselves on shared samples, planted differences found,
identical runs never marked, incomparable runs said so."""

from __future__ import annotations

import json

import numpy as np
import xarray as xr
from scipy.stats import wilcoxon

from attriflow.analysis.compare import ALPHA, comparison_warnings, config_diff, paired_tests


def _run(keys: list[str], score: np.ndarray, *, digest: str = "m1", steps: int = 32,
         explainers: tuple[str, ...] = ("sal", "gc"), batch_size: int = 256,
         metrics: tuple[str, ...] = ("deletion_auc", "insertion_auc")) -> xr.Dataset:
    manifest = {"model_digest": digest, "model": f"model {digest}", "data": "embedded",
                "config": {"seed": 0, "evaluate": {"steps": steps, "batch_size": batch_size},
                           "explain": {"batch_size": 8}}}
    return xr.Dataset(
        {"score": (("explainer", "sample", "metric"), score)},
        coords={"explainer": list(explainers), "metric": list(metrics),
                "higher_is_better": ("metric", [m != "deletion_auc" for m in metrics]),
                "sample_key": ("sample", keys)},
        attrs={"manifest": json.dumps(manifest)},
    )


def test_a_planted_difference_is_found_on_shared_samples_in_any_order() -> None:
    rng = np.random.default_rng(0)
    n = 40
    keys = [f"img{i}#d{i}" for i in range(n)]
    base = rng.normal(0.5, 0.1, (2, n, 2))
    ref = _run(keys, base)
    # the other run lists the samples in another order, with 5 of its own; its saliency is
    # 0.05 higher on both metrics (worse deletion, better insertion), Grad-CAM only noise
    order = rng.permutation(n)
    moved = base[:, order] + rng.normal(0, 0.002, (2, n, 2))
    moved[0] += 0.05
    extra = rng.normal(0.5, 0.1, (2, 5, 2))
    other = _run([keys[i] for i in order] + [f"new{i}#x" for i in range(5)], np.concatenate([moved, extra], 1))
    same = _run(keys, base.copy())
    tests = paired_tests({"a": ref, "b": other, "c": same}).set_index(["explainer", "metric", "run"])
    assert tests.loc[("sal", "insertion_auc", "b"), "verdict"] == "better"
    assert tests.loc[("sal", "deletion_auc", "b"), "verdict"] == "worse"
    assert tests.loc[("sal", "insertion_auc", "b"), "n"] == n  # the 5 new samples are not paired
    assert abs(tests.loc[("sal", "insertion_auc", "b"), "mean_difference"] - 0.05) < 0.002
    for metric in ("deletion_auc", "insertion_auc"):
        assert tests.loc[("gc", metric, "b"), "verdict"] == "not significant"  # zero-mean noise only
        assert tests.loc[("sal", metric, "c"), "verdict"] == "identical scores"  # nothing to test
        assert np.isnan(tests.loc[("sal", metric, "c"), "p"])
    # the p-value is scipy's on the matched pairs, Holm-adjusted over the two runs compared
    pos = {k: i for i, k in enumerate(keys)}
    b_idx = [list(order).index(pos[k]) for k in keys]
    p = wilcoxon(np.concatenate([moved, extra], 1)[0, b_idx, 1], base[0, :, 1]).pvalue
    assert np.isclose(tests.loc[("sal", "insertion_auc", "b"), "p"], p)
    assert tests.loc[("sal", "insertion_auc", "b"), "p_holm"] <= ALPHA


def test_noise_alone_is_not_marked_and_few_pairs_are_not_tested() -> None:
    rng = np.random.default_rng(1)
    n = 30
    keys = [f"s{i}" for i in range(n)]
    ref = _run(keys, rng.normal(0.5, 0.1, (2, n, 2)))
    marked = 0
    for seed in range(20):  # independent noise: at most a few chance findings in 80 tests at 5 %
        other = _run(keys, ref["score"].values + np.random.default_rng(seed).normal(0, 0.1, (2, n, 2)))
        marked += int(paired_tests({"a": ref, "b": other})["verdict"].isin(["better", "worse"]).sum())
    assert marked <= 2  # Holm over the table: at most 5 % of comparisons with any mark
    few = _run(keys[:4], ref["score"].values[:, :4] + 0.3)
    assert set(paired_tests({"a": ref, "b": few})["verdict"]) == {"too few pairs"}


def test_the_direction_is_the_tests_not_the_means() -> None:
    """20 of 21 samples a little better, one much worse: the signed ranks say better, the
    mean difference (negative) would have said worse."""
    keys = [f"s{i}" for i in range(21)]
    base = np.full((2, 21, 2), 0.5)
    moved = base.copy()
    moved[0, :20, 1] += 0.01
    moved[0, 20, 1] -= 0.9
    t = paired_tests({"a": _run(keys, base), "b": _run(keys, moved)}).set_index(["explainer", "metric"])
    assert t.loc[("sal", "insertion_auc"), "mean_difference"] < 0
    assert t.loc[("sal", "insertion_auc"), "verdict"] == "better"


def test_comparison_maps_of_runs_with_other_image_sizes() -> None:
    from attriflow.analysis.plots import plot_comparison_maps

    def maps_run(size: int, keys: list[str]) -> xr.Dataset:
        ds = _run(keys, np.zeros((2, len(keys), 2)))
        a = np.random.default_rng(size).normal(size=(2, len(keys), size, size))
        return ds.assign(attribution=(("explainer", "sample", "y", "x"), a))

    fig = plot_comparison_maps({"a": maps_run(8, ["p", "q", "r"]), "b": maps_run(6, ["r", "q"])})
    assert fig is not None and len([ax for ax in fig.axes if ax.images]) == 2 * 2 * 2  # q, r x sal, gc x runs
    assert plot_comparison_maps({"a": maps_run(8, ["p"]), "b": maps_run(8, ["z"])}) is None


def test_incomparable_runs_are_named_and_settings_diffed() -> None:
    keys = [f"s{i}" for i in range(10)]
    score = np.zeros((2, 10, 2))
    ref = _run(keys, score)
    assert comparison_warnings({"a": ref, "b": _run(keys, score)}) == []
    other = _run(keys[:6] + ["t1", "t2"], score[:, :8], digest="m2", steps=8)
    text = " ".join(comparison_warnings({"a": ref, "b": other}))
    assert "different samples (6 shared of 8 and 10)" in text and "another model" in text
    assert "evaluated with other settings" in text
    # other evaluation settings: the same maps score differently, so no verdict at all
    shifted = _run(keys, score + 0.2, steps=8)
    assert set(paired_tests({"a": ref, "b": shifted})["verdict"]) == {"not compared: other evaluation settings"}
    assert "(evaluate.steps: 8 against 32)" in " ".join(comparison_warnings({"a": ref, "b": shifted}))
    # ... only the metrics that depend on the setting; a batch size changes no score
    three = ("deletion_auc", "insertion_auc", "gini")
    s3 = np.random.default_rng(1).normal(size=(2, 10, 3))
    verdicts = paired_tests({"a": _run(keys, s3, metrics=three),
                             "b": _run(keys, s3 + 0.5, steps=8, metrics=three)}).set_index(["explainer", "metric"])
    assert verdicts.loc[("sal", "deletion_auc"), "verdict"] == "not compared: other evaluation settings"
    assert verdicts.loc[("sal", "gini"), "verdict"] == "better"  # 10 pairs, all +0.5
    batch = {"a": ref, "b": _run(keys, score, batch_size=64)}
    assert comparison_warnings(batch) == [] and "not compared" not in set(paired_tests(batch)["verdict"])
    diff = config_diff({"a": ref, "b": other})
    assert list(diff.index) == ["evaluate.steps"] and diff.loc["evaluate.steps"].tolist() == ["32", "8"]
