"""Bad inputs end to end: a model with non-finite outputs, hostile names in an ImageFolder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attriflow.tasks.storage import open_dataset
from tests.flows.helpers import SMALL, run

pytestmark = pytest.mark.slow


def test_non_finite_model_outputs_are_flagged_not_averaged(prefect_server, tmp_path) -> None:
    """A weight near float32's maximum makes the logits overflow to inf on the images whose
    feature 2 is large, and only there: those maps are flagged and left out of the means."""
    from attriflow.data import REFERENCE_WEIGHTS
    from attriflow.tasks.runtime import get_runtime

    state = torch.load(REFERENCE_WEIGHTS, weights_only=True)
    state["fc.weight"][0, 2] = 3.0e38
    weights = tmp_path / "overflow.pt"
    torch.save(state, weights)
    cfg = {**SMALL, "name": "overflow", "model": {"arch": "reference", "weights": str(weights)},
           "neurons": {"enabled": False}, "sanity": {"samples": 8}}
    run(cfg, tmp_path / "run")
    ds = open_dataset(tmp_path / "run" / "store.zarr")
    # which outputs are non-finite, computed independently of the pipeline
    from attriflow.tasks.config import parse_config

    rt = get_runtime(parse_config(cfg).model_dump_json())
    with torch.no_grad():
        logits = rt.module(rt.model.normalize(torch.from_numpy(rt.source.load(0, 24).images)))
    bad = ~torch.isfinite(logits).all(dim=1).numpy()
    assert 0 < bad.sum() < 24
    np.testing.assert_array_equal(ds["finite_output"].values, ~bad)
    flagged = ds["flagged"].values
    assert (flagged[:, bad]).all()
    score = ds["score"].values
    assert np.isnan(score[flagged]).all()
    assert np.isfinite(score[~flagged][:, :2]).all()  # deletion and insertion of every other map
    assert np.isnan(ds["sanity"].values[:, bad[:8]]).all()
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "Non-finite maps" in summary and f"saliency: {int(flagged[0].sum())}" in summary
    from attriflow.analysis.report import metric_summary

    s = metric_summary(ds).set_index(["explainer", "metric"])
    kept = score[0, ~flagged[0], 0]
    assert s.loc[("saliency", "deletion_auc"), "mean"] == pytest.approx(kept.mean(), rel=1e-6)
    assert s.loc[("saliency", "deletion_auc"), "n"] == (~flagged[0]).sum()


def test_hostile_names_in_an_image_folder_are_shown_as_text(prefect_server, tmp_path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for cls in ("<script>alert(1)", "cat"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "cat" / "<img src=x onerror=alert(2)>.png").write_bytes(b"not a png")
    cfg = {**SMALL, "name": "<b>hostile</b>", "shard_size": 6,
           "data": {"kind": "imagefolder", "root": str(root), "n_samples": None, "image_size": 32},
           "model": {"arch": "reference", "num_classes": 2, "random_init": True}, "neurons": {"enabled": False},
           "sanity": {"enabled": False}, "explain": {"batch_size": 6, "explainers": [{"method": "saliency"}]}}
    run(cfg, tmp_path / "run")
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;.png" in page
    assert "<b>hostile</b>" not in page and "&lt;b&gt;hostile&lt;/b&gt;" in page
    ds = open_dataset(tmp_path / "run" / "store.zarr")
    assert ds.sizes["sample"] == 6 and "<script>alert(1)/0.png" in list(ds["sample_name"].values)
