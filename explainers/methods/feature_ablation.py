"""Feature ablation over superpixels (Captum's ``FeatureAblation`` with a feature mask)."""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import Tensor

from attriflow.explainers._scores import ScoreKind
from attriflow.explainers._segments import SuperpixelParams, coalition_scores, paint, superpixels
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register


class FeatureAblationParams(SuperpixelParams):
    """Parameters of :class:`FeatureAblation`."""

    score: ScoreKind = "logit"


@register
class FeatureAblation(Explainer):
    """Drop of the target score when one superpixel at a time is set to ``baseline``.

    Every pixel of superpixel ``i`` gets ``f(x) - f(x with superpixel i at the baseline)``,
    which is Captum's ``FeatureAblation(model).attribute(x, target, baselines=baseline,
    feature_mask=labels)`` on any one channel (Captum repeats the value over the channels;
    the test compares the two). The superpixels come from ``segmentation`` (SLIC by
    default, see :mod:`explainers._segments`). The ablated copies of all images are packed
    into forward passes of ``batch_size``; Captum evaluates one per forward by default.

    Returns float32 maps of shape (N, H, W), constant on each superpixel.
    """

    spec = ExplainerSpec(
        name="feature_ablation",
        family=Family.SHAPLEY,
        access=("forward",),
        batches_evaluations=True,
        summary="score drop when one superpixel at a time is set to the baseline",
        references=("captum",),
        needs_internals=False,
    )
    Params = FeatureAblationParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": "1 + superpixels", "backward": 0}

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        labels, counts = superpixels(inputs, self.p, self.normalization)
        # coalition 0 shows the whole image, coalition 1 + i hides superpixel i
        def coalitions(i: int, jobs: Tensor) -> Tensor:
            return jobs[:, None] - 1 != torch.arange(counts[i])  # job 0: nothing hidden

        scores, _ = coalition_scores(self.model, inputs, targets, labels, [1 + k for k in counts], coalitions,
                                     self.p.baseline, self.batch_size, self.p.score)
        self.last_forward_passes = torch.tensor([1 + k for k in counts], dtype=torch.int64)
        return paint([y[0] - y[1:] for y in scores], labels)
