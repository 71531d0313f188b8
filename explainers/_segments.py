"""Superpixel features of an image for the Shapley and surrogate explainers.

A feature is a set of pixels (all channels) switched between the image and the baseline
together. ``slic`` segments the image with scikit-image's SLIC (Achanta et al. 2012), the
segmentation LIME's authors use for images; ``grid`` cuts it into ``round(sqrt(segments))``
rows of ``ceil(segments / rows)`` near-equal cells (at least ``segments`` cells). Both are
deterministic: the same image gives the same features on every run, worker and batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attriflow.explainers._scores import ScoreKind

Segmentation = Literal["slic", "grid"]


class SuperpixelParams(BaseModel):
    """The features and baseline of a superpixel explainer."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    segmentation: Segmentation = "slic"
    segments: int = Field(50, ge=2, le=4096,
                          description="SLIC's target number of superpixels; grid: at least this many cells")
    compactness: float = Field(10.0, gt=0,
                               description="SLIC's colour / space trade-off (Lab; / 100 if not RGB)")
    baseline: float = 0.0


def segment(images: Tensor, params: SuperpixelParams,
            normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> list[Tensor]:
    """Superpixel labels of each image, ``0 .. F_i - 1`` (F_i features of image i).

    Parameters
    ----------
    images : Tensor, shape (N, C, H, W)
        Model inputs.
    params : SuperpixelParams
        ``segmentation``, ``segments`` and ``compactness``.
    normalization : pair of tuples or None
        The model's (mean, std) per channel: SLIC segments the image with it undone and
        clipped to [0, 1] (its colour space is Lab of an RGB image in [0, 1]); without it,
        each image is min-max scaled to [0, 1].

    Returns
    -------
    list of Tensor
        int64 (H, W) labels per image, on the CPU; every label in ``0 .. F_i - 1`` is used.

    Warns
    -----
    UserWarning
        When SLIC finds a single superpixel in an image (its map is then constant).
    """
    n, c, h, w = images.shape
    if params.segmentation == "grid":  # rows x cols >= segments cells, rows = round(sqrt(segments))
        rows = max(1, min(h, round(params.segments ** 0.5)))
        cols = max(1, min(w, -(-params.segments // rows)))
        cell = (torch.arange(h)[:, None] * rows // h) * cols + torch.arange(w)[None, :] * cols // w
        return [cell.clone() for _ in range(n)]
    from skimage.segmentation import slic

    x = images.detach().to(torch.float64).cpu()
    if normalization is not None:
        mean, std = (torch.tensor(v, dtype=x.dtype).view(1, -1, 1, 1) for v in normalization)
        x = (x * std + mean).clamp(0, 1)
    else:
        lo = x.flatten(1).amin(1).view(-1, 1, 1, 1)
        x = (x - lo) / (x.flatten(1).amax(1).view(-1, 1, 1, 1) - lo).clamp_min(1e-12)
    out = []
    for img in x.permute(0, 2, 3, 1).numpy():
        # RGB: SLIC's Lab distances (0-100); other channel counts: their mean in [0, 1], where
        # the same trade-off needs a compactness 100 times smaller
        labels = slic(img if c == 3 else img.mean(-1), n_segments=params.segments,
                      compactness=params.compactness if c == 3 else params.compactness / 100, start_label=0,
                      channel_axis=-1 if c == 3 else None)
        _, dense = np.unique(labels, return_inverse=True)  # consecutive labels
        out.append(torch.from_numpy(dense.reshape(h, w).astype(np.int64)))
    single = [i for i, lab in enumerate(out) if int(lab.max()) == 0]
    if single and params.segments > 1:
        warnings.warn(f"params.segmentation: SLIC found one superpixel in image(s) {single[:8]} of this "
                      "batch, so their maps are constant (texture without colour edges, or noise); use "
                      "segmentation: grid, or a lower compactness", stacklevel=2)
    return out


def superpixels(inputs: Tensor, params: SuperpixelParams,
                normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
                ) -> tuple[list[Tensor], list[int]]:
    """:func:`segment` on the inputs' device: each image's (H, W) labels and its number of
    superpixels F_i."""
    labels = [lab.to(inputs.device) for lab in segment(inputs, params, normalization)]
    return labels, [int(lab.max()) + 1 for lab in labels]


def paint(values: list[Tensor], labels: list[Tensor]) -> Tensor:
    """Maps (N, H, W) float32 holding, at every pixel, its superpixel's value (``values[i]``:
    (F_i,) per image, any dtype or device)."""
    return torch.stack([v.to(lab.device)[lab] for v, lab in zip(values, labels)]).to(torch.float32)


def coalition_inputs(inputs: Tensor, labels: Tensor, keep: Tensor, baseline: float) -> Tensor:
    """Inputs where only the kept features show the image, the rest the baseline.

    Parameters
    ----------
    inputs : Tensor, shape (B, C, H, W)
        The image of each job.
    labels : Tensor, shape (B, H, W)
        Its superpixel labels.
    keep : Tensor, shape (B, F)
        bool, per job, which of the image's features show the image (``F`` at least the
        largest label + 1).
    baseline : float
        The value of the other pixels (in model-input units).
    """
    shown = keep.gather(1, labels.flatten(1)).view(labels.shape)
    return torch.where(shown[:, None], inputs, torch.full_like(inputs, baseline))


#: Per image ``i`` and its coalition indices ``jobs`` (int64, CPU), the coalitions as bool
#: (len(jobs), F_i) rows: which of the image's features each shows.
Coalitions = Callable[[int, Tensor], Tensor]


def coalition_scores(model: torch.nn.Module, inputs: Tensor, targets: Tensor, labels: list[Tensor],
                     counts: list[int], coalitions: Coalitions, baseline: float, batch_size: int,
                     score: ScoreKind, similarity: bool = False) -> tuple[list[Tensor], list[Tensor] | None]:
    """The target score of every coalition of every image, in forward passes of
    ``batch_size`` coalitions (several images' coalitions share a pass). Coalitions are
    built batch by batch (``coalitions``), so memory holds one batch of them, not all.

    Parameters
    ----------
    model : nn.Module
        The classifier.
    inputs : Tensor, shape (N, C, H, W)
        Model inputs.
    targets : Tensor, shape (N,)
        Class indices.
    labels : list of Tensor
        Per image, its (H, W) superpixel labels (:func:`segment`), on the inputs' device.
    counts : list of int
        Per image, its number of coalitions S_i.
    coalitions : callable
        ``coalitions(i, jobs)``: bool (len(jobs), F_i), coalition ``jobs[s]`` of image ``i``
        showing feature f of the image (the other features show ``baseline``).
    baseline : float
        Value of the hidden pixels, in model-input units.
    batch_size : int
        Coalitions per forward pass.
    score : {"logit", "log_prob", "prob"}
        The explained scalar (:func:`explainers._scores.target_scores`).
    similarity : bool
        Also return, per coalition, the cosine similarity of its model input to the image's
        (flattened, float32: Captum's LIME kernel reads it).

    Returns
    -------
    (list of Tensor, list of Tensor or None)
        Per image, the (S_i,) scores in the inputs' working dtype; and the (S_i,) float32
        similarities when asked.
    """
    from attriflow.explainers._batching import iter_ragged_jobs
    from attriflow.explainers._numerics import working_dtype
    from attriflow.explainers._scores import target_scores

    dev = inputs.device
    width = max(int(lab.max()) + 1 for lab in labels)
    first = [0]
    for c in counts:
        first.append(first[-1] + c)
    start = torch.tensor(first[:-1], dtype=torch.int64)
    stacked = torch.stack(labels)
    out = torch.empty(first[-1], dtype=working_dtype(inputs.dtype), device=dev)
    sims = torch.empty(first[-1], dtype=torch.float32, device=dev) if similarity else None
    with torch.no_grad():
        for img, job in iter_ragged_jobs(counts, batch_size):
            keep = torch.zeros((len(img), width), dtype=torch.bool)
            for i in img.unique().tolist():
                sel = img == i
                rows = coalitions(i, job[sel])
                keep[sel, :rows.shape[1]] = rows
            at = (start[img] + job).to(dev)
            x = coalition_inputs(inputs[img.to(dev)], stacked[img.to(dev)], keep.to(dev), baseline)
            out[at] = target_scores(model(x), targets[img.to(dev)], score).to(out.dtype)
            if sims is not None:
                sims[at] = torch.nn.functional.cosine_similarity(
                    inputs[img.to(dev)].flatten(1).float(), x.flatten(1).float(), dim=1, eps=1e-8)
    split = [out[a:b] for a, b in zip(first[:-1], first[1:])]
    return split, ([sims[a:b] for a, b in zip(first[:-1], first[1:])] if sims is not None else None)
