"""Occlusion (Zeiler & Fergus 2014)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attriflow.explainers._batching import iter_jobs
from attriflow.explainers._numerics import working_dtype
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers.base import Explainer, ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.registry import register


class OcclusionParams(BaseModel):
    """Parameters of :class:`Occlusion`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    window: int = Field(8, ge=1)
    stride: int | None = Field(None, ge=1)
    baseline: float = 0.0
    score: ScoreKind = "logit"


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: ``ceil((size - window) / stride) + 1`` of them, the
    last one clipped at the border (Captum's placement, so every pixel is covered)."""
    if window > size:
        raise ValueError(f"occlusion window {window} is larger than the image side {size}")
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


@register
class Occlusion(Explainer):
    """Drop of the target score when a square window of all channels is set to ``baseline``.

    Each pixel gets the mean drop over the windows covering it. ``stride`` defaults to half
    the window. Windows of all images are packed into forward passes of ``batch_size``.

    References
    ----------
    M. D. Zeiler, R. Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014.
    """

    spec = ExplainerSpec(
        name="occlusion",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.PERTURBATION,
        access=("forward",),
        batches_evaluations=True,
        summary="score drop when a sliding window is occluded",
        references=("zeiler2014",),
        needs_internals=False,
    )
    Params = OcclusionParams

    def refuse(self, example: Tensor) -> None:
        """A window larger than the image cannot slide over it: refused before any work,
        naming the parameter."""
        side = min(int(example.shape[-2]), int(example.shape[-1]))
        if self.p.window > side:
            raise UnsupportedModelError(
                f"params.window: the occlusion window ({self.p.window} pixels) is larger than the "
                f"image ({int(example.shape[-2])}x{int(example.shape[-1])}); use a window of at most {side}")

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": "1 + windows(H) x windows(W)", "backward": 0}

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        n, _, h, w = inputs.shape
        k, s = self.p.window, self.p.stride or max(1, self.p.window // 2)
        starts = [(y, x) for y in window_starts(h, k, s) for x in window_starts(w, k, s)]
        wy = torch.tensor([p[0] for p in starts], device=inputs.device)
        wx = torch.tensor([p[1] for p in starts], device=inputs.device)
        ys = torch.arange(h, device=inputs.device)
        xs = torch.arange(w, device=inputs.device)
        with torch.no_grad():
            base = target_scores(self.model(inputs), targets, self.p.score)
            work = working_dtype(inputs.dtype)  # float32 sums for float16 inputs
            total = torch.zeros((n, h, w), dtype=work, device=inputs.device)
            count = torch.zeros_like(total)
            for img, win in iter_jobs(n, len(starts), self.batch_size, inputs.device):
                inside = (((ys[None] >= wy[win, None]) & (ys[None] < wy[win, None] + k))[:, :, None]
                          & ((xs[None] >= wx[win, None]) & (xs[None] < wx[win, None] + k))[:, None, :])
                x = torch.where(inside[:, None], torch.full_like(inputs[img], self.p.baseline), inputs[img])
                drop = base[img] - target_scores(self.model(x), targets[img], self.p.score)
                m = inside.to(work)
                total.index_add_(0, img, m * drop.view(-1, 1, 1).to(work))
                count.index_add_(0, img, m)
        self.last_forward_passes = torch.full((n,), 1 + len(starts), dtype=torch.int64)
        return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
