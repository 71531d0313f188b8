"""Neuron selection by input resampling (Lengerich et al. 2017; seed-neuron-selection.md).

Pure numerics: perturbed copies of an image, streaming statistics of channel activations
across the copies, the two selection metrics, top-k selection and the overlap of the two
selected sets. The pipeline's neuron stage feeds activations in batch by batch, so memory
holds one layer's (channels x positions) sums per image, never the copies' activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Mode = Literal["growing", "constant", "masking"]


def perturb(image: Tensor, copies: Tensor, noise: float, mode: Mode, generator: torch.Generator) -> Tensor:
    """Perturbed copies ``copies`` (indices) of one image, shape (len(copies), C, H, W).

    ``growing`` (the reference code): ``x * (1 + i * eps)``, eps ~ N(0, noise^2) per pixel and
    channel, so copy 0 is the image and the noise grows with the copy index; ``constant``:
    ``x * (1 + eps)`` for every copy but the first; ``masking``: each pixel (all channels)
    of copies after the first is zeroed with probability ``noise``. Draws for copy ``i``
    come from ``generator`` in copy order, so pass copies in increasing order.
    """
    c, h, w = image.shape
    out = []
    for i in copies.tolist():
        if mode == "masking":
            keep = (torch.rand((1, h, w), generator=generator, dtype=torch.float64) >= noise) if i else \
                torch.ones((1, h, w), dtype=torch.bool)
            out.append(image * keep.to(image))
            continue
        eps = torch.randn((c, h, w), generator=generator, dtype=torch.float64).to(image) * noise
        scale = i if mode == "growing" else float(i > 0)
        out.append(image * (1 + scale * eps))
    return torch.stack(out)


@dataclass
class LayerStats:
    """Running sums over copies for one image and one layer (float64)."""

    sum_a: Tensor
    sum_a2: Tensor
    sum_ay: Tensor

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> LayerStats:
        """Empty sums for activations of shape (C, h, w)."""
        z = torch.zeros(shape, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone())

    def add(self, acts: Tensor, y: Tensor) -> None:
        """Add a batch: activations (B, C, h, w) and outputs (B,)."""
        a = acts.detach().to(torch.float64).cpu()
        yy = y.detach().to(torch.float64).cpu().view(-1, 1, 1, 1)
        self.sum_a += a.sum(0)
        self.sum_a2 += (a * a).sum(0)
        self.sum_ay += (a * yy).sum(0)


@dataclass
class OutputStats:
    """Running sums of the output signal over copies."""

    n: int = 0
    sum_y: float = 0.0
    sum_y2: float = 0.0
    values: list[float] = field(default_factory=list)

    def add(self, y: Tensor) -> None:
        """Add a batch of outputs (B,)."""
        v = y.detach().to(torch.float64).cpu()
        self.n += len(v)
        self.sum_y += float(v.sum())
        self.sum_y2 += float((v * v).sum())


def correlation_scores(stats: LayerStats, out: OutputStats) -> np.ndarray:
    """Per channel: mean over positions of |Pearson r| between activation and output.

    Positions whose activation is constant across the copies are ignored; a channel with
    no varying position (or a constant output) scores NaN and is never selected.
    """
    n = out.n
    cov = n * stats.sum_ay - stats.sum_a * out.sum_y
    var_a = n * stats.sum_a2 - stats.sum_a**2
    var_y = n * out.sum_y2 - out.sum_y**2
    scale = stats.sum_a2.abs().clamp_min(1e-300) * n
    varying = var_a > 1e-12 * scale  # relative tolerance against rounding in the sums
    r = torch.where(varying, cov / torch.sqrt(var_a.clamp_min(1e-300) * max(var_y, 1e-300)),
                    torch.full_like(cov, float("nan")))
    if var_y <= 0:
        r = torch.full_like(cov, float("nan"))
    flat = r.abs().flatten(1).numpy()
    counts = np.isfinite(flat).sum(axis=1)
    sums = np.where(np.isfinite(flat), flat, 0.0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def precision_scores(stats: LayerStats, n: int, min_activation: float = 0.1) -> np.ndarray:
    """Per channel: 1 / (spatial mean of the variance across copies); channels whose mean
    activation is below ``min_activation`` score NaN (excluded), a constant active channel
    scores +inf (the most precise)."""
    mean = stats.sum_a / n
    var = (stats.sum_a2 / n - mean**2).clamp_min(0)
    spatial_var = var.flatten(1).mean(1).numpy()
    with np.errstate(divide="ignore"):
        score = 1.0 / spatial_var
    score[mean.flatten(1).mean(1).numpy() < min_activation] = np.nan
    return score


def select_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` highest finite-or-infinite scores (NaN never selected; ties
    keep the lower channel index)."""
    valid = ~np.isnan(scores)
    order = np.argsort(-np.where(valid, scores, -np.inf), kind="stable")
    chosen = [i for i in order if valid[i]][:k]
    mask = np.zeros(len(scores), dtype=bool)
    mask[chosen] = True
    return mask


def overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Overlap of two selections: the reference code's |A and B| / (|A| + |B|) (at most 0.5)
    and the true Jaccard index |A and B| / |A or B|; NaN when both are empty."""
    inter, total, union = int((a & b).sum()), int(a.sum() + b.sum()), int((a | b).sum())
    return (inter / total if total else float("nan"), inter / union if union else float("nan"))
