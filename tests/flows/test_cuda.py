"""The CUDA paths, run where a GPU is (``benchmarks/gpu.sh``): generators that stay on the
CPU while the data is on the GPU, neuron statistics reduced on the device, autocast
precisions, a whole run on CUDA against the same run on the CPU, and a Dask worker's GPU.

Every test skips without CUDA (``-m gpu`` selects them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.flows.helpers import SMALL, run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu.sh runs it)")]

CUDA_CFG = {**SMALL, "data": {"n_samples": 16},
            "explain": {"batch_size": 8, "explainers": [
                {"method": "saliency"}, {"method": "grad_cam"},
                {"method": "rise", "params": {"masks": 64}},  # seeded draws: CPU generators, GPU data
                {"method": "smooth_grad", "params": {"samples": 4}}]},
            "neurons": {"copies": 12, "batch_size": 5}, "sanity": {"samples": 4}}


def test_perturbed_copies_and_neuron_scores_on_cuda_equal_the_cpu() -> None:
    from attriflow.analysis.neurons import perturb
    from attriflow.tasks.config import ModelConfig
    from attriflow.tasks.models import build_model
    from attriflow.tasks.neurons import conv_activation_layers, score_image

    image = torch.rand(3, 64, 64)
    for mode in ("growing", "constant", "masking"):
        cpu = perturb(image, torch.arange(6), 0.1, mode, torch.Generator().manual_seed(1))
        gpu = perturb(image.cuda(), torch.arange(6), 0.1, mode, torch.Generator().manual_seed(1))
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-6)
    model = build_model(ModelConfig()).module.eval()
    layers = conv_activation_layers(model, image[None])
    kw = dict(copies=20, noise=0.1, mode="growing", min_activation=0.1, batch_size=7)
    a = score_image(model, layers, image, 3, generator=torch.Generator().manual_seed(0), **kw)
    b = score_image(model.cuda(), layers, image.cuda(), 3, generator=torch.Generator().manual_seed(0), **kw)
    model.cpu()
    for name in layers:
        np.testing.assert_allclose(b.correlation[name], a.correlation[name], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(b.precision[name], a.precision[name], rtol=1e-3)


def test_a_run_on_cuda_matches_the_same_run_on_the_cpu(prefect_server, tmp_path) -> None:
    import xarray as xr

    run({**CUDA_CFG, "device": "cpu"}, tmp_path / "cpu")
    run({**CUDA_CFG, "device": "cuda"}, tmp_path / "cuda")
    assert json.loads((tmp_path / "cuda" / "manifest.json").read_text())["device"] == "cuda"
    cpu, gpu = (xr.open_zarr(tmp_path / d / "store.zarr") for d in ("cpu", "cuda"))
    for name in cpu["explainer"].values:
        a = cpu["attribution"].sel(explainer=name).values
        b = gpu["attribution"].sel(explainer=name).values
        scale = np.abs(a).reshape(len(a), -1).max(1)[:, None, None]
        assert np.abs(a - b).max() <= 1e-3 * scale.max(), name  # same seeds, same draws
    np.testing.assert_allclose(gpu["score"].values, cpu["score"].values, rtol=2e-3, atol=2e-3)
    agree = (gpu["selected_correlation"].values == cpu["selected_correlation"].values).mean()
    assert agree > 0.99
    assert np.isfinite(gpu["sanity"].values).all()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_on_cuda_give_the_fp32_maps(prefect_server, tmp_path, precision) -> None:
    import xarray as xr
    from scipy.stats import spearmanr

    cfg = {**CUDA_CFG, "device": "cuda", "neurons": {"enabled": False}, "sanity": {"enabled": False},
           "explain": {"batch_size": 8, "explainers": [{"method": "grad_cam"}, {"method": "rise", "params": {"masks": 64}}]}}
    run(cfg, tmp_path / "fp32")
    run({**cfg, "explain": {**cfg["explain"], "precision": precision}}, tmp_path / precision)
    a = xr.open_zarr(tmp_path / "fp32" / "store.zarr")["attribution"].values
    b = xr.open_zarr(tmp_path / precision / "store.zarr")["attribution"].values
    assert np.isfinite(b).all()
    for e in range(len(a)):
        rho = np.mean([spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a[e], b[e])])
        assert rho > 0.95, (e, rho)


def test_a_dask_worker_runs_its_shards_on_its_gpu(prefect_server, tmp_path) -> None:
    cfg = {**CUDA_CFG, "device": "auto", "neurons": {"enabled": False}, "sanity": {"enabled": False},
           "runner": {"kind": "dask", "workers": 1}}
    result = run(cfg, tmp_path / "dask")
    assert result["counts"]["explain"]["failed"] == 0
    assert json.loads((tmp_path / "dask" / "manifest.json").read_text())["device"] == "cuda"
