"""LIME over superpixels (Ribeiro et al. 2016; Captum's ``Lime``)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import Tensor

from attriflow.explainers._scores import ScoreKind
from attriflow.explainers._segments import SuperpixelParams, coalition_scores, paint, superpixels
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register


class LimeParams(SuperpixelParams):
    """Parameters of :class:`Lime`."""

    samples: int = Field(1000, ge=2, le=1_000_000, description="random coalitions per image (lime_image's)")
    alpha: float = Field(0.01, ge=0, description="L1 weight of the Lasso surrogate; 0: least squares")
    kernel_width: float = Field(1.0, gt=0, description="width of the exponential kernel on cosine distance")
    score: ScoreKind = "logit"


def fit_linear(z: Tensor, y: Tensor, w: Tensor, alpha: float) -> Tensor:
    """Coefficients (F,) float64 of the weighted linear surrogate of the scores ``y`` (S,) on
    the bool coalitions ``z`` (S, F), with an intercept: scikit-learn's ``Lasso(alpha)``
    (``alpha > 0``) or ``LinearRegression`` (``alpha == 0``), fitted with ``sample_weight=w``
    (S,) on float32 data as Captum's ``SkLearnLasso`` / ``SkLearnLinearRegression`` do."""
    from sklearn.linear_model import Lasso, LinearRegression

    def f32(t: Tensor) -> np.ndarray:
        return t.detach().to(torch.float64).cpu().numpy().astype(np.float32)

    model = Lasso(alpha=alpha) if alpha > 0 else LinearRegression()
    model.fit(f32(z), f32(y), sample_weight=f32(w))
    return torch.from_numpy(np.asarray(model.coef_, dtype=np.float64).reshape(-1))


def warn_underdetermined(name: str, samples: int, counts: list[int]) -> None:
    """Warn when an unpenalised surrogate has fewer coalitions than unknowns (one coefficient
    per superpixel and the intercept): least squares then returns one of infinitely many
    fits, its minimum-norm one, not an estimate."""
    short = [i for i, k in enumerate(counts) if samples <= k]
    if short:
        warnings.warn(f"{name}: params.samples ({samples}) is not more than the superpixels of image(s) "
                      f"{short[:8]} of this batch (up to {max(counts[i] for i in short)}): the regression is "
                      "underdetermined and its values arbitrary; raise params.samples above params.segments",
                      stacklevel=3)


@register
class Lime(Explainer):
    """Coefficients of a sparse linear model fitted, near the image, to the target score of
    random coalitions of its superpixels.

    Each of ``samples`` coalitions keeps every superpixel with probability 1/2 (drawn with
    ``torch.bernoulli`` from the image's generator, one (1, F) draw per coalition) and sets
    the others to ``baseline``; it is weighted by ``exp(-d^2 / (2 kernel_width^2))`` with
    ``d`` the cosine distance between its model input and the image's. The surrogate is
    scikit-learn's ``Lasso(alpha)`` with those sample weights; every pixel of superpixel
    ``i`` gets its coefficient. This is Captum's ``Lime(model).attribute(x, target,
    baselines=baseline, feature_mask=labels, n_samples=samples)`` with its defaults
    (``SkLearnLasso(alpha=0.01)``, the cosine exponential kernel of width 1, Bernoulli
    coalitions): seeding Captum's global generator as the image's gives the same
    coalitions, and the test compares the maps. Captum evaluates one coalition per forward
    by default; ours packs the coalitions of all images into passes of ``batch_size``.

    Returns float32 maps of shape (N, H, W), constant on each superpixel.

    References
    ----------
    M. T. Ribeiro, S. Singh, C. Guestrin, "Why Should I Trust You?: Explaining the
    Predictions of Any Classifier", KDD 2016.
    """

    spec = ExplainerSpec(
        name="lime",
        family=Family.SHAPLEY,
        access=("forward",),
        stochastic=True,
        batches_evaluations=True,
        summary="sparse linear surrogate fitted to random superpixel coalitions near the image",
        references=("ribeiro2016", "captum"),
        needs_internals=False,
    )
    Params = LimeParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": params.samples, "backward": 0}  # type: ignore[attr-defined]

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        labels, counts = superpixels(inputs, self.p, self.normalization)
        gens = generators or [torch.Generator().manual_seed(0) for _ in inputs]
        keep = [torch.cat([torch.bernoulli(torch.full((1, k), 0.5), generator=g)
                           for _ in range(self.p.samples)]).bool() for k, g in zip(counts, gens)]
        if self.p.alpha == 0:
            warn_underdetermined(self.spec.name, self.p.samples, counts)
        scores, sims = coalition_scores(self.model, inputs, targets, labels, [len(z) for z in keep],
                                        lambda i, jobs: keep[i][jobs], self.p.baseline, self.batch_size,
                                        self.p.score, similarity=True)
        assert sims is not None
        width = 2 * self.p.kernel_width ** 2
        values = [fit_linear(z, y, torch.exp(-((1 - sim.double()) ** 2) / width), self.p.alpha)
                  for z, y, sim in zip(keep, scores, sims)]
        self.last_forward_passes = torch.full((len(inputs),), self.p.samples, dtype=torch.int64)
        return paint(values, labels)
