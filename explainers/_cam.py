"""Shared machinery of class-activation-map explainers.

A CAM method computes a map at the resolution of one layer from that layer's activations
(and, for gradient CAMs, the target score's gradient with respect to them); this base
class finds the layer, records activations (and gradients, taken only as deep as the
layer), applies the optional ReLU and upsamples bilinearly to the input size.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from attriflow.explainers._hooks import capture_outputs, default_cam_layer, get_layer, spatial_layers
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers.base import Explainer, UnsupportedModelError


class CAMParams(BaseModel):
    """Parameters shared by CAM explainers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layer: str | None = None
    score: ScoreKind = "logit"
    relu: bool = True


class CAMExplainer(Explainer):
    """Base of CAM explainers: subclasses implement :meth:`combine`.

    ``layer`` defaults to the last module with a spatial output (the last convolutional
    block); a module called several times in one forward pass contributes its last call.
    Maps are upsampled with ``F.interpolate(mode="bilinear", align_corners=False)``
    (half-pixel centres, as ``cv2.resize``), never min-max scaled.
    """

    Params: ClassVar[type[BaseModel]] = CAMParams
    uses_gradients: ClassVar[bool] = True

    def __init__(self, model: nn.Module, **params: Any) -> None:
        super().__init__(model, **params)
        if self.p.layer is not None:
            get_layer(model, self.p.layer)  # fail early with the list of valid names

    def refuse(self, example: Tensor) -> None:
        """Refuse a configured layer without a spatial output: a CAM weighs the layer's
        (N, C, h, w) feature maps, so a layer whose output is not 4-D (a classifier, a
        flatten) cannot be explained, and one of 1 x 1 positions (the global pooling) gives
        a constant map. Subclasses that refuse more call this first.

        Raises
        ------
        UnsupportedModelError
            Naming the layer, its output shape and the spatial layers that work.
        """
        if self.p.layer is None:
            return  # the automatic layer is the last spatial one
        name = str(self.p.layer)
        with capture_outputs(self.model, [name]) as acts, torch.no_grad():
            self.model(example[:1])
        shape = tuple(acts[name].shape)
        if len(shape) == 4 and shape[-1] * shape[-2] > 1:
            return
        what = "1 x 1 positions: every map would be constant" if len(shape) == 4 else \
            "no (N, C, h, w) feature maps to weigh"
        usable = ", ".join(n for n, _ in spatial_layers(self.model, example[:1])[-6:])
        raise UnsupportedModelError(
            f"{self.spec.name}: params.layer {name!r} outputs shape {shape}, {what}; use a convolutional "
            f"layer (the last spatial ones: {usable})")

    def resolve(self, example: Tensor) -> None:
        """Fix the automatically found target layer (recorded in ``params()``)."""
        if self.p.layer is None:
            self.resolved["layer"] = default_cam_layer(self.model, example[:1])

    def layer_name(self, example: Tensor) -> str:
        """Target layer: the configured one or the automatically found last block."""
        if self.p.layer is not None:
            return str(self.p.layer)
        if "layer" not in self.resolved:
            self.resolve(example)
        return str(self.resolved["layer"])

    def activations(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        """Activations (N, C, h, w) of the layer and, for gradient CAMs, their gradients."""
        name = self.layer_name(inputs)
        with capture_outputs(self.model, [name]) as acts:
            if not self.uses_gradients:
                with torch.no_grad():
                    self.model(inputs)
                return acts[name].detach(), None
            with torch.enable_grad():
                for p in self.model.parameters():
                    p.requires_grad_(False)  # restored by attribute(); no weight gradients
                x = inputs.detach().clone().requires_grad_(True)
                scores = target_scores(self.model(x), targets, self.p.score)
                act = acts[name]
                (grad,) = torch.autograd.grad(scores.sum(), act)
        return act.detach(), grad.detach()

    def combine(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """The method's map at layer resolution, shape (N, h, w), before the ReLU."""
        raise NotImplementedError

    def layer_map(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Map at the layer's resolution after the optional ReLU, shape (N, h, w)."""
        acts, grads = self.activations(inputs, targets)
        cam = self.combine(inputs, targets, acts, grads)
        return cam.clamp_min(0) if self.p.relu else cam

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        cam = self.layer_map(inputs, targets)[:, None]
        return F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
