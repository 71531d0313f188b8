"""Feature ablation over superpixels (Captum's ``FeatureAblation`` with a feature mask)."""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import Tensor

from attriflow.explainers._batching import iter_ragged_jobs
from attriflow.explainers._numerics import working_dtype
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers._segments import SuperpixelParams, coalition_inputs, segment
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
        labels = [lab.to(inputs.device) for lab in segment(inputs, self.p, self.normalization)]
        counts = [int(lab.max()) + 1 for lab in labels]
        work = working_dtype(inputs.dtype)
        drops = [torch.zeros(k, dtype=work, device=inputs.device) for k in counts]
        stacked = torch.stack(labels)
        width = max(counts)
        with torch.no_grad():
            full = torch.cat([target_scores(self.model(inputs[i:i + self.batch_size]),
                                            targets[i:i + self.batch_size], self.p.score)
                              for i in range(0, len(inputs), self.batch_size)])
            for img, feat in iter_ragged_jobs(counts, self.batch_size, inputs.device):
                keep = torch.ones((len(img), width), dtype=torch.bool, device=inputs.device)
                keep[torch.arange(len(img), device=inputs.device), feat] = False
                x = coalition_inputs(inputs[img], stacked[img], keep, self.p.baseline)
                drop = full[img] - target_scores(self.model(x), targets[img], self.p.score)
                for i in img.unique().tolist():
                    sel = img == i
                    drops[i][feat[sel]] = drop[sel].to(work)
        self.last_forward_passes = torch.tensor([1 + k for k in counts], dtype=torch.int64)
        return torch.stack([d[lab] for d, lab in zip(drops, labels)]).to(torch.float32)
