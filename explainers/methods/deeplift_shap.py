"""DeepLIFT SHAP (Lundberg & Lee 2017; Captum's ``DeepLiftShap``)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attriflow.explainers._gradients import Reduce, reduce_channels
from attriflow.explainers._numerics import working_dtype
from attriflow.explainers._scores import ScoreKind
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.methods.deeplift import multipliers, refuse_unruled
from attriflow.explainers.registry import register


class DeepLiftShapParams(BaseModel):
    """Parameters of :class:`DeepLiftShap`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    baselines: int = Field(10, ge=1, le=10_000, description="reference images per image")
    baseline_std: float = Field(1.0, ge=0, description="std of the Gaussian references (model-input units)")
    score: ScoreKind = "logit"
    reduce: Reduce = "sum"
    maxpool_overlap: Literal["accumulate", "overwrite"] = "accumulate"


@register
class DeepLiftShap(Explainer):
    """DeepLIFT averaged over a distribution of references: SHAP values of a linearised
    model with that background (Lundberg & Lee 2017, "Deep SHAP").

    Each image draws ``baselines`` references ``b_k ~ N(0, baseline_std^2)`` per pixel and
    channel (Gaussian images in model-input units) from its own generator, in order; the
    map is the mean over ``k`` of the DeepLIFT (rescale rule) map of the image against
    ``b_k``, summed over channels, so it sums to ``f(x) - mean_k f(b_k)``. This is Captum's
    ``DeepLiftShap(model).attribute(x, baselines=B)`` with ``B`` the drawn references (the
    test compares the two on a model Captum's DeepLIFT handles); the rescale rule, its
    refusals and the max-pool treatment are :class:`DeepLIFT`'s. Each reference costs one
    forward pass of the batch's references and a forward and backward of the batch.

    Returns float32 maps of shape (N, H, W).

    References
    ----------
    S. M. Lundberg, S.-I. Lee, "A Unified Approach to Interpreting Model Predictions",
    NeurIPS 2017; A. Shrikumar et al., "Learning Important Features Through Propagating
    Activation Differences", ICML 2017.
    """

    spec = ExplainerSpec(
        name="deeplift_shap",
        family=Family.SHAPLEY,
        access=("gradients",),
        stochastic=True,
        summary="DeepLIFT averaged over random references (Deep SHAP)",
        references=("lundberg2017", "shrikumar2017"),
    )
    Params = DeepLiftShapParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        k = params.baselines  # type: ignore[attr-defined]
        return {"forward": 2 * k, "backward": k}

    def refuse(self, example: Tensor) -> None:  # noqa: D102
        refuse_unruled(self.spec.name, self.model, example)

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        n = len(inputs)
        gens = generators or [torch.Generator().manual_seed(0) for _ in range(n)]
        # (N, K, C, H, W) on the CPU: one reference per image at a time goes to the device
        shape = (self.p.baselines, *inputs.shape[1:])
        refs = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        total = torch.zeros(inputs.shape, dtype=working_dtype(inputs.dtype), device=inputs.device)
        for k in range(self.p.baselines):
            reference = refs[:, k].to(inputs) * self.p.baseline_std
            grad = multipliers(self.model, inputs, targets, reference, self.p.score, self.p.maxpool_overlap)
            total += ((inputs - reference) * grad).to(total.dtype)
        self.last_forward_passes = torch.full((n,), 2 * self.p.baselines, dtype=torch.int64)
        return reduce_channels(total / self.p.baselines, self.p.reduce)
