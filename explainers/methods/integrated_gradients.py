"""Integrated Gradients (Sundararajan et al. 2017)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attriflow.explainers._batching import iter_jobs
from attriflow.explainers._gradients import Reduce, input_gradient, reduce_channels
from attriflow.explainers._numerics import working_dtype
from attriflow.explainers._scores import ScoreKind
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register

Rule = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]


def path_points(steps: int, rule: Rule) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation coefficients alpha in [0, 1] and their quadrature weights.

    ``gausslegendre`` (Captum's default) and the left/right/middle Riemann sums match
    Captum. ``riemann_trapezoid`` is the true trapezoid rule (weights 1/(steps-1), ends
    halved, summing to 1); Captum's variant uses weights 1/steps and sums to 1 - 1/steps.
    """
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (x + 1), 0.5 * w
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("riemann_trapezoid needs at least 2 steps")
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] /= 2
        return np.linspace(0, 1, steps), w
    w = np.full(steps, 1.0 / steps)
    if rule == "riemann_left":
        return np.linspace(0, 1 - 1 / steps, steps), w
    if rule == "riemann_right":
        return np.linspace(1 / steps, 1, steps), w
    return np.linspace(1 / (2 * steps), 1 - 1 / (2 * steps), steps), w


class IntegratedGradientsParams(BaseModel):
    """Parameters of :class:`IntegratedGradients`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(50, ge=1, le=100_000)
    rule: Rule = "gausslegendre"
    baseline: float = 0.0
    score: ScoreKind = "logit"
    reduce: Reduce = "sum"


@register
class IntegratedGradients(Explainer):
    """Path integral of gradients from a constant baseline to the input.

    ``baseline`` is a constant in the model's input space; the default 0 is the dataset
    mean colour for normalised inputs. Path points of several images are packed into
    forward/backward passes of ``batch_size`` points, so memory is bounded by one batch
    (Captum's default puts all steps of all images in one batch).

    References
    ----------
    M. Sundararajan, A. Taly, Q. Yan, "Axiomatic Attribution for Deep Networks", ICML 2017.
    """

    spec = ExplainerSpec(
        name="integrated_gradients",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.GRADIENT,
        batches_evaluations=True,
        summary="path-integrated gradients from a baseline",
        references=("sundararajan2017",),
        needs_internals=False,
    )
    Params = IntegratedGradientsParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": params.steps, "backward": params.steps}  # type: ignore[attr-defined]

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        alphas, weights = path_points(self.p.steps, self.p.rule)
        alpha = torch.as_tensor(alphas, dtype=inputs.dtype, device=inputs.device)
        work = working_dtype(inputs.dtype)  # float32 sums for float16 inputs
        weight = torch.as_tensor(weights, dtype=work, device=inputs.device)
        delta = inputs - self.p.baseline
        total = torch.zeros(inputs.shape, dtype=work, device=inputs.device)
        for img, step in iter_jobs(len(inputs), self.p.steps, self.batch_size, inputs.device):
            a = alpha[step].view(-1, 1, 1, 1)
            grad = input_gradient(self.model, self.p.baseline + a * delta[img], targets[img], self.p.score)
            total.index_add_(0, img, grad.to(work) * weight[step].view(-1, 1, 1, 1))
        return reduce_channels(total * delta.to(work), self.p.reduce)
