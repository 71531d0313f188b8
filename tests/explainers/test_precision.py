"""Mixed precision: bf16 maps stay close to fp32 maps on the reference CNN.

Measured (32 test images): Spearman rank correlation of bf16 with fp32 maps is >= 0.99 for
the CAM, relevance and perturbation families (Score-CAM, RISE, SISE and occlusion among the
sampling explainers); pixel-level gradient maps (saliency, Integrated Gradients) reach about
0.975-0.98 on average, so they are held to 0.95 here and the README and
``benchmarks/RESULTS.md`` say so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attriflow.analysis.metrics.sanity import spearman
from attriflow.explainers import get_explainer


@pytest.fixture(scope="module")
def reference():
    from attriflow.tasks.config import RunConfig
    from attriflow.tasks.runtime import get_runtime

    rt = get_runtime(RunConfig().model_dump_json())
    batch = rt.source.load(0, 16)
    return rt.module, rt.model.normalize(torch.from_numpy(batch.images)), torch.from_numpy(batch.labels)


@pytest.mark.parametrize(("method", "params", "bound"), [
    ("grad_cam", {}, 0.99),
    ("score_cam", {}, 0.99),
    ("lrp_composite", {}, 0.99),
    ("occlusion", {"window": 16, "stride": 8}, 0.99),
    ("rise", {"masks": 500}, 0.99),
    ("sise", {}, 0.99),
    ("saliency", {}, 0.95),
    ("integrated_gradients", {"steps": 16}, 0.95),
])
def test_bf16_maps_rank_like_fp32_maps(reference, method, params, bound) -> None:
    model, x, t = reference
    exp = get_explainer(method)(model, **params)
    exp.resolve(x[:1])
    seeds = torch.arange(len(x), dtype=torch.int64)
    fp32 = exp.attribute(x, t, batch_size=16, seeds=seeds)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = exp.attribute(x, t, batch_size=16, seeds=seeds)
    assert not torch.equal(fp32, bf16.float())  # autocast did change the arithmetic
    rho = spearman(fp32.double().numpy(), bf16.float().double().numpy())
    assert np.mean(rho) >= bound, rho
