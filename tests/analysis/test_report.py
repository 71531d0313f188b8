"""Report tables on a hand-made store: intervals, family order and sub-totals, best marks,
cost per image, sanity collapse depths, and the HTML page."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from attriflow.analysis.html import Figure, render_run_html
from attriflow.analysis.report import (
    ReportOptions,
    bootstrap_mean,
    cost_table,
    family_order,
    metric_summary,
    render_markdown,
    sanity_table,
    wide_table,
)

TAXONOMY = [["gradient", "white-box / gradient"], ["relevance", "white-box / relevance"], ["cam", "white-box / cam"],
            ["perturbation", "black-box / perturbation"]]


def _store(n: int = 40) -> xr.Dataset:
    rng = np.random.default_rng(0)
    explainers = ["occ", "gc", "sal", "gxi"]  # config order is not taxonomy order
    families = ["perturbation", "cam", "gradient", "gradient"]
    metrics = ["deletion_auc", "insertion_auc", "pointing_game"]
    score = rng.normal(0.5, 0.1, (4, n, 3))
    score[1, :, 0] -= 0.3  # gc: the best (lowest) deletion
    score[3, :, 1] += 0.3  # gxi: the best insertion
    score[:, :, 2] = np.nan  # no ground truth
    sanity = np.ones((4, 5, 3, 3))
    sanity[1, :, 1:] = 0.2  # gc collapses at depth 2
    sanity[2, :, 2, 2] = 0.1  # sal's SSIM collapses at depth 3
    sanity[2, :, :, :2] = 0.0  # constant randomised maps: the stage stores Spearman 0
    sanity[0, :2] = np.nan  # flagged (non-finite) samples are left out, not counted as 0
    manifest = {"name": "t<b>", "seed": 7, "taxonomy": TAXONOMY,
                "config": {"shard_size": 16, "report": {"bootstrap": 500, "confidence": 0.9},
                           "sanity": {"threshold": 0.5}},
                "explainers": {e: {"method": e, "family": f, "params": {}} for e, f in zip(explainers, families)}}
    return xr.Dataset(
        {
            "score": (("explainer", "sample", "metric"), score),
            "explain_seconds": (("explainer", "shard"), np.array([[1.6, 1.6, 0.8]] * 4)),
            "forward_passes": (("explainer", "sample"), np.full((4, n), 3)),
            "backward_passes": (("explainer", "sample"), np.full((4, n), -1)),
            "sanity": (("explainer", "sanity_sample", "depth", "similarity"), sanity),
            "label": (("sample",), np.zeros(n, int)),
            "prediction": (("sample",), (np.arange(n) % 4 != 0).astype(int) * 0),
        },
        coords={"explainer": explainers, "family": ("explainer", families),
                "metric": metrics, "higher_is_better": ("metric", [False, True, True]),
                "category": ("metric", ["faithfulness", "faithfulness", "localisation"]),
                "randomised": ("depth", ["fc", "block2", "block1"]), "depth": [1, 2, 3]},
        attrs={"manifest": json.dumps(manifest)},
    )


def test_bootstrap_interval_matches_the_normal_theory_and_is_seeded() -> None:
    values = np.random.default_rng(1).normal(3.0, 2.0, 400)
    mean, lo, hi = bootstrap_mean(values, 4000, 0.95, seed=5)
    assert mean == pytest.approx(values.mean())
    assert lo < mean < hi
    assert hi - lo == pytest.approx(2 * 1.96 * values.std() / np.sqrt(400), rel=0.1)
    assert bootstrap_mean(values, 4000, 0.95, seed=5) == (mean, lo, hi)
    assert bootstrap_mean(np.array([np.nan, 2.0]), 100, 0.95, 0) == (2.0, 2.0, 2.0)
    assert all(np.isnan(bootstrap_mean(np.array([np.nan]), 100, 0.95, 0)))


def test_summary_groups_by_taxonomy_with_subtotals_and_marks_the_best() -> None:
    ds = _store()
    assert family_order(ds) == ["gradient", "cam", "perturbation"]
    s = metric_summary(ds)
    assert "pointing_game" not in set(s["metric"])  # nobody could score it
    # a sub-total only for families of two or more explainers
    assert list(dict.fromkeys(s["explainer"])) == ["sal", "gxi", "all gradient", "gc", "occ"]
    pooled = s[(s["explainer"] == "all gradient") & (s["metric"] == "insertion_auc")].iloc[0]
    score = ds["score"].values
    assert pooled["mean"] == pytest.approx(np.concatenate([score[2, :, 1], score[3, :, 1]]).mean())
    assert pooled["n"] == 80
    best = s[s["best"]]
    assert set(best[~best["subtotal"]].apply(lambda r: (r["metric"], r["explainer"]), axis=1)) == {
        ("deletion_auc", "gc"), ("insertion_auc", "gxi")}
    assert not best["subtotal"].any()  # one family total: nothing to be the best of
    # 90 % intervals from the manifest's options: narrower than 99 % ones
    wide = metric_summary(ds, ReportOptions(bootstrap=500, confidence=0.99))
    assert ((s["high"] - s["low"]) < (wide["high"] - wide["low"])).all()
    assert wide_table(s).loc[("cam", "gc"), "deletion_auc"] == pytest.approx(score[1, :, 0].mean())


def test_cost_per_image_accounts_for_the_short_last_shard() -> None:
    ds = _store(n=40)  # shards of 16, 16, 8
    cost = cost_table(ds).set_index("explainer")
    assert cost.loc["sal", "explain_seconds_per_image"] == pytest.approx(4.0 / 40)
    assert cost.loc["sal", "forward_per_image"] == 3
    assert np.isnan(cost.loc["sal", "backward_per_image"])  # -1: the method could not count


def test_stage_costs_of_fully_and_partly_timed_stages() -> None:
    from attriflow.analysis.report import STAGE_TIMINGS, stage_costs
    from attriflow.tasks.storage import TIMINGS

    assert {var for _, var in STAGE_TIMINGS} == set(TIMINGS)  # every stored timing is reported
    ds = _store(n=40)  # shards of 16, 16, 8; explain: 4 s per explainer over 40 images
    evaluate = np.array([[3.2, np.nan, np.nan]] * 4)  # timed on the first shard only (an older store)
    ds = ds.assign(load_seconds=("shard", [0.4, 0.4, 0.2]),
                   evaluate_seconds=(("explainer", "shard"), evaluate),
                   sanity_seconds=("explainer", [2.0, np.nan, 2.0, 2.0]),
                   neurons_seconds=("shard", [np.nan] * 3))
    costs = stage_costs(ds).set_index("stage")
    assert list(costs.index) == ["load", "explain", "neurons", "evaluate", "sanity"]
    assert costs.loc["explain", "seconds"] == pytest.approx(16.0)
    assert costs.loc["explain", "seconds_per_image"] == pytest.approx(16.0 / 40)
    # partly timed: the rate of the timed shard (3.2 s / 16 images per explainer), not the
    # timed seconds spread over every image
    assert costs.loc["evaluate", "seconds"] == pytest.approx(12.8)
    assert costs.loc["evaluate", "seconds_per_image"] == pytest.approx(4 * 3.2 / 16)
    assert (costs.loc["evaluate", "timed"], costs.loc["evaluate", "tasks"]) == (4, 12)
    assert costs.loc["sanity", "seconds_per_image"] == pytest.approx(2.0 * 4 / 40)
    # a stage with no timed task: unknown, and so are the shares
    assert np.isnan(costs.loc["neurons", "seconds"]) and np.isnan(costs.loc["neurons", "seconds_per_image"])
    assert costs["share"].isna().all()
    full = stage_costs(ds.drop_vars("neurons_seconds")).set_index("stage")
    assert full["share"].sum() == pytest.approx(1.0)
    assert full.loc["evaluate", "share"] == pytest.approx(0.8 / (0.025 + 0.4 + 0.8 + 0.2))


def test_sanity_collapse_depths() -> None:
    table = sanity_table(_store()).set_index("explainer")
    assert table.loc["occ", "ssim"] == "never"
    assert table.loc["gc", "spearman_abs"] == "2 (block2)"
    assert table.loc["sal", "ssim"] == "3 (block1)"
    assert table.loc["sal", "spearman"] == "1 (fc)"
    assert table.loc["occ", "spearman"] == "never"


def test_html_page_has_family_sections_figures_and_escapes() -> None:
    ds = _store()
    png = b"\x89PNG fake"
    page = render_run_html(ds, {"grid": Figure("grid", "a <grid>", png)}, {"cam": Figure("c", "curves", png)},
                           {"gradient": (0, 0, 1), "cam": (1, 0, 0), "perturbation": (0, 1, 0)})
    for family in ("gradient", "cam", "perturbation"):
        assert f'<section class="family" id="family-{family}"' in page
    assert page.index('id="family-gradient"') < page.index('id="family-cam"') < page.index('id="family-perturbation"')
    assert page.count("data:image/png;base64,") == 2 and "a &lt;grid&gt;" in page
    assert "t<b>" not in page and "t&lt;b&gt;" in page
    assert 'class="best"' in page
    md = render_markdown(ds, [("grid.png", "grid")])
    assert "| **gradient** | `sal` |" in md and "*all gradient*" in md and "![grid](grid.png)" in md


def test_a_store_with_no_score_yet_still_renders() -> None:
    """Every evaluate shard failed: the summary is an empty table and the report renders (so a
    failed run reports its failed shards, not a crash of the report)."""
    from attriflow.analysis.plots import plot_metric_distributions

    ds = _store()
    ds["score"][:] = np.nan
    summary = metric_summary(ds)
    assert summary.empty and {"metric", "mean", "best"} <= set(summary.columns)
    assert plot_metric_distributions(ds) is not None
    page = render_run_html(ds, {}, {}, {"gradient": (0, 0, 1), "cam": (1, 0, 0), "perturbation": (0, 1, 0)})
    assert "Provenance" in page and "# attriflow run" in render_markdown(ds)


def test_inactive_entries_are_shown_apart_and_never_marked_best() -> None:
    """``report.include_inactive``: an earlier setting keeps the scores of its own evaluation
    settings, so it is pooled in its own family rows and never marked best (a store's view
    suffixes its family ``-inactive``)."""
    ds = _store()
    ds = ds.assign_coords(family=("explainer", ["perturbation", "cam-inactive", "gradient", "gradient"]))
    summary = metric_summary(ds)
    rows = summary[(summary["explainer"] == "gc") & (summary["metric"] == "deletion_auc")]
    assert not rows["best"].any()  # gc is the lowest deletion, but inactive
    best = summary[(summary["metric"] == "deletion_auc") & ~summary["subtotal"] & summary["best"]]
    assert list(best["explainer"]) != ["gc"] and len(best) == 1


def test_curves_of_different_lengths_are_drawn() -> None:
    """A store keeps its longest curve length; a shorter curve is NaN-padded and still drawn."""
    from attriflow.analysis.plots import plot_curves

    ds = _store(8)
    curve = np.full((4, 8, 3, 9), np.nan)
    curve[:, :, 0, :5] = np.linspace(1, 0, 5)  # 4 steps, padded to 9 points
    curve[:, :, 1, :] = np.linspace(0, 1, 9)
    ds = ds.assign(curve=(("explainer", "sample", "metric", "point"), curve))
    fig = plot_curves(ds, ["cam"])
    assert [len(ax.lines) for ax in fig.axes] == [1, 1]
    assert len(fig.axes[0].lines[0].get_xdata()) == 5
