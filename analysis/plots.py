"""Figures from a run store: ``plot_*`` return a matplotlib Figure and never save."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from attriflow.analysis.metrics import BINARY_METRICS  # noqa: E402
from attriflow.analysis.metrics.sanity import SIMILARITIES  # noqa: E402
from attriflow.analysis.report import (  # noqa: E402
    cost_table,
    explainer_order,
    family_order,
    manifest_of,
    metric_summary,
    sanity_curves,
    taxonomy,
)

SELECTION_ORDER = ["neither", "correlation", "precision", "both"]


def family_palette(ds: xr.Dataset) -> dict[str, tuple[float, float, float]]:
    """One colour per family, fixed by the family's place in the taxonomy (so the same
    family has the same colour in every run's report)."""
    known = list(taxonomy(ds))
    families = known + [f for f in family_order(ds) if f not in known]
    colours = sns.color_palette("Dark2", max(len(families), 3))
    return {f: colours[i % len(colours)] for i, f in enumerate(families)}


def _ordered_names(ds: xr.Dataset) -> list[str]:
    return [str(ds["explainer"].values[i]) for i in explainer_order(ds)]


def score_frame(ds: xr.Dataset) -> pd.DataFrame:
    """Long table of finite per-sample scores: family, explainer, metric, value."""
    score = np.asarray(ds["score"].values, dtype=np.float64)
    e, n, m = score.shape
    df = pd.DataFrame({
        "family": np.repeat([str(f) for f in ds["family"].values], n * m),
        "explainer": np.repeat([str(x) for x in ds["explainer"].values], n * m),
        "metric": np.tile([str(x) for x in ds["metric"].values], e * n),
        "value": score.ravel(),
    })
    return df[np.isfinite(df["value"])]


def _empty_figure(text: str) -> Figure:
    """A small figure that says why a plot has nothing to show."""
    fig, ax = plt.subplots(figsize=(4.0, 1.2))
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True)
    ax.set_axis_off()
    return fig


