"""Kernel SHAP over superpixels (Lundberg & Lee 2017; Captum's ``KernelShap``)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from attriflow.explainers._scores import ScoreKind
from attriflow.explainers._segments import SuperpixelParams, coalition_scores, paint, superpixels
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.methods.lime import fit_linear, warn_underdetermined
from attriflow.explainers.registry import register

#: Weight of the empty and the full coalition (Captum's ``inf_weight``): the fit all but
#: passes through f(baseline) and f(x), so the values sum to their difference.
FULL_WEIGHT = 1e6


class KernelShapParams(SuperpixelParams):
    """Parameters of :class:`KernelShap`."""

    samples: int = Field(1000, ge=3, le=1_000_000, description="coalitions per image, with full and empty")
    score: ScoreKind = "logit"


@register
class KernelShap(Explainer):
    """Shapley values of the superpixels estimated by a weighted linear regression on random
    coalitions (LIME with the Shapley kernel).

    Coalition 1 shows every superpixel, coalition 2 none (both weighted
    :data:`FULL_WEIGHT`); each further one draws its size ``k`` in ``1 .. F - 1`` with
    probability proportional to ``(F - 1) / (k (F - k))`` (``torch.multinomial``) and keeps
    the ``k`` superpixels with the largest of ``F`` standard normal draws (weight 1), all
    from the image's generator. Sampling coalitions by the Shapley kernel and weighting them
    equally is the Kernel SHAP estimator (Lundberg & Lee 2017, theorem 2). The surrogate is
    scikit-learn's ``LinearRegression`` with those sample weights; every pixel of superpixel
    ``i`` gets its coefficient. This is Captum's ``KernelShap(model).attribute(x, target,
    baselines=baseline, feature_mask=labels, n_samples=samples)``: seeding Captum's global
    generator as the image's gives the same coalitions, and the test compares the maps.
    The coalitions of all images are packed into passes of ``batch_size``.

    Returns float32 maps of shape (N, H, W), constant on each superpixel.

    References
    ----------
    S. M. Lundberg, S.-I. Lee, "A Unified Approach to Interpreting Model Predictions",
    NeurIPS 2017.
    """

    spec = ExplainerSpec(
        name="kernel_shap",
        family=Family.SHAPLEY,
        access=("forward",),
        stochastic=True,
        batches_evaluations=True,
        summary="Shapley values of superpixels by a Shapley-kernel weighted regression",
        references=("lundberg2017", "captum"),
        needs_internals=False,
    )
    Params = KernelShapParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": params.samples, "backward": 0}  # type: ignore[attr-defined]

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        labels, counts = superpixels(inputs, self.p, self.normalization)
        gens = generators or [torch.Generator().manual_seed(0) for _ in inputs]
        keep, weights = [], []
        for k, g in zip(counts, gens):
            size = torch.arange(k, dtype=torch.float32)
            probs = torch.tensor(k - 1, dtype=torch.float32) / (size * (k - size))
            probs[0] = 0.0
            rows = [torch.ones((1, k), dtype=torch.bool), torch.zeros((1, k), dtype=torch.bool)]
            for _ in range(self.p.samples - 2):
                if k == 1:  # one superpixel: no coalition between the empty and the full one
                    rows.append(torch.zeros((1, k), dtype=torch.bool))
                    continue
                chosen = int(torch.multinomial((probs / probs.sum())[None], 1, True, generator=g))
                draws = torch.randn((1, k), generator=g)
                rows.append(draws > torch.kthvalue(draws, k - chosen).values.item())
            keep.append(torch.cat(rows))
            w = torch.ones(self.p.samples, dtype=torch.float64)
            w[:2] = FULL_WEIGHT
            weights.append(w)
        warn_underdetermined(self.spec.name, self.p.samples, counts)
        scores, _ = coalition_scores(self.model, inputs, targets, labels, [len(z) for z in keep],
                                     lambda i, jobs: keep[i][jobs], self.p.baseline, self.batch_size,
                                     self.p.score)
        values = [fit_linear(z, y, w, 0.0) for z, y, w in zip(keep, scores, weights)]
        self.last_forward_passes = torch.full((len(inputs),), self.p.samples, dtype=torch.int64)
        return paint(values, labels)
