"""The report: rendered from the store alone, published as Prefect artifacts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from prefect.cache_policies import NO_CACHE

from attriflow.analysis.report import render_markdown
from attriflow.tasks import storage
from attriflow.tasks.runtime import (
    fault_point,
)
from attriflow.tasks.stages.common import shard_task, store_path


def artifact_key(name: str, suffix: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) stable for a run name."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"
    return f"{slug}-{suffix}"


def artifact_markdown(summary_md: str, report_dir: Path) -> str:
    """The Markdown summary for a Prefect artifact: a browser showing the artifact cannot
    resolve the figures' relative paths, so each figure becomes a link to its file (which
    exists: the report wrote it) and the page starts with the self-contained HTML report's
    location."""
    base = report_dir.resolve()

    def link(m: re.Match[str]) -> str:
        return f"[figure: {m.group(1)}]({(base / m.group(2)).as_uri()})"

    text = re.sub(r"!\[([^\]]*)\]\(([^)/:]+\.png)\)", link, summary_md)
    return f"Full report (self-contained HTML, figures embedded): {(base / 'index.html').as_uri()}\n\n{text}"


def artifact_table(summary: Any) -> list[dict[str, Any]]:
    """Rows of the metric artifact: per (family, explainer or sub-total, metric) the mean,
    its bootstrap interval (``low``, ``high``), the number of samples and the best mark;
    non-finite numbers as None (JSON)."""
    cols = ["family", "explainer", "metric", "mean", "low", "high", "n", "best"]
    rows = summary[cols].to_dict(orient="records")
    return [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()} for r in rows]


@shard_task(name="write-report", cache_policy=NO_CACHE)
def write_report(run_dir: str) -> str:
    """Regenerate ``RUN_DIR/report/`` from the store alone and publish the summary as
    Prefect artifacts under stable keys: ``<run name>-summary`` (:func:`artifact_markdown`)
    and ``<run name>-metrics`` (:func:`artifact_table`: means with their intervals), so the
    Prefect UI shows it."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from attriflow.analysis.report import metric_summary

    path = render_report(run_dir)
    ds = storage.open_current(store_path(run_dir), dask=False)
    name = json.loads(ds.attrs["manifest"])["name"]
    create_markdown_artifact(artifact_markdown(path.read_text(), path.parent), key=artifact_key(name, "summary"),
                             description=f"attriflow report of {run_dir}")
    create_table_artifact(artifact_table(metric_summary(ds)), key=artifact_key(name, "metrics"),
                          description="mean score and bootstrap interval per explainer (and family sub-total), "
                                      "in taxonomy order")
    return str(path)


def _save(fig: Any, out: Path, name: str, caption: str, svg: bool = False) -> Any:
    """Write a figure as PNG (and SVG when ``svg``; a stale SVG of an earlier report is
    removed otherwise); return it encoded for the HTML page."""
    import io

    import matplotlib
    import matplotlib.pyplot as plt

    from attriflow.analysis.html import Figure

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    (out / f"{name}.png").write_bytes(buf.getvalue())
    if svg:
        with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as <text>, not glyph paths: smaller, faster
            fig.savefig(out / f"{name}.svg")
    else:
        (out / f"{name}.svg").unlink(missing_ok=True)
    plt.close(fig)
    return Figure(name, caption, buf.getvalue())


#: Variables up to this size are read into memory once (the report reads them many times);
#: larger ones (maps, masks, the neurons' unit boxes of which only a few images are drawn)
#: stay lazy, so the report's memory does not grow with the number of samples beyond the
#: per-sample tables.
SMALL_BYTES = 16 * 2**20


def _load_small(ds: Any) -> Any:
    return ds.assign({name: var.load() for name, var in ds.data_vars.items() if var.nbytes <= SMALL_BYTES})


