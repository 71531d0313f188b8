"""Neuron-selection driver: the model-facing half of ``analysis.neurons``.

Finds the neurons (channels of every convolution, after its activation), runs the
perturbed copies of an image through the model in batches and reduces the activations to
streaming sums on the fly, so memory does not grow with the number of copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from attriflow.analysis.neurons import (
    LayerStats,
    Mode,
    OutputStats,
    correlation_scores,
    perturb,
    precision_scores,
)
from attriflow.explainers._hooks import capture_outputs, get_layer, trace

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh)


def conv_activation_layers(model: nn.Module, example: Tensor) -> list[str]:
    """For every ``nn.Conv2d`` (in forward order), the module whose output is that
    convolution's activation: the first activation module reading the convolution's output
    (through BatchNorm), or the convolution itself when none follows.

    A module called several times per forward pass (the shared ReLU of a torchvision ResNet
    block) is named with its call index, ``"layer1.0.relu#0"`` (see ``capture_outputs``).
    """
    calls = trace(model, example)
    counts: dict[str, int] = {}
    label: dict[int, str] = {}  # position in the trace -> "name" or "name#k"
    for pos, c in enumerate(calls):
        label[pos] = f"{c.name}#{counts.get(c.name, 0)}"
        counts[c.name] = counts.get(c.name, 0) + 1
    for pos, c in enumerate(calls):
        if counts[c.name] == 1:
            label[pos] = c.name
    reader: dict[int, list[int]] = {}
    for pos, c in enumerate(calls):
        if c.input is not None:
            reader.setdefault(id(c.input), []).append(pos)
    layers: list[str] = []
    for pos, c in enumerate(calls):
        if not isinstance(c.module, nn.Conv2d) or label[pos] in layers:
            continue
        chosen, current = label[pos], c
        for _ in range(2):  # conv -> (BatchNorm) -> activation
            nxt = reader.get(id(current.output), [])
            if not nxt:
                break
            step = calls[nxt[0]]
            if isinstance(step.module, _ACTIVATIONS):
                chosen = label[nxt[0]]
                break
            if isinstance(step.module, nn.BatchNorm2d):
                chosen, current = label[nxt[0]], step
                continue
            break
        layers.append(chosen)
    return layers


def check_layers(model: nn.Module, names: list[str]) -> None:
    """Fail with the valid names when a configured layer does not exist."""
    for name in names:
        get_layer(model, name)


@dataclass(frozen=True)
class NeuronScores:
    """Scores of one image: per layer, per channel."""

    correlation: dict[str, np.ndarray]
    precision: dict[str, np.ndarray]


def score_image(model: nn.Module, layers: list[str], image: Tensor, target: int, *, copies: int,
                noise: float, mode: Mode, min_activation: float, batch_size: int,
                generator: torch.Generator) -> NeuronScores:
    """Both metrics for every channel of ``layers`` on one (normalised) image.

    The output signal is the softmax probability of ``target`` (the class predicted on the
    clean image) over the perturbed copies.
    """
    stats: dict[str, LayerStats] = {}
    out = OutputStats()
    with capture_outputs(model, layers) as current, torch.inference_mode():
        for start in range(0, copies, batch_size):
            idx = torch.arange(start, min(start + batch_size, copies))
            batch = perturb(image, idx, noise, mode, generator)
            y = torch.softmax(model(batch).float(), dim=1)[:, target]
            y_shifted = out.add(y)
            for name in layers:
                a = current[name]
                if name not in stats:  # shifted by copy 0's activation (the clean image)
                    stats[name] = LayerStats.start(a[0])
                stats[name].add(a, y_shifted)
    return NeuronScores(
        {n: correlation_scores(stats[n], out) for n in layers},
        {n: precision_scores(stats[n], out.n, min_activation) for n in layers},
    )
