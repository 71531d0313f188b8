"""NeuroMask: the three cost terms do what they are for; the optimiser is TF1's RMSProp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attriflow.explainers import get_explainer
from attriflow.explainers.methods.neuromask import laplacian_kernel, tf_rmsprop_step


@pytest.fixture(scope="module")
def reference4():
    from attriflow.data.embedded import MEAN, STD, make_split
    from attriflow.tasks.config import ModelConfig
    from attriflow.tasks.models import build_model

    s = make_split("test", 0, 4)
    model = build_model(ModelConfig())
    x = model.normalize(torch.from_numpy(s.images).double())
    net = model.module.double()  # float64: batch-size invariance is exact, not up to kernels
    with torch.no_grad():
        pred = net(x).argmax(1)
    return net, x, pred, (MEAN, STD)


def _masked(model_inputs, mask, black):
    return model_inputs * mask[:, None] + black * (1 - mask[:, None])


def test_prediction_term_alone_keeps_the_prediction(reference4) -> None:
    model, x, pred, (mean, std) = reference4
    nm = get_explainer("neuromask")(model, iterations=300, sparsity_weight=0.0, smoothness_weight=0.0)
    nm.normalization = (mean, std)
    mask = nm.attribute(x, pred, seeds=torch.arange(4))
    black = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(model(_masked(x, mask, black)).argmax(1), pred)


def test_without_prediction_term_the_mask_collapses(tiny_cnn, tiny_inputs) -> None:
    x, t = tiny_inputs
    nm = get_explainer("neuromask")(tiny_cnn, iterations=1500, prediction_weight=0.0)
    start = get_explainer("neuromask")(tiny_cnn, iterations=1, prediction_weight=0.0)
    seeds = torch.arange(5)
    assert start.attribute(x, t, seeds=seeds).mean() > 0.3
    assert nm.attribute(x, t, seeds=seeds).max() < 0.05


def test_tf1_rmsprop_on_a_toy_quadratic() -> None:
    """TF1's RMSPropOptimizer (momentum 0): ms starts at 1, eps inside the root. Written
    here from TF1's documented rule, iterated on f(w) = 0.5 a (w - b)^2."""
    a, b, lr = np.array([3.0, 0.5, 10.0]), np.array([1.0, -2.0, 0.25]), 0.03
    w_ref, ms_ref, mom = np.array([5.0, 5.0, -5.0]), np.ones(3), np.zeros(3)
    w, ms = torch.tensor([5.0, 5.0, -5.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for _ in range(200):
        g = a * (w_ref - b)
        ms_ref = 0.9 * ms_ref + 0.1 * g * g
        mom = 0.0 * mom + lr * g / np.sqrt(ms_ref + 1e-10)
        w_ref = w_ref - mom
        tf_rmsprop_step(w, torch.as_tensor(a) * (w - torch.as_tensor(b)), ms, lr)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-12)
    # PyTorch's RMSprop (accumulator from 0, eps outside the root) takes other steps
    wt = torch.tensor([5.0, 5.0, -5.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.RMSprop([wt], lr=lr, alpha=0.9, eps=1e-10)
    for _ in range(3):
        opt.zero_grad()
        (0.5 * torch.as_tensor(a) * (wt - torch.as_tensor(b)) ** 2).sum().backward()
        opt.step()
    w3, ms3 = torch.tensor([5.0, 5.0, -5.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for _ in range(3):
        tf_rmsprop_step(w3, torch.as_tensor(a) * (w3 - torch.as_tensor(b)), ms3, lr)
    assert not torch.allclose(wt.detach(), w3)


def test_laplacian_kernels() -> None:
    assert laplacian_kernel(3).sum() == 0 and laplacian_kernel(3)[1, 1] == 8
    assert laplacian_kernel(5).sum() == 0 and laplacian_kernel(5)[2, 2] == 24


def test_early_stop_and_batching(reference4) -> None:
    model, x, pred, norm = reference4
    nm = get_explainer("neuromask")(model, iterations=300, early_stop=True, patience=10, min_delta=0.01)
    nm.normalization = norm
    seeds = torch.tensor([7, 8, 9, 10])
    together = nm.attribute(x, pred, seeds=seeds, batch_size=4)
    used = nm.last_forward_passes.clone()
    alone = torch.cat([nm.attribute(x[i : i + 1], pred[i : i + 1], seeds=seeds[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert (used <= 300).all() and (used < 300).any(), used
    nm.resolve(x[:1])
    assert nm.params()["resolved"]["kernel"] == 3 and len(nm.params()["resolved"]["black"]) == 3
