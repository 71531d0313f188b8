"""The self-contained HTML report: one file, figures embedded as base64 PNG, inline CSS,
no script and no external resource, so it opens offline by double-click.

Every string that comes from a user (run names, explainer labels, parameters, file
names, config values) is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from attriflow.analysis.metrics.sanity import SIMILARITIES
from attriflow.analysis.report import (
    STAGE_COST_NOTE,
    ReportOptions,
    cost_table,
    coverage_note,
    family_order,
    flagged_note,
    fmt,
    incomplete_note,
    manifest_of,
    metric_summary,
    neuron_rows,
    provenance,
    sanity_table,
    share,
    stage_costs,
    taxonomy,
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1400px;
padding:1rem 1rem;color:#1d1d1f;background:#fff}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1.05rem}
table{border-collapse:collapse;font-size:.78rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.2rem .3rem;text-align:right;white-space:nowrap}
th{background:#f3f3f6;position:sticky;top:0;white-space:normal;min-width:3.5rem}
td.name,th.name{text-align:left;white-space:normal;overflow-wrap:anywhere;min-width:0}
table.text td,table.text th{white-space:normal;overflow-wrap:anywhere;min-width:5rem;text-align:left}
tr.subtotal td{background:#f7f7fa;font-style:italic}
td.best{font-weight:700;background:#e7f6e7}
td.best::after{content:" \\2605"}
td.worse{background:#fbeaea}.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.4rem .8rem;margin:.4rem 0}
.ci{color:#666;font-size:.7rem}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85rem;color:#444}
pre{background:#f6f8fa;padding:.6rem;overflow:auto;font-size:.78rem}
nav a{margin-right:1rem}
.family{border-left:6px solid var(--fam,#999);padding-left:.6rem}
.wrap{overflow-x:auto}
"""


@dataclass(frozen=True)
class Figure:
    """An encoded figure: file stem, caption and PNG bytes."""

    name: str
    caption: str
    png: bytes