def _legend_outside(ax: plt.Axes, **kw: object) -> None:
    """The axes' legend to the right of its panel, never over its data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, **kw)


def _figure_legend_right(fig: Figure, handles: list, title: str, width: float = 1.6, top: float = 0.96) -> None:
    """A figure legend in a column of ``width`` inches kept free at the right of the panels."""
    fig.tight_layout(rect=(0, 0, 1 - width / fig.get_figwidth(), top))
    fig.legend(handles=handles, title=title, loc="center right", fontsize=7, title_fontsize=8, frameon=False)


def plot_metric_distributions(ds: xr.Dataset, summary: pd.DataFrame | None = None) -> Figure:
    """Per metric, each explainer's scores over samples (explainers in taxonomy order,
    coloured by family): box plots of the distribution, except for hit-or-miss metrics
    (:data:`~attriflow.analysis.metrics.BINARY_METRICS`), drawn as the share of samples
    with its bootstrap interval (``summary``: :func:`metric_summary` of ``ds``, computed
    when not given). The family legend sits outside the panels."""
    df = score_frame(ds)
    scored = set(df["metric"])
    metrics = [str(m) for m in ds["metric"].values if str(m) in scored]
    better = dict(zip((str(m) for m in ds["metric"].values), ds["higher_is_better"].values))
    order = _ordered_names(ds)
    palette = family_palette(ds)
    colour = {str(x): palette[str(f)] for x, f in zip(ds["explainer"].values, ds["family"].values)}
    if not metrics:
        return _empty_figure("No finite score yet: no evaluate shard has finished.")
    if any(m in BINARY_METRICS for m in metrics) and summary is None:
        summary = metric_summary(ds)
    cols = min(4, len(metrics))
    rows = -(-len(metrics) // cols)
    width = max(3.0, 0.45 * len(order) + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.6, 3.0 * rows), squeeze=False)
    for ax, metric in zip(axes.ravel(), metrics):
        if metric in BINARY_METRICS:
            part = summary[(summary["metric"] == metric) & ~summary["subtotal"]].set_index("explainer")
            shown = [e for e in order if e in part.index and np.isfinite(part.loc[e, "mean"])]
            for x, e in enumerate(shown):
                r = part.loc[e]
                ax.bar(x, r["mean"], color=colour[e], width=0.6)
                ax.errorbar(x, r["mean"], yerr=[[max(0.0, r["mean"] - r["low"])], [max(0.0, r["high"] - r["mean"])]],
                            color="black", linewidth=0.9, capsize=2)
            ax.set_xticks(range(len(shown)), shown)
            percent = metric.startswith("increase")
            ax.set_ylim(0, 100 if percent else 1)
            ax.set_ylabel("% of samples" if percent else "share of samples (hits)", fontsize=7)
            ax.set_title(f"{metric} {'↑' if better[metric] else '↓'} (share, interval)", fontsize=9)
        else:
            part = df[df["metric"] == metric]
            with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib's deprecated ``vert``
                warnings.filterwarnings("ignore", message="vert: bool", category=DeprecationWarning)
                warnings.filterwarnings("ignore", message="vert: bool")
                sns.boxplot(data=part, x="explainer", y="value", hue="explainer", order=order, hue_order=order,
                            palette=colour, ax=ax, fliersize=1.5, linewidth=0.8, legend=False)
            ax.set_title(f"{metric} {'↑' if better[metric] else '↓'}", fontsize=9)
            ax.set_ylabel("")
        ax.set_xlabel("")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    for ax in axes.ravel()[len(metrics):]:
        ax.set_visible(False)
    handles = [Rectangle((0, 0), 1, 1, color=palette[f], label=f) for f in family_order(ds)]
    fig.suptitle("Metric distributions over samples, by family")
    _figure_legend_right(fig, handles, "family")
    return fig


def _outline(ax: plt.Axes, ds: xr.Dataset, i: int) -> None:
    if "gt_mask" in ds:
        ax.contour(np.asarray(ds["gt_mask"].values[i], dtype=float), levels=[0.5], colors="lime", linewidths=0.9)
    elif "gt_box" in ds:
        y0, x0, y1, x1 = (int(v) for v in ds["gt_box"].values[i])
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=0.9))


def class_name(ds: xr.Dataset, index: int) -> str:
    """The name of class ``index`` (the manifest's ``classes``: ``model.classes`` or the
    dataset's), the index itself when unnamed, ``unknown`` for -1."""
    if index < 0:
        return "unknown"
    names = manifest_of(ds).get("classes") or []
    return str(names[index]) if index < len(names) else str(index)


def _class_lines(ds: xr.Dataset, i: int) -> list[str]:
    out = []
    for var, word in (("label", "label"), ("prediction", "predicted")):
        if var in ds:
            out.append(f"{word}: {class_name(ds, int(ds[var].values[i]))}")
    return out


def map_colouring(maps: np.ndarray) -> tuple[str, float]:
    """The colour map and lower limit of one explainer's maps (any shape, NaN allowed):
    ``("RdBu_r", -1.0)`` (diverging around zero) when any finite value is negative, else
    ``("inferno", 0.0)`` (sequential). Decided per explainer, not per map, so one column
    never mixes the two."""
    finite = maps[np.isfinite(maps)]
    return ("RdBu_r", -1.0) if finite.size and float(finite.min()) < 0 else ("inferno", 0.0)


def plot_map_grid(ds: xr.Dataset, n_samples: int = 6) -> Figure:
    """Rows: the first samples; columns: the image, then each explainer's map (taxonomy
    order), ground truth (mask outline or box, when the dataset has one) drawn in green.

    One colour map per explainer (:func:`map_colouring`: diverging around zero for signed
    maps, sequential otherwise) with its colour bar under the column; each map is divided
    by its own largest |value| (an all-zero map stays zero), which the colour bar says."""
    n = min(n_samples, ds.sizes["sample"], ds.sizes.get("preview", 0) or ds.sizes["sample"])
    order = explainer_order(ds)
    maps = np.asarray(ds["attribution"].isel(sample=slice(0, n)).values, dtype=np.float64)
    previews = ds["preview"].values[:n] if "preview" in ds else None
    cols = len(order) + 1
    fig, axes = plt.subplots(n + 1, cols, figsize=(1.6 * cols, 1.6 * n + 1.0), squeeze=False,
                             gridspec_kw={"height_ratios": [1.0] * n + [0.09]})
    names = [str(x) for x in ds["explainer"].values]
    fams = [str(x) for x in ds["family"].values]
    for r in range(n):
        ax = axes[r, 0]
        if previews is not None:
            ax.imshow(previews[r])
        _outline(ax, ds, r)
        ax.set_ylabel("\n".join([str(ds["sample_name"].values[r]), *_class_lines(ds, r)]), fontsize=6)
    for c, k in enumerate(order, start=1):
        cmap, low = map_colouring(maps[k])
        image = None
        for r in range(n):
            a = maps[k, r]
            finite = a[np.isfinite(a)]  # a flagged map may have no finite value at all
            peak = float(np.abs(finite).max()) if finite.size else 0.0
            image = axes[r, c].imshow(a / (peak or 1.0), cmap=cmap, vmin=low, vmax=1.0)
            _outline(axes[r, c], ds, r)
        axes[0, c].set_title(f"{names[k]}\n({fams[k]})", fontsize=7)
        bar = fig.colorbar(image, cax=axes[n, c], orientation="horizontal")
        bar.set_ticks([low, 0.0, 1.0] if low < 0 else [0.0, 1.0])
        bar.ax.tick_params(labelsize=6)
        bar.set_label("a / max|a| (each map)", fontsize=6)
    axes[0, 0].set_title("input", fontsize=7)
    axes[n, 0].set_axis_off()
    for ax in axes[:n].ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    has_truth = "gt_mask" in ds or "gt_box" in ds
    fig.suptitle("Attribution maps" + (" (ground truth outlined in green)" if has_truth else ""), fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(ds: xr.Dataset, families: list[str] | None = None) -> Figure:
    """Mean deletion and insertion curves, one panel per (curve, family), one line per
    explainer (x: fraction of pixels removed or inserted); ``families`` picks a subset."""
    curve_names = [m for m in ("deletion_auc", "insertion_auc") if m in [str(x) for x in ds["metric"].values]]
    families = families or family_order(ds)
    fams = [str(x) for x in ds["family"].values]
    names = [str(x) for x in ds["explainer"].values]
    fig, axes = plt.subplots(len(families), len(curve_names), figsize=(3.6 * len(curve_names), 2.9 * len(families) + 0.4),
                             squeeze=False, sharey=True)
    metric_index = [str(x) for x in ds["metric"].values]
    for c, cname in enumerate(curve_names):
        curves = np.asarray(ds["curve"].isel(metric=metric_index.index(cname)).values, dtype=np.float64)
        for r, family in enumerate(families):
            ax = axes[r, c]
            for k in explainer_order(ds):
                if fams[k] != family:
                    continue
                # a store keeps its longest curve length: shorter curves are NaN-padded at the end
                points = curves[k][:, np.isfinite(curves[k]).any(axis=0)]
                finite = np.isfinite(points).all(axis=1)
                if finite.any() and points.shape[-1] > 1:
                    x = np.linspace(0, 1, points.shape[-1])
                    ax.plot(x, points[finite].mean(axis=0), label=names[k], linewidth=1.2)
            ax.set_title(f"{cname.replace('_auc', '')}: {family}", fontsize=9)
            ax.set_xlabel(f"fraction of pixels {'removed' if cname.startswith('deletion') else 'inserted'}", fontsize=8)
            if ax.get_lines():
                _legend_outside(ax, fontsize=7)
            if c == 0:
                ax.set_ylabel("class probability")
    fig.suptitle("Deletion and insertion curves (mean over samples)" + (", by family" if len(families) > 1 else ""))
    fig.tight_layout()
    return fig


def plot_cost(ds: xr.Dataset) -> Figure:
    """Wall seconds and forward passes per image for every explainer (linear axes, each bar
    labelled with its value; the report's cost table has the same numbers)."""
    df = cost_table(ds)
    palette = family_palette(ds)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 0.35 * len(df) + 1.6), squeeze=False)
    for ax, col, title in ((axes[0, 0], "explain_seconds_per_image", "attribution seconds per image"),
                           (axes[0, 1], "forward_per_image", "forward passes per image")):
        if col not in df:
            ax.set_visible(False)
            continue
        part = df[np.isfinite(df[col]) & (df[col] > 0)]
        sns.barplot(data=part, y="explainer", x=col, hue="family", palette=palette, dodge=False, ax=ax,
                    order=list(df["explainer"]))
        for container in ax.containers:
            ax.bar_label(container, fmt="%.3g", fontsize=6, padding=2)
        ax.margins(x=0.18)  # room for the labels
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("")
        if ax.get_legend() is not None:
            if ax is axes[0, 1]:
                sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=7)
            else:
                ax.get_legend().remove()
    fig.suptitle("Cost of each explainer")
    fig.tight_layout()
    return fig


