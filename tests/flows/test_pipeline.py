"""End to end: the flow's store, resume after SIGKILL, rerun idempotence, provenance, locks.

These start Prefect (one test server for the session) and, for the crash test, a real
``attriflow run`` subprocess that kills itself with SIGKILL at an injected point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from attriflow.tasks.config import parse_config
from tests.flows.helpers import SMALL
from tests.flows.helpers import cli as _cli
from tests.flows.helpers import files as _files
from tests.flows.helpers import run as _run

pytestmark = pytest.mark.slow


def test_store_schema_manifest_and_report(reference_run) -> None:
    ds = xr.open_zarr(reference_run / "store.zarr")
    for name in ("attribution", "label", "prediction", "probability", "gt_mask", "score"):
        assert name in ds
    assert ds["attribution"].dims == ("explainer", "sample", "y", "x")
    assert ds["attribution"].dtype == np.float32
    assert ds["attribution"].encoding["chunks"] == (1, 8, 64, 64)
    assert list(ds["explainer"].values) == ["saliency", "grad_cam"]
    assert list(ds["family"].values) == ["gradient", "cam"]
    assert ds.sizes["sample"] == 24
    assert np.isfinite(ds["attribution"].values).all()
    assert np.isfinite(ds["score"].values).all()
    assert (ds["forward_passes"].values == 1).all()
    # neuron selection: per (sample, unit) scores and flags, overlaps per (sample, layer)
    assert ds["neuron_correlation"].dims == ("sample", "unit")
    assert list(ds["layer"].values)[:2] == ["block1.2", "block1.5"]
    assert (ds["selected_precision"].values.sum(axis=1) == 5 * ds.sizes["layer"]).all()
    assert ds["overlap_code"].dims == ("sample", "layer")
    boxes = ds["unit_box"].values
    chosen = ds["selected_correlation"].values | ds["selected_precision"].values
    # boxes for the first 8 samples' selected units (none where the unit is silent on the
    # clean image: a zero backward signal has no support)
    assert (boxes[:8][chosen[:8]] >= 0).all(axis=-1).mean() > 0.8
    assert (boxes[:8][~chosen[:8]] == -1).all() and (boxes[8:] == -1).all()
    assert (ds["prediction"].values == ds["label"].values).mean() > 0.8
    from attriflow.tasks.storage import open_dataset

    assert set(open_dataset(reference_run / "store.zarr").groupby("family").groups) == {"gradient", "cam"}
    manifest = json.loads(ds.attrs["manifest"])
    on_disk = json.loads((reference_run / "manifest.json").read_text())
    assert manifest == on_disk
    assert manifest["config_hash"] == parse_config(SMALL).digest()
    assert manifest["seed"] == 0 and "torch" in manifest["versions"] and manifest["git_commit"]
    summary = (reference_run / "report" / "summary.md").read_text()
    assert "## Neuron selection" in summary and "](neuron_scatter.png)" in summary
    for name in ("neuron_scatter", "neuron_boxes"):
        assert (reference_run / "report" / f"{name}.png").stat().st_size > 10_000
    assert np.isfinite(ds["overlap_code_total"].values).all()
    assert "| **gradient** | `saliency` |" in summary and "| **cam** | `grad_cam` |" in summary
    json.loads(ds["params"].values[1])  # parameters recorded next to the attributions
    # cost: wall time of every stage's tasks, passes per image
    assert ds["explain_seconds"].dims == ds["evaluate_seconds"].dims == ("explainer", "shard")
    assert ds["load_seconds"].dims == ds["neurons_seconds"].dims == ("shard",)
    assert ds["sanity_seconds"].dims == ("explainer",)
    from attriflow.tasks.storage import TIMINGS

    for name in TIMINGS:
        assert (ds[name].values > 0).all(), name
    assert (ds["backward_passes"].values == 1).all()
    from attriflow.analysis.report import stage_costs

    stages = stage_costs(ds).set_index("stage")
    assert list(stages.index) == ["load", "explain", "neurons", "evaluate", "sanity"]
    assert (stages["timed"] == stages["tasks"]).all() and stages["tasks"].tolist() == [3, 6, 3, 6, 2]
    assert np.isclose(stages["share"].sum(), 1.0)
    assert stages.loc["evaluate", "seconds"] == pytest.approx(float(ds["evaluate_seconds"].sum()))
    section = summary.partition("## Cost\n")[2].partition("\n## ")[0]
    for stage in stages.index:
        assert f"| {stage} | {stages.loc[stage, 'seconds']:.1f} |" in section
    # sanity: cascading randomisation of the first 16 samples, top unit first
    assert ds["sanity"].dims == ("explainer", "sanity_sample", "depth", "similarity")
    assert ds["sanity"].shape == (2, 16, 5, 3)
    assert list(ds["randomised"].values) == ["fc", "block4", "block3", "block2", "block1"]
    assert np.isfinite(ds["sanity"].sel(similarity="ssim").values).all()
    # the report: HTML, Markdown and every figure as PNG (SVG on request: report.svg)
    report = reference_run / "report"
    for name in ("metric_distributions", "map_grid", "cost", "sanity", "curves_gradient", "curves_cam"):
        assert (report / f"{name}.png").stat().st_size > 5_000 and not (report / f"{name}.svg").exists()
    page = (report / "index.html").read_text()
    assert page.count("<img ") == page.count('src="data:image/png;base64,') >= 8
    assert "src=\"http" not in page and "<script" not in page and "<link" not in page
    assert 'id="family-gradient"' in page and 'id="family-cam"' in page
    assert "## Sanity check" in summary and "## Cost\n" in summary


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1


def test_report_figures_never_mislead(reference_run) -> None:
    """The report's figure rules on a real store: one colour map and one colour bar per
    explainer, the ground-truth caption only with ground truth, hit-or-miss metrics as
    shares with intervals, costs on linear axes, no legend over a panel, no sub-total for a
    one-member family."""
    import matplotlib.pyplot as plt

    from attriflow.analysis import plots
    from attriflow.analysis.report import metric_summary
    from attriflow.tasks.storage import open_current

    ds = open_current(reference_run / "store.zarr").load()
    grid = plots.plot_map_grid(ds, 4)
    images = [ax.images for ax in grid.axes if ax.images]
    columns = {}
    for ax in grid.axes:
        for im in ax.images:
            columns.setdefault(round(ax.get_position().x0, 3), set()).add(im.get_cmap().name)
    assert all(len(names) == 1 for names in columns.values()), columns  # one colour map per column
    bars = [ax for ax in grid.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(bars) == ds.sizes["explainer"] and images
    assert "ground truth" in grid._suptitle.get_text()
    bare = plots.plot_map_grid(ds.drop_vars([v for v in ("gt_mask", "gt_box") if v in ds]), 4)
    assert "ground truth" not in bare._suptitle.get_text()
    summary = metric_summary(ds)
    assert not summary["subtotal"].any()  # gradient and cam have one explainer each
    dist = plots.plot_metric_distributions(ds, summary)
    titles = {ax.get_title().split()[0]: ax for ax in dist.axes if ax.get_visible() and ax.get_title()}
    assert "share" in titles["pointing_game"].get_title() and titles["pointing_game"].patches  # bars, not boxes
    cost = plots.plot_cost(ds)
    assert all(ax.get_xscale() == "linear" for ax in cost.axes if ax.get_visible())
    for fig in (grid, dist, cost, plots.plot_curves(ds), plots.plot_sanity(ds), plots.plot_neuron_scatter(ds),
                plots.plot_neuron_boxes(ds)):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
        panels = [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_visible() and ax.has_data()]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(_overlaps(box, p) for p in panels), fig._suptitle.get_text()
        plt.close(fig)
    page = (reference_run / "report" / "index.html").read_text()
    assert "all gradient" not in page and "all cam" not in page


def test_the_readme_store_analyses_run_on_a_real_store(reference_run) -> None:
    """The README's "Five common analyses" block, run as written on a run's store."""
    import matplotlib

    matplotlib.use("Agg")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Five common analyses"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    scope: dict = {}
    exec(code.replace('"runs/default"', repr(str(reference_run))), scope)  # noqa: S102 - our own README
    assert scope["picked"].dtype == bool and scope["picked"].sum() > 0


def test_rerun_rewrites_nothing(reference_run) -> None:
    from attriflow.tasks.stages.plan import nothing_to_do, plan_run

    plan = plan_run(parse_config(SMALL).model_dump_json(), reference_run)
    assert nothing_to_do(plan, reference_run)  # the CLI then starts no flow and no server
    before = _files(reference_run / "store.zarr")
    result = _run(SMALL, reference_run)
    assert _files(reference_run / "store.zarr") == before
    for stage in ("load", "explain", "neurons", "evaluate"):
        assert result["counts"][stage]["computed"] == 0


def test_changed_params_recompute_only_that_explainer(reference_run, tmp_path) -> None:
    """A new setting of one explainer is a new entry: only its shards run, the old setting's
    maps stay in the store (inactive), no finished chunk is rewritten."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    store = run_dir / "store.zarr"
    before = _files(store)
    changed = json.loads(json.dumps(SMALL))
    changed["explain"]["explainers"][1]["params"] = {"layer": "block3"}
    from attriflow.tasks.stages.plan import plan_run

    plan = plan_run(parse_config(changed).model_dump_json(), run_dir)  # predicted before any work
    result = _run(changed, run_dir)
    assert plan["store"] == "grows" and plan["new_entries"] == 1 and plan["inactive"][0].startswith("grad_cam@")
    assert {st: c["computed"] for st, c in plan["stages"].items()} == \
        {st: c["computed"] for st, c in result["counts"].items()}
    assert plan["explainers"]["grad_cam"]["explain"] == {"computed": 3, "reused": 0}
    assert result["counts"]["load"]["computed"] == 0 and result["counts"]["neurons"]["computed"] == 0
    assert result["counts"]["explain"] == {"computed": 3, "reused": 3, "failed": 0}
    assert result["counts"]["evaluate"] == {"computed": 3, "reused": 3, "failed": 0}
    after = _files(store)
    rewritten = {k for k in after if after[k] != before.get(k)}
    assert any(k.startswith("attribution/c/2/") for k in rewritten)
    assert not any(k.startswith(("attribution/c/0/", "attribution/c/1/", "score/c/0/", "score/c/1/", "label",
                                 "prediction")) for k in rewritten)
    ds = xr.open_zarr(store)
    assert json.loads(ds["params"].values[2])["layer"] == "block3" and list(ds["active_order"].values) == [0, -1, 1]
    assert str(ds["explainer"].values[1]).startswith("grad_cam@") and ds["explainer"].values[2] == "grad_cam"


