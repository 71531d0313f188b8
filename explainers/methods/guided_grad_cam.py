"""Guided Grad-CAM (Selvaraju et al. 2017)."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from attriflow.explainers._gradients import Reduce, ReluMode, reduce_channels, refuse_unguided, relu_backward
from attriflow.explainers._hooks import capture_outputs
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.methods.grad_cam import GradCAM
from attriflow.explainers.registry import register


class GuidedGradCAMParams(BaseModel):
    """Parameters of :class:`GuidedGradCAM`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layer: str | None = None
    score: ScoreKind = "logit"
    upsample: Literal["bilinear", "nearest"] = "bilinear"
    reduce: Reduce = "max_abs"


@register
class GuidedGradCAM(Explainer):
    """Guided back-propagation times the (ReLU'd) Grad-CAM map, per channel, then reduced.

    Captum upsamples the Grad-CAM map with ``nearest``; ``bilinear`` (default) matches our
    Grad-CAM.

    References
    ----------
    R. R. Selvaraju et al., "Grad-CAM", ICCV 2017.
    """

    spec = ExplainerSpec(
        name="guided_grad_cam",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.CAM,
        access=("gradients", "activations"),
        summary="guided back-propagation gated by Grad-CAM",
        references=("selvaraju2017",),
    )
    Params = GuidedGradCAMParams

    def __init__(self, model: nn.Module, **params: Any) -> None:
        super().__init__(model, **params)
        self.cam = GradCAM(model, layer=self.p.layer, score=self.p.score, relu=True)

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": 1, "backward": 2}

    def resolve(self, example: Tensor) -> None:
        """Fix the automatically found Grad-CAM layer (recorded in ``params()``)."""
        self.cam.resolve(example)
        self.resolved.update(self.cam.resolved)

    def refuse(self, example: Tensor) -> None:
        """Refuse models with non-rectifier activations (see :class:`GuidedBackprop`)."""
        refuse_unguided(self.spec.name, self.model, example)

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        # one forward pass: the plain gradient at the layer (Grad-CAM), then, with the
        # ReLUs switched to the guided rule, the guided gradient at the input
        name = self.cam.layer_name(inputs)
        rule = ReluMode("plain")
        with relu_backward(self.model, rule), capture_outputs(self.model, [name]) as acts, torch.enable_grad():
            for p in self.model.parameters():
                p.requires_grad_(False)  # restored by attribute(); no weight gradients
            x = inputs.detach().clone().requires_grad_(True)
            score = target_scores(self.model(x), targets, self.p.score).sum()
            act = acts[name]
            (grad,) = torch.autograd.grad(score, act, retain_graph=True)
            rule.mode = "guided"
            (guided,) = torch.autograd.grad(score, x)
        low = self.cam.combine(inputs, targets, act.detach(), grad).clamp_min(0)[:, None]
        kwargs = {"align_corners": False} if self.p.upsample == "bilinear" else {}
        cam = F.interpolate(low, size=inputs.shape[-2:], mode=self.p.upsample, **kwargs)
        return reduce_channels(guided * cam, self.p.reduce)