def plot_sanity(ds: xr.Dataset, threshold: float = 0.5) -> Figure | None:
    """Mean similarity between trained-model and randomised-model maps against the depth of
    cascading randomisation, one panel per similarity; None without a sanity check."""
    df = sanity_curves(ds)
    if df is None:
        return None
    palette = family_palette(ds)
    units = [str(u) for u in ds["randomised"].values]
    fig, axes = plt.subplots(1, len(SIMILARITIES), figsize=(4.2 * len(SIMILARITIES), 3.4), squeeze=False, sharey=True)
    styles = ["-", "--", ":", "-."]
    for ax, sim in zip(axes.ravel(), SIMILARITIES):
        part = df[df["similarity"] == sim]
        seen: dict[str, int] = {}
        for explainer, line in part.groupby("explainer", sort=False):
            fam = line["family"].iloc[0]
            style = styles[seen.get(fam, 0) % len(styles)]
            seen[fam] = seen.get(fam, 0) + 1
            ax.plot(line["depth"], line["value"], style, marker="o", markersize=3, color=palette[fam],
                    label=f"{explainer} ({fam})")
        ax.axhline(threshold, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(1, len(units) + 1), units, rotation=45, fontsize=7)
        ax.set_title(sim, fontsize=9)
        ax.set_xlabel("randomised down to", fontsize=8)
    axes[0, 0].set_ylabel("mean similarity to trained-model map")
    _legend_outside(axes[0, -1], fontsize=7)
    fig.suptitle("Sanity check: cascading model-parameter randomisation (top layer first)")
    fig.tight_layout()
    return fig


