"""Neuron selection: planted signals are found, silent channels are not selected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attriflow.analysis.neurons import LayerStats, overlap, perturb, select_top_k
from attriflow.tasks.neurons import conv_activation_layers, score_image


class Planted(nn.Module):
    """1x1 conv with hand-set channels; the class-0 logit is channel 1's mean.

    channel 0: relu(x_R + 2)        independent of the output
    channel 1: relu(x_G + 2)        copied into the logit
    channel 2: 1.0 constant         most precise
    channel 3: 0.05 constant        constant but below the activity threshold
    channel 4: 0 (dead)
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        w = torch.zeros(5, 3, 1, 1, dtype=torch.float64)
        w[0, 0] = 1.0
        w[1, 1] = 1.0
        self.conv.weight = nn.Parameter(w, requires_grad=False)
        self.conv.bias = nn.Parameter(torch.tensor([2.0, 2.0, 1.0, 0.05, -1.0], dtype=torch.float64),
                                      requires_grad=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.conv(x))
        z = 3.0 * a[:, 1].mean(dim=(1, 2))
        return torch.stack([z, torch.zeros_like(z)], dim=1)


@pytest.mark.parametrize("mode", ["growing", "constant"])
def test_planted_channel_ranks_first_and_silent_ones_are_excluded(mode) -> None:
    model = Planted().eval()
    image = torch.ones(3, 2, 2, dtype=torch.float64)
    scores = score_image(model, ["relu"], image, 0, copies=200, noise=0.005 if mode == "growing" else 0.5,
                         mode=mode, min_activation=0.1, batch_size=64,
                         generator=torch.Generator().manual_seed(0))
    corr, prec = scores.correlation["relu"], scores.precision["relu"]
    assert np.argmax(np.nan_to_num(corr, nan=-1)) == 1
    assert corr[1] > 0.3 and corr[0] < 0.2
    assert np.isnan(corr[2:]).all()  # constant channels: no varying position
    assert np.isposinf(prec[2])  # constant and active: the most precise
    assert np.isnan(prec[3]) and np.isnan(prec[4])  # under the activity threshold / dead
    assert select_top_k(prec, 1).tolist() == [False, False, True, False, False]
    for metric in (corr, prec):
        assert not select_top_k(metric, 5)[4], "a dead channel is never selected"


def test_scores_do_not_depend_on_batch_size() -> None:
    model = Planted().eval()
    image = torch.rand(3, 4, 4, dtype=torch.float64) + 0.5
    a = score_image(model, ["relu"], image, 0, copies=30, noise=0.1, mode="growing", min_activation=0.1,
                    batch_size=7, generator=torch.Generator().manual_seed(3))
    b = score_image(model, ["relu"], image, 0, copies=30, noise=0.1, mode="growing", min_activation=0.1,
                    batch_size=30, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(a.correlation["relu"], b.correlation["relu"], rtol=1e-10)
    np.testing.assert_allclose(a.precision["relu"], b.precision["relu"], rtol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_sums_equal_a_float64_two_pass_reference(channels_last) -> None:
    """The blocked one-pass sums (several column blocks, two batches) equal float64 sums of
    the deviations from copy 0, in either memory layout; unchanged positions sum to exact 0."""
    g = torch.Generator().manual_seed(0)
    acts = torch.rand((70, 8, 32, 32), generator=g) * 3 + 1  # 8,192 positions: two blocks of 50 rows
    acts[:, 2, :5] = acts[0, 2, :5]  # positions no perturbation reaches
    y = torch.randn(70, generator=g, dtype=torch.float64)
    if channels_last:
        acts = acts.contiguous(memory_format=torch.channels_last)
    stats = LayerStats.start(acts[0])
    stats.add(acts[:50], y[:50] - y[0])
    stats.add(acts[50:], y[50:] - y[0])
    dev = acts.double() - acts[0].double()
    yy = (y - y[0]).view(-1, 1, 1, 1)
    for got, want in ((stats.sum_a, dev.sum(0)), (stats.sum_a2, (dev * dev).sum(0)),
                      (stats.sum_ay, (dev * yy).sum(0))):
        assert got.shape == (8, 32, 32) and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert (stats.sum_a[2, :5] == 0).all() and (stats.sum_a2[2, :5] == 0).all()


def test_growing_noise_keeps_copy_zero_and_grows() -> None:
    x = torch.ones(3, 8, 8, dtype=torch.float64)
    copies = perturb(x, torch.arange(5), 0.1, "growing", torch.Generator().manual_seed(0))
    assert torch.equal(copies[0], x)
    spread = [float((copies[i] - x).std()) for i in range(1, 5)]
    assert spread == sorted(spread) and 0.05 < spread[0] < 0.2


def test_overlap_formulas() -> None:
    a = np.array([1, 1, 1, 0, 0], bool)
    b = np.array([0, 1, 1, 1, 0], bool)
    assert overlap(a, b) == (2 / 6, 2 / 4)
    assert overlap(a, a) == (0.5, 1.0)


def test_neuron_layers_of_the_reference_cnn() -> None:
    from attriflow.data.reference_cnn import ReferenceCNN

    layers = conv_activation_layers(ReferenceCNN().eval(), torch.zeros(1, 3, 64, 64))
    assert layers == [f"block{b}.{i}" for b in range(1, 5) for i in (2, 5)]


def test_shared_relu_calls_are_told_apart() -> None:
    """torchvision ResNet blocks call one ReLU twice; each call is its own neuron layer."""
    import torchvision

    from attriflow.explainers._hooks import capture_outputs

    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.rand(1, 3, 64, 64)
    layers = conv_activation_layers(net, x)
    assert layers[:3] == ["relu", "layer1.0.relu#0", "layer1.0.relu#1"]
    with capture_outputs(net, ["layer1.0.relu#0", "layer1.0.relu#1", "layer1.0.bn1"]) as acts, torch.no_grad():
        net(x)
    assert torch.equal(acts["layer1.0.relu#0"], torch.relu(acts["layer1.0.bn1"]))
    assert not torch.equal(acts["layer1.0.relu#0"], acts["layer1.0.relu#1"])
