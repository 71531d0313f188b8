"""Neuron selection by input resampling (Lengerich et al. 2017; seed-neuron-selection.md).

Pure numerics: perturbed copies of an image, streaming statistics of channel activations
across the copies, the two selection metrics, top-k selection and the overlap of the two
selected sets. The pipeline's neuron stage feeds activations in batch by batch, so memory
holds one layer's (channels x positions) sums per image, never the copies' activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Mode = Literal["growing", "constant", "masking"]

#: Version of the perturbations' random draws; part of the neuron stage's record, so stores
#: scored with other draws are scored again (1: float64 draws; 2: float32 draws, five times
#: cheaper and the same distribution).
NOISE_VERSION = 2


def perturb(image: Tensor, copies: Tensor, noise: float, mode: Mode, generator: torch.Generator) -> Tensor:
    """Perturbed copies ``copies`` (indices) of one image, shape (len(copies), C, H, W).

    ``growing`` (the reference code): ``x * (1 + i * eps)``, eps ~ N(0, noise^2) per pixel and
    channel, so copy 0 is the image and the noise grows with the copy index; ``constant``:
    ``x * (1 + eps)`` for every copy but the first; ``masking``: each pixel (all channels)
    of copies after the first is zeroed with probability ``noise``. Draws for copy ``i``
    come from ``generator`` (on the CPU, float32: :data:`NOISE_VERSION`) in copy order, one
    call per copy, so the stream does not depend on how copies are batched; pass copies in
    increasing order.
    """
    c, h, w = image.shape
    index = copies.tolist()
    if mode == "masking":
        keep = torch.stack([torch.rand((1, h, w), generator=generator, dtype=torch.float32) >= noise if i
                            else torch.ones((1, h, w), dtype=torch.bool) for i in index])
        return image * keep.to(image)
    # one draw per copy, in copy order, then one vectorised pass over the batch
    eps = torch.stack([torch.randn((c, h, w), generator=generator, dtype=torch.float32) for _ in index])
    eps = eps.to(image) * noise
    scale = torch.tensor([i if mode == "growing" else float(i > 0) for i in index], dtype=eps.dtype,
                         device=eps.device)
    return image * (1 + scale.view(-1, 1, 1, 1) * eps)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass
class LayerStats:
    """Running sums over copies for one image and one layer, shifted by the first copy's
    activation ``shift`` (the clean image: copy 0 of every mode).

    Shifting makes the one-pass sums numerically safe without float64 arithmetic on the
    activations: a position that no perturbation changes contributes exact zeros, and the
    variance of one that does is computed from its deviations, not as a difference of two
    large sums (the "shifted data" algorithm; Chan, Golub & LeVeque 1983). Each batch is
    reduced in the activations' precision (float32, float64 for float64 models, on their
    device) by one (2 x B) matrix product (sums of the deviations and of their products
    with the output) and one reduction of the squares; the per-position sums are
    accumulated across batches in float64.
    """

    shift: Tensor  # (C, h, w), compute dtype, the activations' device
    sum_a: Tensor  # float64: sum of (a - shift)
    sum_a2: Tensor  # float64: sum of (a - shift)^2
    sum_ay: Tensor  # float64: sum of (a - shift) * (y - y_shift)

    @classmethod
    def start(cls, first: Tensor) -> LayerStats:
        """Empty sums shifted by ``first``, one copy's activations (C, h, w)."""
        shift = first.detach().to(_compute_dtype(first)).clone()  # not a view of the whole batch
        z = torch.zeros(tuple(first.shape), dtype=torch.float64)
        return cls(shift, z.clone(), z.clone(), z.clone())

    def add(self, acts: Tensor, y_shifted: Tensor) -> None:
        """Add a batch: activations (B, C, h, w) and outputs minus the output shift (B,).

        The batch is read in its own memory order (channels-last activations are not
        copied) and, on the CPU, in column blocks of about 1 MiB, so the shifted block,
        its squares and its products with (1, y) are computed while it is in cache: one
        pass over the activations from memory instead of eight.
        """
        b = acts.shape[0]
        order = sorted(range(1, acts.dim()), key=lambda d: (-acts.stride(d), d))
        x = acts.detach().permute(0, *order)
        if not x.is_contiguous():
            x = x.contiguous()
        x = x.reshape(b, -1).to(self.shift.dtype)
        back = [d - 1 for d in order]
        shift = self.shift.permute(*back).reshape(-1)
        weights = torch.stack([torch.ones(b, dtype=x.dtype, device=x.device),
                               y_shifted.detach().to(device=x.device, dtype=x.dtype)])
        n = x.shape[1]
        s1y = torch.empty((2, n), dtype=x.dtype, device=x.device)
        s2 = torch.empty(n, dtype=x.dtype, device=x.device)
        width = n if x.device.type != "cpu" else max(256, (1 << 18) // max(b, 1))
        buf = torch.empty((b, min(width, n)), dtype=x.dtype, device=x.device)
        for j in range(0, n, width):
            k = min(width, n - j)
            a = torch.sub(x[:, j:j + k], shift[j:j + k], out=buf[:, :k])
            s1y[:, j:j + k] = weights @ a
            torch.sum(a.mul_(a), 0, out=s2[j:j + k])
        shape = [self.sum_a.shape[d - 1] for d in order]  # the permuted (h, w, C) shape
        self.sum_a.permute(*back).add_(s1y[0].view(shape).cpu().double())
        self.sum_ay.permute(*back).add_(s1y[1].view(shape).cpu().double())
        self.sum_a2.permute(*back).add_(s2.view(shape).cpu().double())

    def raw_sum_a2(self, n: int) -> Tensor:
        """Sum of the unshifted squares, float64 (the scale of rounding errors)."""
        k = self.shift.cpu().double()
        return self.sum_a2 + 2 * k * self.sum_a + n * k * k


@dataclass
class OutputStats:
    """Running sums of the output signal over copies, shifted by the first copy's output."""

    n: int = 0
    shift: float | None = None
    sum_y: float = 0.0
    sum_y2: float = 0.0

    def add(self, y: Tensor) -> Tensor:
        """Add a batch of outputs (B,); returns them minus the shift (float64, for
        :meth:`LayerStats.add`)."""
        v = y.detach().to(torch.float64).cpu()
        if self.shift is None:
            self.shift = float(v[0])
        v = v - self.shift
        self.n += len(v)
        self.sum_y += float(v.sum())
        self.sum_y2 += float((v * v).sum())
        return v


def correlation_scores(stats: LayerStats, out: OutputStats) -> np.ndarray:
    """Per channel: mean over positions of |Pearson r| between activation and output.

    Positions whose activation is constant across the copies are ignored; a channel with
    no varying position (or a constant output) scores NaN and is never selected.
    """
    n = out.n
    cov = n * stats.sum_ay - stats.sum_a * out.sum_y
    var_a = n * stats.sum_a2 - stats.sum_a**2
    var_y = n * out.sum_y2 - out.sum_y**2
    if var_y <= 0:
        return np.full(cov.shape[0], np.nan)
    # tolerance against rounding: 1e-12 of the raw squares (the float64 sums), plus the
    # rounding of the per-batch reductions in the activations' precision (a few eps of
    # n * sum of shifted squares); no clamping to tiny constants, whose subnormal products
    # cost a microcode assist per element on x86
    eps = torch.finfo(stats.shift.dtype).eps
    varying = var_a > 1e-12 * (stats.raw_sum_a2(n).abs() * n) + 8 * eps * n * stats.sum_a2
    denom = torch.sqrt(torch.where(varying, var_a, torch.ones_like(var_a)) * var_y)
    r = torch.where(varying, (cov / denom).clamp(-1, 1), torch.full_like(cov, float("nan")))
    flat = r.abs().flatten(1).numpy()
    counts = np.isfinite(flat).sum(axis=1)
    sums = np.where(np.isfinite(flat), flat, 0.0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def precision_scores(stats: LayerStats, n: int, min_activation: float = 0.1) -> np.ndarray:
    """Per channel: 1 / (spatial mean of the variance across copies); channels whose mean
    activation is below ``min_activation`` score NaN (excluded), a constant active channel
    scores +inf (the most precise)."""
    dev = stats.sum_a / n
    mean = stats.shift.cpu().double() + dev
    var = (stats.sum_a2 / n - dev**2).clamp_min(0)
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