def plot_comparison(summaries: dict[str, pd.DataFrame]) -> Figure:
    """Runs side by side: per metric, each explainer's mean and interval, one colour per run."""
    frames = [s.assign(run=name) for name, s in summaries.items()]
    df = pd.concat(frames, ignore_index=True)
    df = df[~df["subtotal"] & np.isfinite(df["mean"])]
    metrics = list(dict.fromkeys(df["metric"]))
    explainers = list(dict.fromkeys(df["explainer"]))
    runs = list(summaries)
    colours = dict(zip(runs, sns.color_palette("colorblind", max(len(runs), 3))))
    if not metrics:
        return _empty_figure("No finite score yet: no evaluate shard has finished.")
    cols = min(4, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 0.3 * len(explainers) * rows + 1.2 * rows + 0.5),
                             squeeze=False)
    for ax, metric in zip(axes.ravel(), metrics):
        part = df[df["metric"] == metric]
        for j, run in enumerate(runs):
            rp = part[part["run"] == run]
            y = np.array([explainers.index(e) for e in rp["explainer"]]) + (j - (len(runs) - 1) / 2) * 0.8 / len(runs)
            ax.errorbar(rp["mean"], y, xerr=[rp["mean"] - rp["low"], rp["high"] - rp["mean"]], fmt="o",
                        markersize=3, color=colours[run], label=run, linewidth=0.8)
        ax.set_yticks(range(len(explainers)), explainers, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(metric, fontsize=9)
    for ax in axes.ravel()[len(metrics):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[r], label=r) for r in runs]
    fig.suptitle("Runs compared: mean and bootstrap interval per explainer")
    _figure_legend_right(fig, handles, "run")
    return fig