def test_locked_run_dir_is_refused_at_once(reference_run, prefect_server) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from attriflow.tasks.storage import run_lock\n"
         "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
         str(reference_run)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = _cli(["run", "--run-dir", str(reference_run)], {}, prefect_server)
        assert out.returncode == 2
        assert "in use by another attriflow process" in out.stderr and str(holder.pid) in out.stderr
    finally:
        holder.kill()
        holder.wait()
    from attriflow.tasks.storage import run_lock

    with pytest.warns(UserWarning, match=f"left by process {holder.pid}, which is gone"):
        with run_lock(reference_run):  # the killed holder's lock is taken over (and left clean)
            pass


def test_bad_config_fails_before_any_work(tmp_path, prefect_server) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("shard_size: 8\nexplain:\n  batch_size: 0\n")
    out = _cli(["run", str(cfg), "--run-dir", str(tmp_path / "never")], {}, prefect_server)
    assert out.returncode == 2
    assert "explain.batch_size" in out.stderr
    assert not (tmp_path / "never").exists()


def test_unknown_layer_fails_before_any_work_listing_valid_ones(tmp_path, prefect_server) -> None:
    cfg = tmp_path / "layer.yaml"
    cfg.write_text(yaml.safe_dump({**SMALL, "explain": {"explainers": [
        {"method": "grad_cam", "params": {"layer": "block9"}}]}}))
    out = _cli(["run", str(cfg), "--run-dir", str(tmp_path / "run")], {}, prefect_server)
    assert out.returncode == 1
    assert "explain.explainers[grad_cam].params.layer: unknown layer 'block9'" in out.stderr and "block4" in out.stderr
    assert "Traceback" not in out.stderr  # checked before Prefect starts: one clear line
    assert not (tmp_path / "run").exists()
    # a parameter that cannot fit the image: the same, before any work (was a failed shard)
    cfg.write_text(yaml.safe_dump({**SMALL, "explain": {"explainers": [
        {"method": "occlusion", "params": {"window": 100}}]}}))
    out = _cli(["run", str(cfg), "--run-dir", str(tmp_path / "run")], {}, prefect_server)
    assert out.returncode == 1 and "Traceback" not in out.stderr and not (tmp_path / "run").exists()
    assert out.stderr.strip().splitlines()[-1].startswith(
        "attriflow: error: explain.explainers[occlusion]: params.window: the occlusion window (100 pixels)")


