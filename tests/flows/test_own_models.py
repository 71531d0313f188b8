"""A researcher's own model and data through every stage: a module in a file outside the
project, a timm model on a manifest of real photos at a non-square size, an exported
program; provenance follows the model's source code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from tests.flows.helpers import ROOT, SMALL, run

pytestmark = pytest.mark.slow

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, classes, width):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        emb = self.body(x).mean(dim=(2, 3))
        return self.head(emb), emb  # (logits, embedding), as research code often does


def build(classes=10, width=8):
    return Net(classes, width)
'''

TINY = {
    "shard_size": 4,
    "data": {"n_samples": 8, "image_size": 32},
    "explain": {"batch_size": 8, "explainers": [{"method": "saliency"}, {"method": "grad_cam"}]},
    "evaluate": {"steps": 8, "batch_size": 64},
    "neurons": {"copies": 4, "box_samples": 2},
    "sanity": {"samples": 4},
    "report": {"bootstrap": 100},
}


def _computed(result: dict) -> dict[str, int]:
    return {stage: c["computed"] for stage, c in result["counts"].items()}


def test_a_module_in_a_file_outside_the_project_runs_every_stage(prefect_server, tmp_path) -> None:
    lab = tmp_path / "elsewhere" / "lab"
    lab.mkdir(parents=True)
    (lab / "net.py").write_text(NET)
    cfg = {**TINY, "name": "own-module",
           "model": {"factory": f"{lab / 'net.py'}:build", "kwargs": {"classes": 10, "width": 8},
                     "output": {"index": 0}}}
    first = run(cfg, tmp_path / "run")
    assert _computed(first) == {"load": 2, "explain": 4, "neurons": 2, "evaluate": 4, "sanity": 2}
    ds = xr.open_zarr(tmp_path / "run" / "store.zarr")
    assert np.isfinite(ds["attribution"].values).all() and np.isfinite(ds["score"].values[..., :2]).all()
    assert np.isfinite(ds["neuron_correlation"].values).any() and np.isfinite(ds["sanity"].values).all()
    assert "net.py:build" in json.loads(ds.attrs["manifest"])["model"]
    again = run(cfg, tmp_path / "run")
    assert set(_computed(again).values()) == {0}  # unchanged model code: everything reused
    (lab / "net.py").write_text(NET + "\n# the researcher edits the model's file\n")
    edited = run(cfg, tmp_path / "run")
    assert _computed(edited) == _computed(first)  # new provenance: every shard recomputed


def _photos(folder: Path) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    """Three real photos from scikit-image with one box each (x0, y0, x1, y1)."""
    from skimage import data

    rows = []
    for name, label, box in (("astronaut", "person", (140, 20, 320, 240)), ("coffee", "cup", (60, 20, 560, 390)),
                             ("chelsea", "cat", (0, 0, 451, 300))):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
        rows.append((f"{name}.png", label, box))
    return rows


def test_timm_model_on_a_manifest_of_photos_at_a_non_square_size(prefect_server, tmp_path) -> None:
    pytest.importorskip("timm")
    rows = _photos(tmp_path)
    manifest = tmp_path / "photos.csv"
    manifest.write_text("path,label,x0,y0,x1,y1\n" + "".join(
        f"{p},{label},{','.join(map(str, box))}\n" for p, label, box in rows))
    cfg = {**TINY, "name": "timm-manifest", "shard_size": 2,
           "data": {"kind": "manifest", "path": str(manifest), "image_size": [40, 56], "n_samples": None},
           "model": {"arch": "timm:test_resnet", "random_init": True, "num_classes": 3,
                     "classes": ["person", "cup", "cat"]},
           "neurons": {"enabled": False}, "sanity": {"samples": 2}}
    result = run(cfg, tmp_path / "run")
    assert _computed(result)["explain"] == 4
    ds = xr.open_zarr(tmp_path / "run" / "store.zarr")
    assert ds.sizes["y"] == 40 and ds.sizes["x"] == 56 and ds["attribution"].shape == (2, 3, 40, 56)
    np.testing.assert_array_equal(ds["label"].values, [0, 1, 2])
    boxes = ds["gt_box"].values  # the explained (predicted) class's box, where it has one
    has = boxes[:, 0] >= 0
    assert (boxes[has, 2] <= 40).all() and (boxes[has, 3] <= 56).all()
    manifest_json = json.loads(ds.attrs["manifest"])
    assert manifest_json["classes"] == ["person", "cup", "cat"]
    assert manifest_json["preprocess"]["size"] == [40, 56] and manifest_json["preprocess"]["resize"] == [42, 58]
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "40 x 56" in summary and "scaled to cover 42 x 58 px" in summary and "person, cup, cat" in summary

    # the manifest is reordered and gains a photo listed first: the store knows its samples by
    # content, so only the new sample's shard runs and the others keep their place
    from skimage import data

    from attriflow.tasks.config import parse_config
    from attriflow.tasks.stages.plan import plan_run

    Image.fromarray(data.rocket()).save(tmp_path / "rocket.png")
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], "rocket.png,cup,0,0,600,427", *reversed(lines[1:])]) + "\n")
    plan = plan_run(parse_config(cfg).model_dump_json(), tmp_path / "run")
    grown = run(cfg, tmp_path / "run")
    assert plan["new_samples"] == 1 and {st: c["computed"] for st, c in plan["stages"].items()} == _computed(grown)
    assert _computed(grown) == {"load": 1, "explain": 2, "neurons": 0, "evaluate": 2, "sanity": 0}
    ds = xr.open_zarr(tmp_path / "run" / "store.zarr")
    assert [str(n) for n in ds["sample_name"].values] == ["astronaut.png", "coffee.png", "chelsea.png", "rocket.png"]
    assert list(ds["sample_order"].values) == [3, 2, 1, 0]


def test_an_exported_program_gives_the_eager_models_maps(reference_run, prefect_server, tmp_path) -> None:
    from attriflow.explainers import UnsupportedModelError

    program = {"program": str(ROOT / "configs" / "models" / "reference_cnn.pt2"),
               "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    cfg = {**SMALL, "name": "exported", "model": program, "neurons": {"enabled": False},
           "sanity": {"enabled": False}, "explain": {**SMALL["explain"], "explainers": [{"method": "saliency"}]}}
    run(cfg, tmp_path / "run")
    ours = xr.open_zarr(tmp_path / "run" / "store.zarr")["attribution"].values[0]
    eager = xr.open_zarr(reference_run / "store.zarr")["attribution"].sel(explainer="saliency").values
    np.testing.assert_allclose(ours, eager, rtol=1e-4, atol=1e-6 * np.abs(eager).max())
    with pytest.raises(UnsupportedModelError, match=r"(?s)neurons.enabled.*grad_cam.*saliency") as err:
        run({**cfg, "explain": SMALL["explain"], "neurons": {"enabled": True}}, tmp_path / "refused")
    assert "saliency:" not in str(err.value)  # every refusal at once, saliency is not one
    assert not (tmp_path / "refused" / "store.zarr").exists()
