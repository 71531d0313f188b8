"""Issue #17's acceptance run: ``configs/families.yaml`` (one explainer of every taxonomy
family, the three sanity baselines included) end to end, at a small size: the report groups
the explainers by family in taxonomy order, and every metric table carries the baselines."""

from __future__ import annotations

import re

import xarray as xr
import yaml

from attriflow.explainers import Family, get_explainer
from tests.flows.helpers import ROOT, run

#: Budgets for a test run; the config's methods and families are kept.
SMALL_PARAMS = {"integrated_gradients": {"steps": 8}, "neuromask": {"iterations": 5},
                "kernel_shap": {"samples": 20, "segmentation": "grid", "segments": 9}}
BASELINES = ("random_map", "centred_gaussian", "sobel")


def test_every_family_runs_and_the_report_groups_them_with_the_baselines_everywhere(prefect_server,
                                                                                      tmp_path) -> None:
    cfg = yaml.safe_load((ROOT / "configs" / "families.yaml").read_text())
    families = {str(get_explainer(e["method"]).spec.family) for e in cfg["explain"]["explainers"]}
    assert families == {str(f) for f in Family}  # the config holds one of every family
    cfg["data"]["n_samples"], cfg["shard_size"], cfg["evaluate"]["steps"] = 4, 4, 4
    cfg["sanity"]["enabled"] = False
    for e in cfg["explain"]["explainers"]:
        e["params"] = {**e.get("params", {}), **SMALL_PARAMS.get(e["method"], {})}
    result = run(cfg, tmp_path / "run")
    assert result["counts"]["explain"]["failed"] == 0
    report = tmp_path / "run" / "report"
    page = (report / "index.html").read_text()
    assert re.findall(r'<section class="family" id="family-(\w+)"', page) == [str(f) for f in Family]
    summary = (report / "summary.md").read_text()
    metrics_section = summary.split("## Metrics")[1].split("\n## ")[0]
    rows = [line for line in metrics_section.splitlines() if line.startswith("| ") and "`" in line]
    shown = [re.search(r"`(\w+)`", line).group(1) for line in rows]
    rank = {name: list(Family).index(get_explainer(name).spec.family) for name in shown}
    assert shown == sorted((e["method"] for e in cfg["explain"]["explainers"]), key=rank.__getitem__)
    # every metric table of the HTML page (the overall one and each family's section that
    # compares with them) names every baseline
    ds = xr.open_zarr(tmp_path / "run" / "store.zarr")
    scored = ds["score"].sel(explainer=list(BASELINES)).notnull().any("sample")
    assert bool(scored.sel(metric=["deletion_auc", "insertion_auc", "gini"]).all())
    head = r"<table><thead><tr><th class=\"name\">family</th>.*?</table>"
    tables = [t for t in re.findall(head, page, re.S) if "deletion_<wbr>auc" in t]
    assert len(tables) == 1 + len(Family)  # the overall metric table and one per family section
    for html_table in tables:
        for name in BASELINES:
            assert f"<td class=\"name\">{name}</td>" in html_table