@pytest.mark.parametrize("section, expected", [
    ({"model": {"arch": "resnet999"}},
     "invalid config 'cfg.yaml': model.arch: unknown architecture 'resnet999'"),
    ({"model": {"arch": "resnet18", "weights": "missing.pth"}}, "model.weights: file '"),
    ({"model": {"factory": "missing.py:build"}}, "model.factory: file 'missing.py' not found"),
    ({"data": {"kind": "imagefolder", "root": "missing"}}, "data.root: folder '"),
    ({"data": {"kind": "manifest", "path": "missing.csv"}}, "data.path: file '"),
])
def test_each_early_error_is_one_line_naming_the_field(section, expected, tmp_path, monkeypatch, capsys,
                                                       in_process_cli) -> None:
    """Checked from the config, the model and the data before Prefect starts: one
    ``attriflow: error: <field>: ...`` line, no traceback, no run directory."""
    monkeypatch.chdir(tmp_path)
    Path("cfg.yaml").write_text(yaml.safe_dump({**SMALL, **section}))
    code = in_process_cli(["run", "cfg.yaml", "--run-dir", "run"])
    err = capsys.readouterr().err
    assert code in (1, 2) and err.count("\n") == 1, err
    assert err.startswith(f"attriflow: error: {expected}"), err
    assert not Path("run").exists()


