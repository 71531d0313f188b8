"""Shapley value sampling over superpixels (Castro et al. 2009; Captum's
``ShapleyValueSampling`` with a feature mask)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from attriflow.explainers._scores import ScoreKind
from attriflow.explainers._segments import SuperpixelParams, coalition_scores, paint, superpixels
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register


class ShapleySamplingParams(SuperpixelParams):
    """Parameters of :class:`ShapleySampling`."""

    samples: int = Field(25, ge=1, le=100_000, description="random orders of the superpixels (n_samples)")
    score: ScoreKind = "logit"


@register
class ShapleySampling(Explainer):
    """Monte-Carlo Shapley values of the superpixels: the mean, over random orders, of the
    target score's gain when a superpixel joins the ones before it.

    For each of ``samples`` permutations of the image's superpixels, starting from the
    input with every superpixel at ``baseline``, the superpixels are switched to the image
    one by one in that order; superpixel ``i`` is credited with the score's change at its
    step. Every pixel of it gets the mean over permutations: an unbiased estimate of its
    Shapley value, whose sum over superpixels is exactly ``f(x) - f(baseline)`` for each
    permutation. The permutations are ``torch.randperm(F, generator=g)`` from the image's
    own generator, in order; seeding Captum's global generator with the same seed gives
    the same permutations, and the test compares the two maps (Captum repeats the value over
    the channels). Every evaluation of all images is packed into forward passes of
    ``batch_size``; Captum's default evaluates one permutation step per forward.

    Returns float32 maps of shape (N, H, W), constant on each superpixel.

    References
    ----------
    J. Castro, D. Gomez, J. Tejada, "Polynomial calculation of the Shapley value based on
    sampling", Computers & Operations Research 36(5), 2009.
    """

    spec = ExplainerSpec(
        name="shapley_sampling",
        family=Family.SHAPLEY,
        access=("forward",),
        stochastic=True,
        batches_evaluations=True,
        summary="Shapley values of superpixels, sampled over random orders",
        references=("castro2009", "captum"),
        needs_internals=False,
    )
    Params = ShapleySamplingParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": f"1 + {params.samples} x superpixels", "backward": 0}  # type: ignore[attr-defined]

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        s = self.p.samples
        labels, counts = superpixels(inputs, self.p, self.normalization)
        gens = generators or [torch.Generator().manual_seed(0) for _ in inputs]
        ranks = []
        for k, g in zip(counts, gens):
            perms = torch.stack([torch.randperm(k, generator=g) for _ in range(s)])
            rank = torch.empty_like(perms).scatter_(1, perms, torch.arange(k).expand(s, k))  # feature -> step
            ranks.append(rank)

        def coalitions(i: int, jobs: Tensor) -> Tensor:
            # job 0 hides everything; job 1 + p * k + t shows permutation p's features up to step t
            k = counts[i]
            perm, step = (jobs - 1).clamp_min(0) // k, (jobs - 1).clamp_min(0) % k
            return (ranks[i][perm] <= step[:, None]) & (jobs[:, None] > 0)

        scores, _ = coalition_scores(self.model, inputs, targets, labels, [1 + s * k for k in counts],
                                     coalitions, self.p.baseline, self.batch_size, self.p.score)
        values = []
        for y, k, rank in zip(scores, counts, ranks):
            curve = y[1:].view(s, k)
            gain = curve - torch.cat([y[0].expand(s, 1), curve[:, :-1]], 1)  # (permutation, step)
            values.append(gain.gather(1, rank.to(gain.device)).mean(0))  # per feature: its gain, averaged
        self.last_forward_passes = torch.tensor([1 + s * k for k in counts], dtype=torch.int64)
        return paint(values, labels)