def _shards_of(ds: Any) -> np.ndarray:
    """The shards holding the samples the current config uses."""
    size = int(json.loads(ds.attrs["fixed"])["shard_size"]) if "fixed" in ds.attrs else ds.sizes["sample"]
    return np.unique(np.flatnonzero(ds["sample_order"].values >= 0) // size)


def render_report(run_dir: str | Path, svg: bool | None = None) -> Path:
    """Write ``RUN_DIR/report/`` from the store alone: ``index.html`` (self-contained),
    ``summary.md`` and every figure as PNG (and SVG: ``svg``, by default the run's
    ``report.svg``); returns the summary path."""
    from attriflow.analysis import plots
    from attriflow.analysis.html import render_run_html
    from attriflow.analysis.report import ReportOptions, manifest_of, metric_summary

    raw = storage.open_dataset(store_path(run_dir), dask=False)  # whole selections per zarr call
    options = ReportOptions.from_manifest(manifest_of(raw))
    vector = options.svg if svg is None else svg

    def save(fig: Any, out: Path, name: str, caption: str) -> Any:
        return _save(fig, out, name, caption, svg=vector)

    ds = storage.select_current(raw, options.include_inactive)
    config = manifest_of(raw).get("config", {})
    for feature in ("neurons", "sanity"):  # a stage the config turned off keeps its results, unreported
        if not config.get(feature, {}).get("enabled", True):
            ds = ds.drop_vars([v for v in storage.FEATURES[feature] if v in ds.variables])
    ds = _load_small(ds)
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    summary = metric_summary(ds, options)  # bootstrap intervals, computed once for every output
    figures["distributions"] = save(plots.plot_metric_distributions(ds, summary), out, "metric_distributions",
                                     "Per-sample metric distributions (hit-or-miss metrics as the share of samples "
                                     "with its interval), explainers in taxonomy order, coloured by family")
    truth = ", ground truth outlined" if "gt_mask" in ds or "gt_box" in ds else ""
    figures["grid"] = save(plots.plot_map_grid(ds, options.grid_samples), out, "map_grid",
                            f"Maps of the first samples (columns in taxonomy order, one colour map and colour bar "
                            f"per explainer){truth}")
    figures["cost"] = save(plots.plot_cost(ds), out, "cost", "Wall time and forward passes per image")
    family_figures = {
        family: save(plots.plot_curves(ds, [family]), out, f"curves_{family}",
                      f"Deletion and insertion curves of the {family} family")
        for family in plots.family_order(ds)
    }
    sanity = plots.plot_sanity(ds, options.threshold)
    if sanity is not None:
        figures["sanity"] = save(sanity, out, "sanity", "Cascading randomisation: similarity against depth")
    neurons_done = storage.read_records(store_path(run_dir)).get("neurons")
    if "neuron_correlation" in ds and neurons_done is not None and (neurons_done[_shards_of(raw)] != 0).all():
        figures["neuron_scatter"] = save(plots.plot_neuron_scatter(ds), out, "neuron_scatter",
                                          "Neuron selection: |correlation| against precision per channel")
        if "preview" in ds:
            figures["neuron_boxes"] = save(plots.plot_neuron_boxes(ds), out, "neuron_boxes",
                                            "Receptive boxes of the selected neurons")
    fault_point("report.after_figures")
    (out / "index.html").write_text(render_run_html(ds, figures, family_figures, plots.family_palette(ds), summary))
    listed = [(f"{f.name}.png", f.caption) for f in [*figures.values(), *family_figures.values()]]
    path = out / "summary.md"
    path.write_text(render_markdown(ds, listed, summary))
    return path


def render_comparison(run_dirs: list[str | Path], out: str | Path) -> tuple[Path, list[str]]:
    """Several runs side by side into ``out`` (``index.html``, ``summary.md``, the comparison
    figure as PNG and SVG, the maps of shared samples as PNG); returns the HTML path and the
    warnings the page opens with (for the console too). Labels
    are the run names, made unique. Explainers are compared only with themselves, by paired
    tests over the shared samples against the first run
    (:func:`attriflow.analysis.compare.paired_tests`); what makes two runs' numbers not
    comparable is said first (:func:`~attriflow.analysis.compare.comparison_warnings`), and
    the settings that differ are listed."""
    from attriflow.analysis import plots
    from attriflow.analysis.compare import ALPHA, TEST_NAME, comparison_warnings, config_diff, paired_tests
    from attriflow.analysis.html import render_comparison_html
    from attriflow.analysis.report import manifest_of, markdown_metric_table, metric_summary

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Any] = {}
    for run_dir in run_dirs:
        ds = storage.open_current(store_path(run_dir), dask=False)
        label = str(manifest_of(ds).get("name", Path(run_dir).name))
        if label in runs:
            label = f"{label} ({Path(run_dir).name})"
        while label in runs:
            label += "'"
        runs[label] = ds
    summaries = {label: metric_summary(ds) for label, ds in runs.items()}
    tests = paired_tests(runs)
    warnings = comparison_warnings(runs)
    diff = config_diff(runs)
    figure = _save(plots.plot_comparison(summaries), out, "comparison", "Mean and bootstrap interval per run",
                   svg=True)
    shared = plots.plot_comparison_maps(runs)
    maps = _save(shared, out, "comparison_maps", "Maps of shared samples side by side") if shared else None
    if maps is None:
        (out / "comparison_maps.png").unlink(missing_ok=True)
    page = out / "index.html"
    page.write_text(render_comparison_html(runs, summaries, figure, tests, warnings, diff, maps))
    lines = [f"# attriflow comparison: {' vs '.join(f'`{x}`' for x in runs)}", ""]
    lines += [f"> **Warning:** {w}" for w in warnings] + ([""] if warnings else [])
    if len(diff):
        lines += ["## Settings that differ", "", "| setting | " + " | ".join(f"`{x}`" for x in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        lines += [f"| `{k}` | " + " | ".join(f"`{v}`" if v else "" for v in row) + " |" for k, row in diff.iterrows()]
        lines.append("")
    for label, run_dir in zip(runs, run_dirs):
        own = summaries[label][~summaries[label]["subtotal"].astype(bool)]  # explainers only, as compared
        lines += [f"## `{label}` ({run_dir})", "", *markdown_metric_table(own), ""]
    if len(tests):
        lines += [f"## Paired tests against `{next(iter(runs))}`", "", f"{TEST_NAME}; marked where the adjusted "
                  f"p-value is below {ALPHA}.", "", "| explainer | metric | run | n | mean difference | p (Holm) | "
                  "verdict |", "|---|---|---|---|---|---|---|"]
        for _, t in tests.iterrows():
            p = f"{t['p_holm']:.2g}" if np.isfinite(t["p_holm"]) else "–"
            lines.append(f"| `{t['explainer']}` | {t['metric']} | `{t['run']}` | {int(t['n'])} | "
                         f"{t['mean_difference']:+.4f} | {p} | {t['verdict']} |")
        lines.append("")
    lines += ["![comparison](comparison.png)", ""] + (["![maps](comparison_maps.png)", ""] if maps else [])
    (out / "summary.md").write_text("\n".join(lines))
    return page, warnings
