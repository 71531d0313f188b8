"""Figures from a run store: ``plot_*`` return a matplotlib Figure and never save."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

SELECTION_ORDER = ["neither", "correlation", "precision", "both"]


def neuron_frame(ds: xr.Dataset) -> pd.DataFrame:
    """One row per (sample, unit): layer, both scores and which metric selected it."""
    corr = ds["neuron_correlation"].values
    prec = ds["neuron_precision"].values
    sel_c = ds["selected_correlation"].values
    sel_p = ds["selected_precision"].values
    layer = np.asarray([str(v) for v in ds["unit_layer"].values])
    n, u = corr.shape
    selection = np.select([sel_c & sel_p, sel_c, sel_p], ["both", "correlation", "precision"], "neither")
    return pd.DataFrame({
        "sample": np.repeat(np.arange(n), u),
        "layer": np.tile(layer, n),
        "correlation": corr.ravel(),
        "log10 precision": np.log10(np.clip(prec.ravel().astype(np.float64), 1e-12, 1e12)),
        "selected by": selection.ravel(),
    })


def plot_neuron_scatter(ds: xr.Dataset) -> Figure:
    """Per layer: |correlation| against log10 precision of every channel and sample, coloured
    by the metric that selected it (channels without a finite score are left out)."""
    df = neuron_frame(ds)
    df = df[np.isfinite(df["correlation"]) & np.isfinite(df["log10 precision"])]
    layers = [str(v) for v in ds["layer"].values]
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False, sharex=True)
    palette = dict(zip(SELECTION_ORDER, ["#c8c8c8", "#d95f02", "#1b9e77", "#7570b3"]))
    for ax, layer in zip(axes.ravel(), layers):
        part = df[df["layer"] == layer].sort_values("selected by", key=lambda c: c.map(SELECTION_ORDER.index))
        sns.scatterplot(data=part, x="correlation", y="log10 precision", hue="selected by",
                        hue_order=SELECTION_ORDER, palette=palette, s=8, linewidth=0, ax=ax, legend=False)
        ax.set_title(layer, fontsize=9)
    for ax in axes.ravel()[len(layers):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=palette[k], label=k) for k in SELECTION_ORDER]
    fig.legend(handles=handles, title="selected by", loc="lower right", fontsize=8)
    fig.suptitle("Neuron selection: activation-output |correlation| vs activation precision")
    fig.tight_layout()
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
    fig.legend(handles=handles, loc="center right", fontsize=7, title="layer (shallow to deep)")
    fig.suptitle("Receptive boxes of the selected neurons")
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    return fig