def test_a_store_of_another_image_size_is_refused(reference_run) -> None:
    from attriflow.tasks.storage import StoreLayoutError

    with pytest.raises(StoreLayoutError, match=r"data.image_size .*64 -> 48"):
        _run({**SMALL, "data": {"n_samples": 24, "image_size": 48}}, reference_run)
    # the maps' encoding is fixed too: refused before any work, naming the setting
    from attriflow.tasks.config import parse_config
    from attriflow.tasks.stages.plan import plan_run

    cfg = parse_config({**SMALL, "store": {"attribution_dtype": "float16"}})
    plan = plan_run(cfg.model_dump_json(), reference_run)
    assert plan["store"] == "other-layout"
    assert "store.attribution_dtype" in plan["reason"] and "float32 -> float16" in plan["reason"]


def test_methods_json_lists_taxonomy_and_costs(prefect_server) -> None:
    out = _cli(["methods", "--json"], {}, prefect_server)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    from attriflow.explainers import REGISTRY

    assert rows.keys() == REGISTRY.keys()
    assert rows["grad_cam"]["family"] == "cam"
    assert rows["grad_cam"]["taxonomy"] == "white-box / activation-cam / grad_cam"
    assert rows["saliency"]["cost_per_image"] == {"forward": 1, "backward": 1}
    tree = _cli(["methods"], {}, prefect_server).stdout
    assert "white-box / gradient back-propagation" in tree and "── grad_cam" in tree
    assert "white-box / relevance decomposition" in tree and "── lrp_composite" in tree


