"""SmoothGrad (Smilkov et al. 2017), a wrapper around any gradient explainer."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from attriflow.explainers._batching import iter_jobs
from attriflow.explainers._numerics import NormalStream
from attriflow.explainers.base import Explainer, ExplainerSpec, Family, validate_params
from attriflow.explainers.registry import get_explainer, register


class SmoothGradParams(BaseModel):
    """Parameters of :class:`SmoothGrad`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base: str = "saliency"
    base_params: dict[str, Any] = Field(default_factory=dict)
    samples: int = Field(25, ge=1, le=100_000)
    noise_level: float = Field(0.15, ge=0.0)
    variant: Literal["smoothgrad", "smoothgrad_sq", "vargrad"] = "smoothgrad"

    @field_validator("base")
    @classmethod
    def _gradient_base(cls, value: str) -> str:
        try:
            base = get_explainer(value)
        except KeyError as err:
            raise ValueError(str(err.args[0])) from None
        if base.spec.family != Family.GRADIENT or base.spec.stochastic or value == "smooth_grad":
            raise ValueError(f"base must be a deterministic gradient explainer, got {value!r}")
        return value


@register
class SmoothGrad(Explainer):
    """Average of a gradient explainer's maps over noisy copies of the input.

    Noise is Gaussian with standard deviation ``noise_level * (max(x) - min(x))`` per image
    (the paper's noise level), drawn from the sample's own generator, so a map does not
    depend on the batch. The draws are streamed (:class:`explainers._numerics.NormalStream`,
    the same values as one ``(samples, C, H, W)`` draw), so memory is one pass of
    ``batch_size`` noisy copies whatever ``samples`` is. ``smoothgrad_sq`` averages squared
    maps and ``vargrad`` takes their variance. The base explainer's channel reduction is
    applied per noisy copy, before averaging (for a linear reduction this equals Captum's
    NoiseTunnel order).

    References
    ----------
    D. Smilkov et al., "SmoothGrad: removing noise by adding noise", ICML-W 2017.
    """

    spec = ExplainerSpec(
        name="smooth_grad",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.GRADIENT,
        stochastic=True,
        batches_evaluations=True,
        summary="gradient maps averaged over noisy inputs (wraps any gradient explainer)",
        references=("smilkov2017",),
        needs_internals=False,
    )
    Params = SmoothGradParams

    def __init__(self, model: nn.Module, **params: Any) -> None:
        super().__init__(model, **params)
        cls = get_explainer(self.p.base)
        validate_params(cls, self.p.base_params)
        self.inner = cls(model, **self.p.base_params)

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        inner = get_explainer(params.base)  # type: ignore[attr-defined]
        per = inner.estimate_cost(validate_params(inner, params.base_params))  # type: ignore[attr-defined]
        n = params.samples  # type: ignore[attr-defined]
        return {k: v * n if isinstance(v, int) else f"{n} x ({v})" for k, v in per.items()}

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        assert generators is not None
        n, k = len(inputs), self.p.samples
        span = (inputs.flatten(1).amax(1) - inputs.flatten(1).amin(1)).view(-1, 1, 1, 1)
        sigma = self.p.noise_level * span
        # each image's k noise draws, streamed: the values of one (k, C, H, W) draw per image,
        # only one pass's worth held at a time
        streams = [NormalStream(g, k, tuple(inputs.shape[1:]), inputs.dtype) for g in generators]
        inner_evals = self.inner.cost()["forward"]
        per_pass = max(1, self.batch_size // inner_evals) if isinstance(inner_evals, int) else 1
        self.inner.batch_size = self.batch_size
        first = torch.zeros((n, *inputs.shape[2:]), dtype=torch.float64, device=inputs.device)
        second = torch.zeros_like(first)
        for img, _ in iter_jobs(n, k, per_pass):
            parts = [(int(i), int(c)) for i, c in zip(*torch.unique_consecutive(img, return_counts=True))]
            noise = torch.cat([streams[i].take(c) for i, c in parts]).to(inputs.device)
            img = img.to(inputs.device)
            noisy = inputs[img] + sigma[img] * noise
            maps = self.inner._attribute(noisy, targets[img], None).to(torch.float64)
            first.index_add_(0, img, maps)
            second.index_add_(0, img, maps * maps)
        mean, mean_sq = first / k, second / k
        if self.p.variant == "smoothgrad":
            return mean
        if self.p.variant == "smoothgrad_sq":
            return mean_sq
        return mean_sq - mean * mean
