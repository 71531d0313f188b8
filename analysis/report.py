"""Summaries of a run store as tables and Markdown (no file writes here)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import xarray as xr


def summary_table(ds: xr.Dataset) -> pd.DataFrame:
    """Mean score per explainer and metric, rows grouped by family.

    Parameters
    ----------
    ds : xr.Dataset
        The run store.

    Returns
    -------
    pd.DataFrame
        Index ``(family, explainer)``; one column per metric plus ``n`` (samples scored).
    """
    score = ds["score"].load()
    rows = []
    for i, name in enumerate(ds["explainer"].values):
        vals = score.isel(explainer=i)
        row = {"family": str(ds["family"].values[i]), "explainer": str(name)}
        for m, metric in enumerate(ds["metric"].values):
            col = vals.isel(metric=m).values
            row[str(metric)] = float(np.nanmean(col)) if np.isfinite(col).any() else float("nan")
        row["n"] = int(np.isfinite(vals.values[:, :2]).all(axis=-1).sum())
        rows.append(row)
    df = pd.DataFrame(rows)
    family_order = list(dict.fromkeys(df["family"]))
    df["_f"] = df["family"].map(family_order.index)
    return df.sort_values(["_f", "explainer"]).drop(columns="_f").set_index(["family", "explainer"])


def render_markdown(ds: xr.Dataset) -> str:
    """The Markdown summary of a run: provenance, then one row per explainer by family."""
    manifest = json.loads(ds.attrs.get("manifest", "{}"))
    table = summary_table(ds)
    metrics = [str(m) for m in ds["metric"].values]
    better = {str(m): bool(b) for m, b in zip(ds["metric"].values, ds["higher_is_better"].values)}
    lines = [f"# attriflow run `{manifest.get('name', '?')}`", ""]
    lines += [
        f"- config hash: `{manifest.get('config_hash', '?')[:16]}`, seed {manifest.get('seed', '?')}",
        f"- model: {manifest.get('model', '?')}",
        f"- data: {manifest.get('data', '?')} ({ds.sizes['sample']} samples)",
        f"- attriflow {manifest.get('versions', {}).get('attriflow', '?')}, git `{manifest.get('git_commit', '?')[:12]}`",
        "",
    ]
    arrows = {m: ("↑" if better[m] else "↓") for m in metrics}
    head = ["family", "explainer", *[f"{m} {arrows[m]}" for m in metrics], "n"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    best = {
        m: (table[m].max() if better[m] else table[m].min()) for m in metrics if table[m].notna().any()
    }
    last_family = None
    for (family, explainer), row in table.iterrows():
        cells = [f"**{family}**" if family != last_family else "", f"`{explainer}`"]
        for m in metrics:
            v = row[m]
            cell = "–" if not np.isfinite(v) else f"{v:.4f}"
            if m in best and np.isfinite(v) and v == best[m]:
                cell = f"**{cell}**"
            cells.append(cell)
        cells.append(str(int(row["n"])))
        lines.append("| " + " | ".join(cells) + " |")
        last_family = family
    lines += ["", "↑ higher is better, ↓ lower is better; best per metric in bold.", ""]
    if "overlap_code" in ds:
        lines += neuron_section(ds)
    skipped = manifest.get("skipped", [])
    if skipped:
        lines += [f"{len(skipped)} input file(s) could not be decoded and were skipped:", ""]
        lines += [f"- `{s['file']}`: {s['reason']}" for s in skipped]
        lines.append("")
    return "\n".join(lines)


def neuron_section(ds: xr.Dataset) -> list[str]:
    """Markdown lines: per layer, the mean overlap of the two selected sets and the mean
    score of the selected neurons (figures come with the HTML report)."""
    code = ds["overlap_code"].values
    jac = ds["overlap_jaccard"].values
    corr = ds["neuron_correlation"].values
    sel_c = ds["selected_correlation"].values
    unit_layer = np.asarray([str(v) for v in ds["unit_layer"].values])
    lines = ["## Neuron selection (input resampling)", "",
             "| layer | overlap (code: #A∩B / (#A + #B)) | Jaccard (#A∩B / #A∪B) | mean abs. correlation of "
             "the correlation-selected |", "|---|---|---|---|"]
    for li, layer in enumerate(ds["layer"].values):
        cols = unit_layer == str(layer)
        chosen = corr[:, cols][sel_c[:, cols]]
        cells = [_nanmean(chosen), _nanmean(code[:, li]), _nanmean(jac[:, li])]
        lines.append(f"| `{layer}` | {cells[1]:.3f} | {cells[2]:.3f} | {cells[0]:.3f} |")
    lines += ["", "Overlap 0.5 (code formula) or 1 (Jaccard) means both metrics pick the same channels.", ""]
    return lines


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
