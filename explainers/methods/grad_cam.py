"""Grad-CAM (Selvaraju et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from explainers._hooks import capture_outputs, default_cam_layer, get_layer
from explainers._scores import ScoreKind, target_scores
from explainers.base import Explainer, ExplainerSpec, Family
from explainers.registry import register


class GradCAMParams(BaseModel):
    """Parameters of :class:`GradCAM`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layer: str | None = None
    score: ScoreKind = "logit"
    relu: bool = True


@register
class GradCAM(Explainer):
    """Gradient-weighted class activation map.

    Channel weights are the spatial mean of the target score's gradient at ``layer``;
    the map is ``ReLU(sum_k w_k A_k)`` (the ReLU is the paper's and can be switched off),
    upsampled bilinearly (``align_corners=False``) to the input size. No min-max scaling.
    The gradient is taken only down to ``layer`` (``torch.autograd.grad`` on the layer
    output), not through the whole network.

    ``layer`` defaults to the last module with a spatial output (the last convolutional
    block). A module called several times in one forward pass contributes its last call.

    References
    ----------
    R. R. Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4, 3))
    >>> cam = GradCAM(net, layer="1")
    >>> tuple(cam.attribute(torch.rand(2, 3, 8, 8), torch.tensor([0, 2])).shape)
    (2, 8, 8)
    """

    spec = ExplainerSpec(
        name="grad_cam",
        family=Family.CAM,
        access=("gradients", "activations"),
        summary="activations weighted by spatially averaged gradients",
        references=("selvaraju2017",),
    )
    Params = GradCAMParams

    def __init__(self, model: nn.Module, **params: object) -> None:
        super().__init__(model, **params)
        if self.p.layer is not None:
            get_layer(model, self.p.layer)  # fail early with the list of valid names

    def layer_name(self, example: Tensor) -> str:
        """Target layer: the configured one or the automatically found last block."""
        return self.p.layer or default_cam_layer(self.model, example)

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        name = self.layer_name(inputs)
        with capture_outputs(self.model, [name]) as acts, torch.enable_grad():
            for p in self.model.parameters():
                p.requires_grad_(False)  # restored by attribute(); no weight gradients
            x = inputs.clone().requires_grad_(True)
            scores = target_scores(self.model(x), targets, self.p.score)
            act = acts[name]
            (grad,) = torch.autograd.grad(scores.sum(), act)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = (weights * act.detach()).sum(dim=1, keepdim=True)
        if self.p.relu:
            cam = cam.clamp_min(0)
        cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
        return cam[:, 0]
