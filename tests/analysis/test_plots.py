"""Figure smoke tests on a hand-made store (Agg backend): axes, titles, legend entries."""

from __future__ import annotations

import numpy as np
import xarray as xr

from attriflow.analysis.plots import neuron_frame, plot_neuron_boxes, plot_neuron_scatter


def _store() -> xr.Dataset:
    rng = np.random.default_rng(0)
    n, layers = 3, [("conv_a", 4), ("conv_b", 2)]
    u = sum(c for _, c in layers)
    sel = np.zeros((n, u), bool)
    sel[:, [0, 4]] = True
    boxes = np.full((n, u, 4), -1)
    boxes[:, 0] = [1, 1, 5, 5]
    boxes[:, 4] = [0, 0, 8, 8]
    boxes[:, 1] = [2, 2, 6, 7]  # units 1 and 5 are the precision selections; 5 has no box
    return xr.Dataset(
        {
            "neuron_correlation": (("sample", "unit"), rng.random((n, u))),
            "neuron_precision": (("sample", "unit"), rng.random((n, u)) * 10),
            "selected_correlation": (("sample", "unit"), sel),
            "selected_precision": (("sample", "unit"), np.roll(sel, 1, axis=1)),
            "unit_box": (("sample", "unit", "corner"), boxes),
            "preview": (("preview", "y", "x", "rgb"), rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)),
        },
        coords={"layer": [n_ for n_, _ in layers],
                "unit_layer": ("unit", [n_ for n_, c in layers for _ in range(c)])},
    )


def test_neuron_frame_labels_selections() -> None:
    df = neuron_frame(_store())
    assert len(df) == 3 * 6
    assert set(df["selected by"]) == {"correlation", "precision", "neither"} or "both" in set(df["selected by"])
    assert (df.loc[df["layer"] == "conv_b", "sample"].value_counts() == 2).all()


def test_scatter_has_one_panel_per_layer() -> None:
    fig = plot_neuron_scatter(_store())
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert titles == ["conv_a", "conv_b"]
    assert fig.axes[0].get_xlabel() == "correlation"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["neither", "correlation", "precision", "both"]


def test_boxes_are_drawn_on_the_previews() -> None:
    fig = plot_neuron_boxes(_store(), max_images=2)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 4  # two metrics x two images
    # one box per selected unit that has one: 2 by correlation, 1 by precision
    assert [len(ax.patches) for ax in image_axes] == [2, 2, 1, 1]


def test_figures_are_png_and_svg_only_on_request(tmp_path) -> None:
    """``report.svg`` (or ``attriflow report --svg``) adds an SVG whose text stays text; without
    it a stale SVG of an earlier report is removed, so the folder never mixes two reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attriflow.tasks.stages.report import _save

    def fig():
        f, ax = plt.subplots()
        ax.set_title("deletion AUC")
        return f

    png = _save(fig(), tmp_path, "x", "caption", svg=True)
    assert png.png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "x.png").read_bytes() == png.png
    assert "<text" in (tmp_path / "x.svg").read_text() and "deletion AUC" in (tmp_path / "x.svg").read_text()
    _save(fig(), tmp_path, "x", "caption")
    assert (tmp_path / "x.png").exists() and not (tmp_path / "x.svg").exists()
