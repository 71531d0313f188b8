"""Guided Integrated Gradients (Kapishnikov et al. 2021; PAIR's ``saliency.core.GuidedIG``)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attriflow.explainers._gradients import Reduce, input_gradient, reduce_channels
from attriflow.explainers._scores import ScoreKind
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register

#: PAIR's tolerance for "the path has reached this step's L1 distance".
EPSILON = 1e-9


class GuidedIGParams(BaseModel):
    """Parameters of :class:`GuidedIG` (defaults: PAIR's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(200, ge=1, le=100_000)
    fraction: float = Field(0.25, gt=0, le=1, description="share of features (least |grad|) moved per step")
    max_dist: float = Field(0.02, ge=0, le=1, description="largest deviation from the straight path (alpha)")
    baseline: float = 0.0
    score: ScoreKind = "logit"
    reduce: Reduce = "sum"


def _step(x: Tensor, grad_actual: Tensor, x_input: Tensor, x_base: Tensor, step: int, p: GuidedIGParams,
          l1_total: float) -> Tensor:
    """Move one image's path point ``x`` (in place) through one step of PAIR's
    ``guided_ig_impl`` and return that step's attribution ``sum (x_new - x_old) * grad``."""
    attr = torch.zeros_like(x)
    grad = grad_actual.clone()
    alpha = (step + 1.0) / p.steps
    alpha_min, alpha_max = max(alpha - p.max_dist, 0.0), min(alpha + p.max_dist, 1.0)
    diff = x_input - x_base
    x_min, x_max = x_base + diff * alpha_min, x_base + diff * alpha_max
    l1_target = l1_total * (1 - (step + 1) / p.steps)
    n = x.numel()
    k = int(math.floor(p.fraction * (n - 1)))  # numpy's quantile(..., interpolation="lower")
    gamma = math.inf
    while gamma > 1.0:
        x_old = x.clone()
        x_alpha = torch.where(diff != 0, (x - x_base) / torch.where(diff != 0, diff, 1.0), alpha_max)
        behind = x_alpha < alpha_min
        x[behind] = x_min[behind]
        l1_current = float((x - x_input).abs().sum())
        if math.isclose(l1_target, l1_current, rel_tol=EPSILON, abs_tol=EPSILON):
            attr += (x - x_old) * grad_actual
            break
        grad[x == x_max] = math.inf
        threshold = grad.abs().flatten().kthvalue(k + 1).values
        s = (grad.abs() <= threshold) & (grad != math.inf)
        l1_s = float(((x - x_max).abs() * s).sum())
        gamma = (l1_current - l1_target) / l1_s if l1_s > 0 else math.inf
        if gamma > 1.0:
            x[s] = x_max[s]
        else:
            x[s] = (x + (x_max - x) * gamma)[s]
        attr += (x - x_old) * grad_actual
    return attr


@register
class GuidedIG(Explainer):
    """Integrated gradients along an adaptive path that first moves the features whose
    gradient is smallest.

    From the ``baseline`` image, at each of ``steps`` steps the path point must reach the
    straight path's L1 distance to the image for that step; it gets there by moving the
    ``fraction`` of features with the smallest absolute gradient (never more than
    ``max_dist`` ahead of, nor behind, the straight path, as a share of it), crediting each
    move with the gradient at the step's start. ``max_dist = 0`` is Integrated Gradients on
    the straight path. This is PAIR's ``GuidedIG().GetMask(x, ..., x_baseline, x_steps,
    fraction, max_dist)`` step for step, in float64, summed over channels (the test
    compares the two). The path of an image depends on its own gradients, so the steps run
    in order; each step's gradients of all images are taken in passes of ``batch_size``.

    Returns float32 maps of shape (N, H, W); an image whose gradient is NaN or infinite
    somewhere on its path gets a NaN map (the pipeline flags it), where PAIR's loop never
    ends.

    References
    ----------
    A. Kapishnikov, S. Venugopalan, B. Avci, B. Wedin, M. Terry, T. Bolukbasi, "Guided
    Integrated Gradients: an Adaptive Path Method for Removing Noise", CVPR 2021.
    """

    spec = ExplainerSpec(
        name="guided_ig",
        family=Family.GRADIENT,
        access=("gradients",),
        batches_evaluations=True,
        summary="integrated gradients along an adaptive path that moves low-gradient features first",
        references=("kapishnikov2021",),
        needs_internals=False,
    )
    Params = GuidedIGParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        s = params.steps  # type: ignore[attr-defined]
        return {"forward": s, "backward": s}

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        x_input = inputs.detach().to(torch.float64)
        x_base = torch.full_like(x_input, self.p.baseline)
        l1_total = (x_input - x_base).abs().flatten(1).sum(1).tolist()
        x = x_base.clone()
        attr = torch.zeros_like(x_input)
        active = [i for i, d in enumerate(l1_total) if d > 0]  # an image equal to the baseline gets zeros
        for step in range(self.p.steps):
            grads = torch.cat([input_gradient(self.model, x[active[j:j + self.batch_size]].to(inputs.dtype),
                                              targets[active[j:j + self.batch_size]], self.p.score)
                               for j in range(0, len(active), self.batch_size)]).to(torch.float64) \
                if active else x[:0]
            finite = grads.flatten(1).isfinite().all(1).tolist()
            for g, i, ok in zip(grads, active, finite):
                if not ok:  # no path through a NaN / inf gradient (PAIR loops forever): a NaN map, flagged
                    attr[i] = math.nan
                    continue
                attr[i] += _step(x[i], g, x_input[i], x_base[i], step, self.p, l1_total[i])
            active = [i for i, ok in zip(active, finite) if ok]
        self.last_forward_passes = torch.tensor([self.p.steps if d > 0 else 0 for d in l1_total],
                                                dtype=torch.int64)
        return reduce_channels(attr, self.p.reduce)
