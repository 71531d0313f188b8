"""Shapley value sampling over superpixels (Castro et al. 2009; Captum's
``ShapleyValueSampling`` with a feature mask)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from attriflow.explainers._batching import iter_ragged_jobs
from attriflow.explainers._numerics import working_dtype
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers._segments import SuperpixelParams, coalition_inputs, segment
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register


class ShapleySamplingParams(SuperpixelParams):
    """Parameters of :class:`ShapleySampling`."""

    samples: int = Field(25, ge=1, description="random permutations of the superpixels (Captum's n_samples)")
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
        dev, s = inputs.device, self.p.samples
        labels = [lab.to(dev) for lab in segment(inputs, self.p, self.normalization)]
        counts = [int(lab.max()) + 1 for lab in labels]
        gens = generators or [torch.Generator().manual_seed(0) for _ in inputs]
        # rank[i][p, f]: the step at which feature f joins in permutation p of image i
        rank = []
        for k, g in zip(counts, gens):
            perms = torch.stack([torch.randperm(k, generator=g) for _ in range(s)])
            rank.append(torch.empty_like(perms).scatter_(1, perms, torch.arange(k).expand(s, k)).to(dev))
        work = working_dtype(inputs.dtype)
        scores = [torch.zeros(s * k, dtype=work, device=dev) for k in counts]  # (permutation, step)
        stacked = torch.stack(labels)
        width = max(counts)
        with torch.no_grad():
            empty = torch.full_like(inputs, self.p.baseline)
            start = torch.cat([target_scores(self.model(empty[i:i + self.batch_size]),
                                             targets[i:i + self.batch_size], self.p.score)
                               for i in range(0, len(inputs), self.batch_size)]).to(work)
            for img, job in iter_ragged_jobs([s * k for k in counts], self.batch_size, dev):
                keep = torch.zeros((len(img), width), dtype=torch.bool, device=dev)
                for i in img.unique().tolist():
                    sel = img == i
                    k = counts[i]
                    perm, step = job[sel] // k, job[sel] % k
                    keep[sel, :k] = rank[i][perm] <= step[:, None]
                x = coalition_inputs(inputs[img], stacked[img], keep, self.p.baseline)
                y = target_scores(self.model(x), targets[img], self.p.score).to(work)
                for i in img.unique().tolist():
                    sel = img == i
                    scores[i][job[sel]] = y[sel]
        maps = []
        for i, (k, lab) in enumerate(zip(counts, labels)):
            curve = scores[i].view(s, k)
            gain = curve - torch.cat([start[i].expand(s, 1), curve[:, :-1]], 1)  # (permutation, step)
            phi = gain.gather(1, rank[i]).mean(0)  # per feature: its step's gain, averaged
            maps.append(phi[lab])
        self.last_forward_passes = torch.tensor([1 + s * k for k in counts], dtype=torch.int64)
        return torch.stack(maps).to(torch.float32)