def img(fig: Figure) -> str:
    """A ``<figure>`` with the PNG embedded as a data URI."""
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure id="fig-{escape(fig.name)}"><img alt="{escape(fig.caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{escape(fig.caption)}</figcaption></figure>')


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] = (),
          name_cols: int = 1, text: bool = False) -> str:
    """An HTML table; cells are already-escaped HTML fragments (``text``: every cell is
    text that wraps, as in provenance tables, instead of unbroken numbers)."""
    head = "".join(f'<th class="name">{h}</th>' if i < name_cols else f"<th>{h}</th>" for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if r < len(row_classes) and row_classes[r] else ""
        cells = []
        for i, cell in enumerate(row):
            if isinstance(cell, tuple):  # (html, css class)
                cells.append(f'<td class="{cell[1]}">{cell[0]}</td>')
            else:
                cells.append(f'<td class="name">{cell}</td>' if i < name_cols else f"<td>{cell}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    cls = ' class="text"' if text else ""
    return f'<div class="wrap"><table{cls}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _cell(row: pd.Series) -> tuple[str, str]:
    if not np.isfinite(row["mean"]):
        return "–", ""
    text = f'{row["mean"]:.3f}<br><span class="ci">[{row["low"]:.3f}, {row["high"]:.3f}]</span>'
    return text, "best" if row["best"] else ""


def metric_table_html(summary: pd.DataFrame, families: Sequence[str] | None = None) -> str:
    """The metric table (mean and interval per metric), family rows then sub-total."""
    metrics = list(dict.fromkeys(summary["metric"]))
    better = dict(zip(summary["metric"], summary["higher_is_better"]))
    # metric names break after their underscores, so eleven metric columns fit 1400 px
    headers = ["family", "explainer",
               *[f"{escape(m).replace('_', '_<wbr>')} {'↑' if better[m] else '↓'}" for m in metrics]]
    rows, classes = [], []
    part = summary if families is None else summary[summary["family"].isin(families)]
    for (family, explainer), group in part.groupby(["family", "explainer"], sort=False):
        by_metric = group.set_index("metric")
        subtotal = bool(group["subtotal"].iloc[0])
        rows.append([escape(str(family)), escape(str(explainer)), *[_cell(by_metric.loc[m]) for m in metrics]])
        classes.append("subtotal" if subtotal else "")
    return table(headers, rows, classes, name_cols=2)


#: The family of the sanity baselines (``explainers.base.Family.BASELINE``; analysis does not
#: import the explainers).
BASELINE_FAMILY = "baseline"


def _palette_css(palette: dict[str, Any]) -> dict[str, str]:
    return {f: "#%02x%02x%02x" % tuple(int(255 * c) for c in rgb[:3]) for f, rgb in palette.items()}


def render_run_html(ds: xr.Dataset, figures: dict[str, Figure], family_figures: dict[str, Figure],
                    palette: dict[str, Any], summary: pd.DataFrame | None = None) -> str:
    """The report page of one run.

    Parameters
    ----------
    ds : xr.Dataset
        The run store.
    figures : dict of str to Figure
        Run-wide figures by key (``distributions``, ``grid``, ``cost``, ``sanity``,
        ``neuron_scatter``, ``neuron_boxes``; missing keys are left out).
    family_figures : dict of str to Figure
        Per family, its deletion/insertion curves.
    palette : dict
        Family colours (RGB in [0, 1]).
    summary : pd.DataFrame, optional
        :func:`metric_summary` of ``ds`` with the manifest's options (computed when not given).
    """
    manifest = manifest_of(ds)
    options = ReportOptions.from_manifest(manifest)
    summary = metric_summary(ds, options) if summary is None else summary
    name = str(manifest.get("name", "?"))
    colours = _palette_css(palette)
    families = family_order(ds)
    paths = taxonomy(ds)
    explainers = manifest.get("explainers", {})
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>attriflow report: {escape(name)}</title>",
           f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>",
           f"<h1>attriflow report: <code>{escape(name)}</code></h1>",
           "<nav>" + "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in (
               ("provenance", "Provenance"), ("metrics", "Metrics"), ("families", "Families"),
               ("maps", "Maps"), ("cost", "Cost"), ("sanity", "Sanity check"), ("neurons", "Neurons"))) + "</nav>"]
    if incomplete_note(ds):  # before any number
        out.append(f"<p class='warn'><b>{escape(incomplete_note(ds))}</b></p>")
    out.append("<h2 id='provenance'>Provenance</h2>")
    out.append(table(["field", "value"], [[escape(k), escape(v)] for k, v in provenance(ds)], name_cols=2, text=True))
    out.append("<details><summary>resolved configuration</summary><pre>"
               + escape(json.dumps(manifest.get("config", {}), indent=2, sort_keys=True)) + "</pre></details>")
    pct = round(options.confidence * 100)
    out.append(f"<h2 id='metrics'>Metrics: mean and {pct}% bootstrap interval over samples</h2>")
    out.append(f"<p>{options.bootstrap} bootstrap resamples. ↑ higher is better, ↓ lower is better; ★ marks the best "
               "explainer per metric and the best family sub-total (<i>all &lt;family&gt;</i> pools the family's "
               "explainers' samples).</p>")
    out.append(metric_table_html(summary))
    if flagged_note(ds):
        out.append(f"<p class='warn'><b>{escape(flagged_note(ds))}</b></p>")
    if coverage_note(ds, summary):
        out.append(f"<p>{escape(coverage_note(ds, summary))}</p>")
    if "distributions" in figures:
        out.append(img(figures["distributions"]))
    out.append("<h2 id='families'>Families</h2>")
    for family in families:
        colour = colours.get(family, "#999")
        out.append(f'<section class="family" id="family-{escape(family)}" data-family="{escape(family)}" '
                   f'style="--fam:{colour}"><h3>{escape(family)}'
                   f' <small>({escape(paths.get(family, "other"))})</small></h3>')
        rows = []
        for label, info in explainers.items():
            if info.get("family") == family:
                rows.append([escape(label), escape(str(info.get("method", ""))),
                             f"<code>{escape(json.dumps(info.get('params', {}), sort_keys=True))}</code>"])
        out.append(table(["explainer", "method", "parameters"], rows, name_cols=3, text=True))
        # the sanity baselines' rows under every family's, so each section shows whether its
        # methods beat maps that read no model (Adebayo et al. 2018)
        present = set(summary["family"])
        baselines = [BASELINE_FAMILY] if family != BASELINE_FAMILY and BASELINE_FAMILY in present else []
        out.append(metric_table_html(summary, [family, *baselines]))
        if family in family_figures:
            out.append(img(family_figures[family]))
        out.append("</section>")
    out.append("<h2 id='maps'>Maps</h2>")
    if "grid" in figures:
        out.append(img(figures["grid"]))
    out.append("<h2 id='cost'>Cost</h2>")
    out.append(f"<p>{escape(STAGE_COST_NOTE)}</p>")
    out.append(table(["stage", "task seconds", "seconds / image", "share", "timed tasks"],
                     [[escape(str(r["stage"])), fmt(r["seconds"], 1), fmt(r["seconds_per_image"], 4),
                       share(r["share"]), f"{r['timed']}/{r['tasks']}"]
                      for _, r in stage_costs(ds).iterrows()], name_cols=1))
    cost = cost_table(ds)
    out.append(table(["family", "explainer", "explain s / image", "evaluate s / image", "sanity s",
                      "forward passes / image", "backward passes / image"],
                     [[escape(str(r["family"])), escape(str(r["explainer"])),
                       fmt(r.get("explain_seconds_per_image", np.nan), 5),
                       fmt(r.get("evaluate_seconds_per_image", np.nan), 5),
                       fmt(r.get("sanity_seconds", np.nan), 2),
                       fmt(r.get("forward_per_image", np.nan), 1), fmt(r.get("backward_per_image", np.nan), 1)]
                      for _, r in cost.iterrows()], name_cols=2))
    if "cost" in figures:
        out.append(img(figures["cost"]))
    out.append("<h2 id='sanity'>Sanity check</h2>")
    sanity = sanity_table(ds, options.threshold)
    if sanity is None:
        out.append("<p>No sanity check in this run (<code>sanity.enabled: false</code>).</p>")
    else:
        out.append(f"<p>Cascading model-parameter randomisation, top layer first. Depth at which the mean "
                   f"similarity to the trained-model map falls below {options.threshold} (\"never\": a method that "
                   "does not depend on the model's parameters).</p>")
        out.append(table(["family", "explainer", *SIMILARITIES],
                         [[escape(str(r["family"])), escape(str(r["explainer"])), *[escape(str(r[s])) for s in SIMILARITIES]]
                          for _, r in sanity.iterrows()], name_cols=2))
        if "sanity" in figures:
            out.append(img(figures["sanity"]))
    out.append("<h2 id='neurons'>Neuron selection</h2>")
    if "overlap_code" in ds and "neuron_scatter" in figures:
        out.append(table(["layer", "mean |corr| of correlation-selected", "overlap (code)", "Jaccard"],
                         [[escape(r[0]), fmt(r[1], 3), fmt(r[2], 3), fmt(r[3], 3)] for r in neuron_rows(ds)]))
        for key in ("neuron_scatter", "neuron_boxes"):
            if key in figures:
                out.append(img(figures[key]))
    else:
        out.append("<p>No neuron selection in this run.</p>")
    skipped = manifest.get("skipped", [])
    if skipped:
        out.append(f"<h2 id='skipped'>Skipped inputs ({len(skipped)})</h2><ul>")
        out += [f"<li><code>{escape(str(s.get('file')))}</code>: {escape(str(s.get('reason')))}</li>" for s in skipped]
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def render_comparison_html(runs: dict[str, xr.Dataset], summaries: dict[str, pd.DataFrame],
                           figure: Figure | None, tests: pd.DataFrame | None = None,
                           warnings: Sequence[str] = (), diff: pd.DataFrame | None = None,
                           maps: Figure | None = None) -> str:
    """Several runs side by side: warnings on what differs, provenance per run, the config
    settings that differ, per (explainer, metric) each run's mean and interval (explainers
    only: a family total may pool different methods) with the paired test against the first
    run (``tests``: :func:`attriflow.analysis.compare.paired_tests`; a cell is marked better
    or worse only when that test says so), the comparison figure and the maps of shared
    samples side by side."""
    from attriflow.analysis.compare import ALPHA, TEST_NAME

    labels = list(runs)
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>attriflow comparison: {escape(' vs '.join(labels))}</title><style>{CSS}</style></head><body>",
           f"<h1>attriflow comparison: {' vs '.join(f'<code>{escape(x)}</code>' for x in labels)}</h1>"]
    out += [f"<p class='warn'>&#9888; {escape(w)}</p>" for w in warnings]
    out.append("<h2 id='provenance'>Provenance</h2>")
    fields = [k for k, _ in provenance(next(iter(runs.values())))]
    prov = {lab: dict(provenance(ds)) for lab, ds in runs.items()}
    out.append(table(["field", *[escape(x) for x in labels]],
                     [[escape(f), *[escape(prov[lab].get(f, "")) for lab in labels]] for f in fields],
                     name_cols=1 + len(labels), text=True))  # every column wraps
    if diff is not None and len(diff):
        out.append("<h2 id='config'>Settings that differ</h2>")
        out.append(table(["setting", *[escape(x) for x in labels]],
                         [[escape(k), *[escape(v) for v in row]] for k, row in diff.iterrows()],
                         name_cols=1 + len(labels), text=True))
    out.append("<h2 id='metrics'>Metrics</h2>")
    out.append(f"<p>Each explainer against itself, on the samples both runs scored; {escape(TEST_NAME)}; a cell "
               f"is marked better (&#9733;) or worse only where the adjusted p-value is below {ALPHA}. "
               f"The reference is <code>{escape(labels[0])}</code>.</p>")
    verdict = {} if tests is None else {(r["explainer"], r["metric"], r["run"]): r for _, r in tests.iterrows()}
    keyed = {lab: s[~s["subtotal"].astype(bool)].set_index(["family", "explainer", "metric"])
             for lab, s in summaries.items()}
    keys = list(dict.fromkeys(k for s in keyed.values() for k in s.index))
    rows = []
    for key in keys:
        family, explainer, metric = key
        present = {lab: s.loc[key] for lab, s in keyed.items() if key in s.index}
        hib = bool(next(iter(present.values()))["higher_is_better"])
        cells: list[Any] = [escape(family), escape(explainer), f"{escape(metric)} {'↑' if hib else '↓'}"]
        for lab in labels:
            if lab not in present or not np.isfinite(present[lab]["mean"]):
                cells.append("–")
                continue
            r = present[lab]
            text = f'{r["mean"]:.3f}<br><span class="ci">[{r["low"]:.3f}, {r["high"]:.3f}]</span>'
            t = verdict.get((explainer, metric, lab))
            if t is None:
                cells.append(text)
                continue
            p = f"p = {t['p_holm']:.2g}, " if np.isfinite(t["p_holm"]) else ""
            text += f'<br><span class="ci">{escape(t["verdict"])} ({p}n = {int(t["n"])})</span>'
            cells.append((text, {"better": "best", "worse": "worse"}.get(t["verdict"], "")))
        rows.append(cells)
    out.append(table(["family", "explainer", "metric", *[escape(x) for x in labels]], rows, name_cols=3))
    if figure is not None:
        out.append(img(figure))
    if maps is not None:
        out.append("<h2 id='maps'>Maps of shared samples</h2>")
        out.append(img(maps))
    out.append("</body></html>")
    return "\n".join(out)