def test_methods_config_shows_resolved_layers(tmp_path, prefect_server) -> None:
    cfg = tmp_path / "seeds.yaml"
    cfg.write_text(yaml.safe_dump({"explain": {"explainers": [{"method": "sise"}, {"method": "grad_cam"}]}}))
    out = _cli(["methods", "--config", str(cfg), "--json"], {}, prefect_server)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["sise"]["params"]["resolved"]["layers"] == ["block1.5", "block2.5", "block3.5", "block4"]
    assert rows["grad_cam"]["params"]["resolved"]["layer"] == "block4"


def test_neuron_scores_do_not_depend_on_shard_size(reference_run, tmp_path) -> None:
    cheap = {**SMALL, "shard_size": 12, "explain": {"explainers": [{"method": "saliency"}]},
             "evaluate": {"steps": 2}}
    _run(cheap, tmp_path / "run")
    a = xr.open_zarr(reference_run / "store.zarr")
    b = xr.open_zarr(tmp_path / "run" / "store.zarr")
    for name in ("neuron_correlation", "neuron_precision", "selected_correlation", "overlap_jaccard"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_report_is_published_as_prefect_artifacts(reference_run, prefect_server) -> None:
    import httpx

    body = {"artifacts": {"key": {"any_": ["small-summary", "small-metrics"]}},
            "limit": 10, "offset": 0, "sort": "CREATED_DESC"}
    found = httpx.post(f"{prefect_server}/artifacts/filter", json=body, timeout=30).json()
    by_key = {a["key"]: a for a in found}
    summary = by_key["small-summary"]["data"]
    assert "| **cam** | `grad_cam` |" in summary
    # no figure path the UI cannot resolve: every figure is a link to a file that exists
    import re
    from urllib.parse import unquote, urlparse

    assert not re.search(r"!\[[^\]]*\]\((?!file:)", summary)
    links = re.findall(r"\((file://[^)]+)\)", summary) + re.findall(r"(file://\S+index\.html)", summary)
    assert len(links) >= 5 and all(Path(unquote(urlparse(u).path)).is_file() for u in links)
    assert by_key["small-metrics"]["type"] == "table"
    rows = json.loads(by_key["small-metrics"]["data"]) if isinstance(by_key["small-metrics"]["data"], str) \
        else by_key["small-metrics"]["data"]
    row = next(r for r in rows if r["explainer"] == "grad_cam" and r["metric"] == "deletion_auc")
    assert row["low"] <= row["mean"] <= row["high"] and row["n"] == 24  # the interval is kept
    # the flow run is named after the run and its config, and tagged
    cfg = parse_config(SMALL)
    name = f"small-{cfg.digest()[:8]}"
    runs = httpx.post(f"{prefect_server}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}}},
                      timeout=30).json()
    assert runs and {"run:small", "model:reference", "explainer:saliency", "explainer:grad_cam"} <= set(runs[0]["tags"])


def test_sanity_check_separates_an_edge_detector_from_grad_cam(prefect_server, tmp_path) -> None:
    """A method that ignores the model (Sobel edges of the input, registered only here)
    keeps similarity 1 at every randomisation depth; Grad-CAM's maps fall below 0.5."""
    import torch
    import torch.nn.functional as F

    from attriflow.analysis.report import sanity_table
    from attriflow.explainers import REGISTRY
    from attriflow.explainers.base import Explainer, ExplainerSpec, Family
    from attriflow.explainers.registry import register
    from attriflow.tasks.storage import open_dataset

    class EdgeDetector(Explainer):
        spec = ExplainerSpec(name="edge_detector_test", family=Family.PERTURBATION, access=("forward",),
                             summary="Sobel edge magnitude of the input (ignores the model)")

        def _attribute(self, inputs, targets, generators):
            gray = inputs.mean(dim=1, keepdim=True)
            kx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=inputs.dtype, device=inputs.device)
            gx = F.conv2d(gray, kx.view(1, 1, 3, 3), padding=1)
            gy = F.conv2d(gray, kx.t().reshape(1, 1, 3, 3), padding=1)
            return (gx * gx + gy * gy).sqrt()[:, 0]

    register(EdgeDetector)
    try:
        cfg = {**SMALL, "name": "sanity", "data": {"n_samples": 16}, "neurons": {"enabled": False},
               "explain": {"batch_size": 16, "explainers": [{"method": "edge_detector_test"}, {"method": "grad_cam"}]},
               "evaluate": {"steps": 2}, "sanity": {"samples": 16}}
        result = _run(cfg, tmp_path / "run")
    finally:
        del REGISTRY["edge_detector_test"]
    assert result["counts"]["sanity"] == {"computed": 2, "reused": 0, "failed": 0}
    ds = open_dataset(tmp_path / "run" / "store.zarr")
    np.testing.assert_allclose(ds["sanity"].sel(explainer="edge_detector_test").values, 1.0, atol=1e-6)
    table = sanity_table(ds).set_index("explainer")
    assert (table.loc["edge_detector_test", ["spearman_abs", "spearman", "ssim"]] == "never").all()
    assert table.loc["grad_cam", "ssim"] != "never" and table.loc["grad_cam", "spearman_abs"] != "never"
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "edge_detector_test" in page and "never" in page


