"""RISE, randomized input sampling (Petsiuk et al. 2018)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attriflow.explainers._batching import iter_jobs
from attriflow.explainers._numerics import SerialStream
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register


class RISEParams(BaseModel):
    """Parameters of :class:`RISE`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    masks: int = Field(4000, ge=1, le=1_000_000)
    grid: int = Field(7, ge=1)
    keep: float = Field(0.5, gt=0.0, le=1.0)
    score: ScoreKind = "prob"


@register
class RISE(Explainer):
    """Expected score of randomly masked inputs, per pixel: ``sum_i s_i M_i / (N p)``.

    Masks follow the paper: a ``grid x grid`` Bernoulli(``keep``) grid, bilinearly
    upsampled to ``(grid + 1) * cell`` and cropped at a random shift below one cell. Each
    image draws its own masks from its own generator (seeded from run seed, sample id and
    method), so a map does not depend on its batch. The draws are streamed
    (:class:`explainers._numerics.SerialStream`: the values of one ``(masks, grid, grid)``
    draw, then the shifts), and masks are drawn, upsampled and applied ``batch_size`` at a
    time, so memory does not grow with ``masks``.

    References
    ----------
    V. Petsiuk, A. Das, K. Saenko, "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018.
    """

    spec = ExplainerSpec(
        name="rise",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.PERTURBATION,
        access=("forward",),
        stochastic=True,
        batches_evaluations=True,
        summary="score-weighted average of random smooth masks",
        references=("petsiuk2018",),
        needs_internals=False,
    )
    Params = RISEParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": params.masks, "backward": 0}  # type: ignore[attr-defined]

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        assert generators is not None
        n, _, h, w = inputs.shape
        s, m = self.p.grid, self.p.masks
        cell_h, cell_w = math.ceil(h / s), math.ceil(w / s)
        keep = self.p.keep
        grids, shifts_y, shifts_x = [], [], []
        for g in generators:  # one image's draws, in the order of rand((M, s, s)), randint x 2
            grids.append(SerialStream(g, m, lambda k, gen: torch.rand((k, s, s), generator=gen) < keep))
            shifts_y.append(SerialStream(g, m, lambda k, gen: torch.randint(0, cell_h, (k,), generator=gen)))
            shifts_x.append(SerialStream(g, m, lambda k, gen: torch.randint(0, cell_w, (k,), generator=gen)))
        up_h, up_w = (s + 1) * cell_h, (s + 1) * cell_w
        total = torch.zeros((n, h, w), dtype=torch.float64, device=inputs.device)
        rows = torch.arange(h, device=inputs.device)
        cols = torch.arange(w, device=inputs.device)
        with torch.no_grad():
            for img, _ in iter_jobs(n, m, self.batch_size):
                parts = [(int(i), int(c)) for i, c in zip(*torch.unique_consecutive(img, return_counts=True))]
                grid = torch.cat([grids[i].take(c) for i, c in parts]).to(inputs.device)
                shift = torch.stack([torch.cat([shifts_y[i].take(c) for i, c in parts]),
                                     torch.cat([shifts_x[i].take(c) for i, c in parts])], 1).to(inputs.device)
                img = img.to(inputs.device)
                big = F.interpolate(grid[:, None].to(inputs.dtype), size=(up_h, up_w),
                                    mode="bilinear", align_corners=False)[:, 0]
                ry = (shift[:, 0][:, None] + rows[None])  # (B, h)
                rx = (shift[:, 1][:, None] + cols[None])  # (B, w)
                rows_b = torch.arange(len(img), device=inputs.device)[:, None, None]
                masks = big[rows_b, ry[:, :, None], rx[:, None, :]]
                scores = target_scores(self.model(inputs[img] * masks[:, None]), targets[img], self.p.score)
                total.index_add_(0, img, masks.to(torch.float64) * scores.to(torch.float64).view(-1, 1, 1))
        return total / (m * self.p.keep)