def plot_comparison_maps(runs: dict[str, xr.Dataset], n_samples: int = 2, max_explainers: int = 6) -> Figure | None:
    """The maps of the runs side by side: rows (sample, explainer) for the first samples
    every run scored (matched by ``sample_key``) and the explainers every run has; one
    column per run; one colour map per explainer across runs (:func:`map_colouring`), each
    map divided by its own max|a|. None when the runs share no sample or no explainer."""
    labels = list(runs)

    keys = {label: [str(k) for k in ds["sample_key" if "sample_key" in ds.coords else "sample_name"].values]
            for label, ds in runs.items()}
    position = {label: {k: i for i, k in reversed(list(enumerate(ks)))} for label, ks in keys.items()}
    shared_keys = [k for k in keys[labels[0]] if all(k in position[label] for label in labels)][:n_samples]
    names = [str(e) for e in runs[labels[0]]["explainer"].values]
    shared_names = [e for e in names if all(e in [str(x) for x in ds["explainer"].values] for ds in runs.values())]
    shared_names = shared_names[:max_explainers]
    if not shared_keys or not shared_names:
        return None
    maps = {(label, e, k): np.asarray(ds["attribution"].sel(explainer=e).isel(sample=position[label][k]).values,
                                      dtype=np.float64)
            for label, ds in runs.items() for e in shared_names for k in shared_keys}
    rows = [(k, e) for k in shared_keys for e in shared_names]
    fig, axes = plt.subplots(len(rows), len(labels), figsize=(1.7 * len(labels) + 1.4, 1.7 * len(rows) + 0.6),
                             squeeze=False)
    for e in shared_names:
        cmap, low = map_colouring(np.concatenate([v.ravel() for (_, e2, _), v in maps.items() if e2 == e]))
        for r, (k, e2) in enumerate(rows):
            if e2 != e:
                continue
            for c, label in enumerate(labels):
                a = maps[(label, e, k)]
                finite = a[np.isfinite(a)]
                peak = float(np.abs(finite).max()) if finite.size else 0.0
                axes[r, c].imshow(a / (peak or 1.0), cmap=cmap, vmin=low, vmax=1.0)
    for r, (k, e) in enumerate(rows):
        axes[r, 0].set_ylabel(f"{k.split('#')[0]}\n{e}", fontsize=6)
    for c, label in enumerate(labels):
        axes[0, c].set_title(label, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Maps of shared samples, runs side by side (each map / its max|a|)", fontsize=9)
    fig.tight_layout()
    return fig


def neuron_frame(ds: xr.Dataset, index: np.ndarray | None = None) -> pd.DataFrame:
    """One row per (sample, unit): layer, both scores and which metric selected it
    (``index``: only these flat (sample * units + unit) positions)."""
    corr = ds["neuron_correlation"].values
    n, u = corr.shape
    flat = np.arange(n * u) if index is None else np.asarray(index, dtype=np.int64)
    sel_c = ds["selected_correlation"].values.ravel()[flat]
    sel_p = ds["selected_precision"].values.ravel()[flat]
    layer = np.asarray([str(v) for v in ds["unit_layer"].values])
    prec = ds["neuron_precision"].values.ravel()[flat].astype(np.float64)
    return pd.DataFrame({
        "sample": flat // u,
        "layer": layer[flat % u],
        "correlation": corr.ravel()[flat],
        "log10 precision": np.log10(np.clip(prec, 1e-12, 1e12)),
        "selected by": np.select([sel_c & sel_p, sel_c, sel_p], ["both", "correlation", "precision"], "neither"),
    })


def plot_neuron_scatter(ds: xr.Dataset, max_points: int = 60_000) -> Figure:
    """Per layer: |correlation| against log10 precision of every channel and sample, coloured
    by the metric that selected it (channels without a finite score are left out). Beyond
    ``max_points`` a seeded random subset is drawn before any table is built, selected
    points first (up to half of the budget), so memory and time stay bounded as the number
    of images grows."""
    corr = ds["neuron_correlation"].values.ravel()
    prec = ds["neuron_precision"].values.ravel().astype(np.float64)
    picked = ds["selected_correlation"].values.ravel() | ds["selected_precision"].values.ravel()
    finite = np.isfinite(corr) & np.isfinite(np.log10(np.clip(prec, 1e-12, 1e12)))
    chosen, rest = np.flatnonzero(finite & picked), np.flatnonzero(finite & ~picked)
    rng = np.random.default_rng(0)
    if len(chosen) + len(rest) > max_points:
        if len(chosen) > max_points // 2:
            chosen = np.sort(rng.choice(chosen, max_points // 2, replace=False))
        keep = max_points - len(chosen)
        if len(rest) > keep:
            rest = np.sort(rng.choice(rest, keep, replace=False))
    df = neuron_frame(ds, np.concatenate([chosen, rest]))
    layers = [str(v) for v in ds["layer"].values]
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False, sharex=True)
    palette = dict(zip(SELECTION_ORDER, ["#c8c8c8", "#d95f02", "#1b9e77", "#7570b3"]))
    for ax, layer in zip(axes.ravel(), layers):
        part = df[df["layer"] == layer].sort_values("selected by", key=lambda c: c.map(SELECTION_ORDER.index))
        sns.scatterplot(data=part, x="correlation", y="log10 precision", hue="selected by",
                        hue_order=SELECTION_ORDER, palette=palette, s=8, linewidth=0, ax=ax, legend=False,
                        rasterized=True)  # thousands of points: an image inside the SVG, axes and text vector
        ax.set_title(layer, fontsize=9)
    for ax in axes.ravel()[len(layers):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=palette[k], label=k) for k in SELECTION_ORDER]
    fig.suptitle("Neuron selection: activation-output |correlation| vs activation precision")
    _figure_legend_right(fig, handles, "selected by", width=1.3)
    return fig


def plot_neuron_boxes(ds: xr.Dataset, max_images: int = 4) -> Figure:
    """The selected neurons' boxes on the first images, one row per metric, coloured by depth."""
    previews = ds["preview"].values[:max_images]
    boxes = ds["unit_box"].values
    layer_of = np.asarray([str(v) for v in ds["unit_layer"].values])
    layers = [str(v) for v in ds["layer"].values]
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, max(len(layers), 2)))
    k = len(previews)
    fig, axes = plt.subplots(2, k, figsize=(2.4 * k, 5.2), squeeze=False)
    for row, metric in enumerate(("correlation", "precision")):
        selected = ds[f"selected_{metric}"].values
        for i in range(k):
            ax = axes[row, i]
            ax.imshow(previews[i])
            for unit in np.nonzero(selected[i])[0]:
                y0, x0, y1, x1 = boxes[i, unit]
                if y0 < 0:
                    continue
                depth = layers.index(layer_of[unit])
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       edgecolor=colours[depth], linewidth=1.0))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(f"by {metric}")
    handles = [Rectangle((0, 0), 1, 1, fill=False, edgecolor=colours[d], label=name) for d, name in enumerate(layers)]
    fig.suptitle("Receptive boxes of the selected neurons")
    _figure_legend_right(fig, handles, "layer (shallow to deep)", width=1.8)
    return fig
