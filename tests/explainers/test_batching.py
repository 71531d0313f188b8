"""Automatic batch sizes: chosen from the activation footprint, and never changing a map."""

from __future__ import annotations

import torch
from torch import nn

from attriflow.explainers import get_explainer
from attriflow.explainers._batching import auto_batch_size


def _net(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, 4)).eval()


def test_auto_batch_size_is_the_largest_power_of_two_within_the_budget() -> None:
    x = torch.zeros(1, 3, 8, 8)
    net = _net(16)
    # leaf outputs per input (float32): conv 16*64 + relu 16*64 + pool 16 + flatten 16 + fc 4
    per_input = 4 * (16 * 64 * 2 + 16 + 16 + 4)
    assert auto_batch_size(net, x, budget_bytes=per_input * 37, cap=256) == 32
    assert auto_batch_size(net, x, budget_bytes=per_input * 32, cap=256) == 32
    assert auto_batch_size(net, x, budget_bytes=per_input * 31, cap=256) == 16
    assert auto_batch_size(net, x, budget_bytes=per_input * 1000, cap=100) == 64
    assert auto_batch_size(net, x, budget_bytes=per_input // 2, cap=256) == 1
    wide = _net(64)  # four times the activations: a quarter of the batch
    assert auto_batch_size(wide, x, budget_bytes=per_input * 37, cap=256) == 8


def test_automatic_and_explicit_batch_sizes_give_the_same_maps() -> None:
    net = _net(8)
    x = torch.randn(5, 3, 8, 8)
    t = torch.tensor([0, 1, 2, 3, 0])
    seeds = torch.arange(5, dtype=torch.int64)
    for name, params in (("integrated_gradients", {"steps": 7}), ("rise", {"masks": 40, "grid": 2}),
                         ("saliency", {})):
        exp = get_explainer(name)(net, **params)
        auto = exp.attribute(x, t, seeds=seeds)
        assert exp.batch_size == auto_batch_size(net, x)
        for size in (1, 3, 64):
            torch.testing.assert_close(exp.attribute(x, t, batch_size=size, seeds=seeds), auto,
                                       rtol=1e-5, atol=1e-6)
