"""Gradient SHAP (Lundberg & Lee 2017; Captum's ``GradientShap``)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attriflow.explainers._batching import iter_jobs
from attriflow.explainers._gradients import Reduce, input_gradient, reduce_channels
from attriflow.explainers._numerics import working_dtype
from attriflow.explainers._scores import ScoreKind
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register


class GradientShapParams(BaseModel):
    """Parameters of :class:`GradientShap`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    samples: int = Field(50, ge=1, le=100_000, description="random (baseline, point) draws per image")
    baseline_std: float = Field(1.0, ge=0, description="std of the Gaussian baselines (model-input units); "
                                                       "0: the zero baseline")
    stdev: float = Field(0.0, ge=0, description="std of the Gaussian input noise (Captum's stdevs)")
    score: ScoreKind = "logit"
    reduce: Reduce = "sum"


@register
class GradientShap(Explainer):
    """Expected gradients: the mean over random baselines ``b`` and points ``t`` of
    ``(x' - b) * grad f(b + t (x' - b))``, summed over channels.

    Each of the ``samples`` draws of an image takes, from the image's own generator and in
    this order: a baseline ``b ~ N(0, baseline_std^2)`` per pixel and channel (Gaussian
    images in model-input units, the baseline distribution of Captum's example; 0 gives
    stochastic Integrated Gradients from the zero baseline), ``t ~ U[0, 1)``, and, when
    ``stdev > 0``, the input noise ``x' = x + N(0, stdev^2)``. This is Captum's
    ``GradientShap(model).attribute(x, baselines=B, n_samples=samples, stdevs=stdev)``
    with ``B`` the drawn baselines, each used once: the test injects the same draws into
    Captum and compares the maps. In expectation over baselines from a distribution D it
    approximates the SHAP values of f with background D (Lundberg & Lee 2017, section 4).
    Every draw of all images is packed into passes of ``batch_size``; a sample's map does
    not depend on its batch.

    Returns float32 maps of shape (N, H, W).

    References
    ----------
    S. M. Lundberg, S.-I. Lee, "A Unified Approach to Interpreting Model Predictions",
    NeurIPS 2017. G. Erion et al., "Improving performance of deep learning models with
    axiomatic attribution priors and expected gradients", Nature Machine Intelligence 2021.
    """

    spec = ExplainerSpec(
        name="gradient_shap",
        family=Family.SHAPLEY,
        access=("gradients",),
        stochastic=True,
        batches_evaluations=True,
        summary="expected gradients over random baselines and path points (SHAP values in expectation)",
        references=("lundberg2017", "erion2021"),
        needs_internals=False,
    )
    Params = GradientShapParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        s = params.samples  # type: ignore[attr-defined]
        return {"forward": s, "backward": s}

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        n, c, h, w = inputs.shape
        gens = generators or [torch.Generator().manual_seed(0) for _ in range(n)]
        work = working_dtype(inputs.dtype)
        total = torch.zeros((n, c, h, w), dtype=work, device=inputs.device)
        for img, _ in iter_jobs(n, self.p.samples, self.batch_size):
            base, shown, alpha = [], [], []
            for i in img.tolist():  # each image's draws in its job order
                g = gens[i]
                base.append(torch.randn((c, h, w), generator=g, dtype=torch.float32) * self.p.baseline_std)
                alpha.append(torch.rand((), generator=g, dtype=torch.float32))
                noise = (torch.randn((c, h, w), generator=g, dtype=torch.float32) * self.p.stdev
                         if self.p.stdev > 0 else None)
                shown.append(inputs[i] if noise is None else inputs[i] + noise.to(inputs))
            b = torch.stack(base).to(inputs)
            x = torch.stack(shown)
            t = torch.stack(alpha).to(inputs).view(-1, 1, 1, 1)
            grad = input_gradient(self.model, b + t * (x - b), targets[img.to(inputs.device)], self.p.score)
            total.index_add_(0, img.to(inputs.device), ((x - b) * grad).to(work))
        self.last_forward_passes = torch.full((n,), self.p.samples, dtype=torch.int64)
        return reduce_channels(total / self.p.samples, self.p.reduce)