def test_report_compares_runs_side_by_side(reference_run, tmp_path, prefect_server) -> None:
    other = {**SMALL, "name": "other{x}", "neurons": {"enabled": False}, "sanity": {"enabled": False},
             "explain": {"batch_size": 8, "explainers": [{"method": "saliency"}]}}
    _run(other, tmp_path / "other")
    out = _cli(["report", str(reference_run), str(tmp_path / "other"), "--out", str(tmp_path / "cmp")], {},
               prefect_server)
    assert out.returncode == 0, out.stderr[-2000:]
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert "<code>small</code> vs <code>other{x}</code>" in page  # braces: not a Prefect name template
    # saliency is in both runs (same data and model: same numbers), grad_cam only in the first
    row = page[page.index("<td class=\"name\">saliency</td><td class=\"name\">deletion_auc"):]
    row = row[: row.index("</tr>")]
    cells = row.split("<td")[3:]
    assert len(cells) == 2 and cells[0].split("<br>")[0][-5:] == cells[1].split("<br>")[0][-5:]
    assert "grad_cam" in page and (tmp_path / "cmp" / "comparison.png").stat().st_size > 5_000
    # the same samples, model, data and evaluation: no warning; identical saliency scores are
    # never marked (the paired test has nothing to test); the settings that differ are listed
    assert "class='warn'" not in page and "all gradient" not in page
    assert "identical scores (n = 24)" in cells[1] and "best" not in row
    assert "Wilcoxon signed-rank" in page and "neurons.enabled" in page and "explain.explainers" in page
    assert (tmp_path / "cmp" / "comparison_maps.png").stat().st_size > 5_000
    md = (tmp_path / "cmp" / "summary.md").read_text()
    assert "`other{x}`" in md and "## Paired tests against `small`" in md and "> **Warning:**" not in md
    import shutil

    if shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome"):
        _screenshot(_chromium(), tmp_path / "cmp" / "index.html", "comparison.png", "1400,1800", ink=0.01)


def test_a_comparison_says_its_warnings_on_the_console(reference_run, tmp_path, capsys,
                                                       in_process_cli) -> None:
    """What makes two runs' numbers not comparable is said on the console, not only on the page."""
    import shutil

    import zarr

    shutil.copytree(reference_run, tmp_path / "retrained")
    group = zarr.open_group(str(tmp_path / "retrained" / "store.zarr"), mode="r+")
    manifest = json.loads(group.attrs["manifest"])
    group.attrs["manifest"] = json.dumps({**manifest, "name": "retrained", "model_digest": "another"})
    from attriflow.tasks.storage import consolidate

    consolidate(tmp_path / "retrained" / "store.zarr")
    code = in_process_cli(["report", str(reference_run), str(tmp_path / "retrained"),
                           "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr()
    assert code == 0 and f"comparison: {tmp_path / 'cmp' / 'index.html'}" in out.out
    assert out.err.startswith("attriflow: warning: `retrained` explains another model than `small`"), out.err
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert "explains another model" in page


def test_report_escapes_user_strings(reference_run, tmp_path) -> None:
    import shutil

    from attriflow.tasks.stages import render_report

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    import zarr

    group = zarr.open_group(str(run_dir / "store.zarr"), mode="r+")
    manifest = json.loads(group.attrs["manifest"])
    manifest["name"] = "<script>alert(1)</script>"
    manifest["explainers"]["saliency"]["params"] = {"note": "<img src=x onerror=alert(2)>"}
    group.attrs["manifest"] = json.dumps(manifest)
    from attriflow.tasks.storage import consolidate

    consolidate(run_dir / "store.zarr")
    render_report(run_dir)
    page = (run_dir / "report" / "index.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page


def _chromium() -> str:
    """Path of a Chromium binary. ``make test``'s set-up (``tools/ensure-chromium``) installs
    Debian's ``chromium`` package when it is missing; the test itself never downloads, and
    skips with the set-up's stated reason only where that could not install it."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    log = Path(__file__).resolve().parents[2] / ".venv" / "chromium-install.log"
    why = log.read_text().strip()[-800:] if log.exists() else "run `make test`: its set-up installs it"
    pytest.skip(f"headless Chromium is not installed: {why}")


PROBE = """<script>window.addEventListener('load', () => {
const imgs = [...document.images];
const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
const families = [...document.querySelectorAll('section.family')].map(s => s.dataset.family);
const hidden = Math.max(0, ...[...document.querySelectorAll('.wrap')].map(w => w.scrollWidth - w.clientWidth));
const pre = document.createElement('pre'); pre.id = 'probe';
pre.textContent = JSON.stringify({images: imgs.length, broken, families, hidden});
document.body.appendChild(pre);});</script>"""


def _browse(chromium: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={page.parent / 'chromium-profile'}", "--virtual-time-budget=15000"]
    return subprocess.run([chromium, *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=180)


def _probe(chromium: str, page: Path, extra: str = "") -> dict:
    probed = page.with_name("probe.html")
    probed.write_text(page.read_text().replace("</body>", extra + PROBE + "</body>"))
    dom = _browse(chromium, probed, "--window-size=1400,2400", "--dump-dom").stdout
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    return json.loads(dom[start: dom.index("</pre>", start)])


def _screenshot(chromium: str, page: Path, name: str, size: str = "1400,2400", ink: float = 0.05) -> Path:
    """A screenshot of ``page`` at ``size`` pixels, checked not blank; kept under
    ``$ATTRIFLOW_SCREENSHOTS/<name>`` when that is set (how docs/ gets its pictures)."""
    import os
    import shutil

    import matplotlib.image

    shot = page.with_name(name)
    out = _browse(chromium, page, f"--window-size={size}", f"--screenshot={shot}")
    assert shot.exists(), out.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.std() > 0.05, "blank screenshot"
    non_white = (pixels < 0.9).any(axis=-1).mean()
    assert non_white > ink, f"only {non_white:.1%} of the screenshot is not white"
    if os.environ.get("ATTRIFLOW_SCREENSHOTS"):
        keep = Path(os.environ["ATTRIFLOW_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / name)
    return shot


def test_report_renders_in_headless_chromium(reference_run, tmp_path) -> None:
    """The self-contained page, opened from a copy of its file alone (as by double-click):
    every embedded image decodes, every family of the run has its section, and the
    screenshot is not blank."""
    import shutil

    chromium = _chromium()
    page = tmp_path / "index.html"
    shutil.copy(reference_run / "report" / "index.html", page)  # no figure files next to it
    probe = _probe(chromium, page)
    assert probe["images"] >= 8 and probe["broken"] == 0, probe
    assert probe["hidden"] == 0, probe  # every table readable at 1400 px: no column scrolled out of view
    families = sorted({str(f) for f in xr.open_zarr(reference_run / "store.zarr")["family"].values})
    assert sorted(probe["families"]) == families
    # the probe does see a broken image when there is one
    bad = _probe(chromium, page, '<img alt="bad" src="data:image/png;base64,AAAA">')
    assert bad["broken"] == 1
    _screenshot(chromium, page, "report.png")


def _clashing_folder(path: Path) -> Path:
    """A working directory holding the generic names attriflow's folders have (``data.py``,
    ``tasks.py``, ``analysis/``), each failing loudly when imported."""
    path.mkdir()
    for name in ("data.py", "tasks.py", "flows.py", "explainers.py"):
        (path / name).write_text(f"raise ImportError('a user file was imported: {name}')\n")
    (path / "analysis").mkdir()
    (path / "analysis" / "__init__.py").write_text("raise ImportError('a user folder was imported: analysis')\n")
    return path


def test_cli_reexecutes_with_the_tuned_allocator(reference_run, tmp_path) -> None:
    """The console script re-executes itself from a folder holding data.py, tasks.py,
    analysis/ and attriflow/, none of which it imports; then the Python API
    runs from the same folder, as a notebook next to such files would."""
    from attriflow.flows.cli import GLIBC_TUNABLES, allocator_env

    assert allocator_env({}, "linux", "glibc") == {"GLIBC_TUNABLES": GLIBC_TUNABLES}
    assert allocator_env({"GLIBC_TUNABLES": "x"}, "linux", "glibc") is None  # the user's own settings win
    assert allocator_env({}, "darwin", "") is None
    assert allocator_env({"ATTRIFLOW_ALLOCATOR": "default"}, "linux", "glibc") is None
    # the real command: the same process (pid) continues with the settings in its environment
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ATTRIFLOW_ALLOCATOR")}
    work = _clashing_folder(tmp_path / "work")
    # an attriflow/ folder too (a checkout, a copy): the command runs the installed attriflow,
    # as the console script did before re-executing (it once re-ran with this folder first)
    (work / "attriflow").mkdir()
    fake = "raise ImportError('a user folder was imported: attriflow')\n"
    (work / "attriflow" / "__init__.py").write_text(fake)
    script = Path(sys.executable).with_name("attriflow")
    proc = subprocess.Popen([str(script), "report", str(reference_run)], env=env,
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = ""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and "GLIBC_TUNABLES=" not in seen:
        try:
            seen = Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    # (glibc splits the value in place at its ':' when it parses it at start-up)
    assert f"GLIBC_TUNABLES={GLIBC_TUNABLES}".replace(":", "\x00") in seen
    # the public API from the same folder: a finished run answered (no Prefect server
    # reachable) and its store opened (``import attriflow`` there is the folder's by Python's rules)
    import shutil

    shutil.rmtree(work / "attriflow")
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    code = ("import json, sys, attriflow\n"
            "assert 'torch' not in sys.modules\n"
            f"ds = attriflow.run({str(cfg)!r}, run_dir={str(reference_run)!r})\n"
            "print(json.dumps({'dims': dict(ds.sizes), 'explainers': [str(e) for e in ds.explainer.values],\n"
            "                  'grad_cam': attriflow.get_explainer('grad_cam').spec.family.value}))\n")
    api = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300,
                         env={**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert api.returncode == 0, api.stderr[-2000:]
    got = json.loads(api.stdout.strip().splitlines()[-1])
    assert got["dims"]["sample"] == 24 and got["explainers"] == ["saliency", "grad_cam"]
    assert got["grad_cam"] == "cam"


def test_bf16_and_channels_last_are_provenance(reference_run, tmp_path) -> None:
    import shutil

    from attriflow.analysis.metrics.sanity import spearman

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    cfg = json.loads(json.dumps(SMALL))
    cfg["explain"].update(precision="bf16", channels_last=True)
    result = _run(cfg, run_dir)
    assert result["counts"]["load"]["computed"] == 0
    assert result["counts"]["explain"] == {"computed": 6, "reused": 0, "failed": 0}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["explain"]["precision"] == "bf16" and manifest["config"]["explain"]["channels_last"]
    ours = xr.open_zarr(run_dir / "store.zarr")["attribution"].values
    ref = xr.open_zarr(reference_run / "store.zarr")["attribution"].values
    assert not np.array_equal(ours, ref) and ours.dtype == np.float32
    assert spearman(ours[1].astype(np.float64), ref[1].astype(np.float64)).mean() > 0.99  # grad_cam
