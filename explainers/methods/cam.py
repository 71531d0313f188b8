"""CAM (Zhou et al. 2016) for networks with a global-average-pooling head."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attriflow.explainers._cam import CAMExplainer, CAMParams
from attriflow.explainers._hooks import capture_outputs, get_layer
from attriflow.explainers._numerics import as_working
from attriflow.explainers.base import ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.registry import register


class CAMMethodParams(CAMParams):
    """Parameters of :class:`CAM`; the paper's map has no ReLU."""

    relu: bool = False
    fc: str | None = None


@register
class CAM(CAMExplainer):
    """Class activation map: ``sum_k W[c, k] A_k`` with the weights of the linear classifier.

    Valid for ``conv features -> global average pool -> linear`` heads: ``fc`` (default: the
    last ``nn.Linear``) must take as many inputs as ``layer`` has channels. For such a head
    and ``score="logit"`` the map equals Grad-CAM without ReLU times ``h * w``.

    References
    ----------
    B. Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016.
    """

    spec = ExplainerSpec(
        name="cam",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.CAM,
        access=("activations",),
        summary="activations weighted by the linear classifier's weights (GAP models)",
        references=("zhou2016",),
    )
    Params = CAMMethodParams
    uses_gradients = False

    def __init__(self, model: nn.Module, **params: Any) -> None:
        super().__init__(model, **params)
        if self.p.fc is not None:
            fc = get_layer(model, self.p.fc)
        else:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise UnsupportedModelError("cam: the model has no nn.Linear classifier; give params.fc")
            fc = linears[-1]
        if not isinstance(fc, nn.Linear):
            raise UnsupportedModelError(f"cam: fc {self.p.fc!r} is not an nn.Linear")
        self.fc = fc

    def refuse(self, example: Tensor) -> None:
        """Refuse unless the logits are ``fc`` applied to the global average of the layer.

        Checked on one seeded random input of the example's shape: for every class ``c``,
        ``mean(cam_c) + b_c`` must equal the logit (relative tolerance 1e-3 of the logits'
        scale). A ReLU, pooling or other layer between the target layer and the average
        (DenseNet's ``F.relu`` after ``features``) breaks the identity CAM rests on.

        Raises
        ------
        UnsupportedModelError
            Naming the layer, the classifier and the size of the mismatch.
        """
        super().refuse(example)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(example.shape, generator=g, dtype=torch.float32).to(example)
        name = self.layer_name(x)
        with capture_outputs(self.model, [name]) as acts, torch.no_grad():
            logits = self.model(x)
        a = as_working(acts[name])
        if a.ndim != 4 or a.shape[1] != self.fc.in_features:
            raise UnsupportedModelError(
                f"cam: layer {name!r} has output {tuple(a.shape)} but the classifier takes "
                f"{self.fc.in_features} inputs; CAM needs conv features -> global average pool -> linear"
            )
        w = self.fc.weight.detach().to(a.dtype)
        b = self.fc.bias.detach().to(a.dtype) if self.fc.bias is not None else 0.0
        implied = a.mean(dim=(2, 3)) @ w.T + b
        scale = float(as_working(logits).abs().amax()) or 1.0
        err = float((implied - as_working(logits)).abs().amax()) / scale
        if err > 1e-3:
            raise UnsupportedModelError(
                f"cam: the logits are not the classifier applied to the global average of layer "
                f"{name!r} (they differ by {err:.2g} of their scale: another layer, such as a ReLU, "
                "sits between); CAM's map would not decompose the logit. Use grad_cam, or give "
                "params.layer the tensor the average pool reads")

    def weighted(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """``W[c, k] A_k`` (N, C, h, w), ``W`` the classifier's weights and ``c`` the target."""
        if acts.shape[1] != self.fc.in_features:
            raise UnsupportedModelError(
                f"cam: layer has {acts.shape[1]} channels but the classifier takes "
                f"{self.fc.in_features} inputs; CAM needs a GAP -> linear head"
            )
        acts = as_working(acts)  # float32 sums for 16-bit activations
        weights = self.fc.weight.detach()[targets].to(acts.dtype)
        return weights[:, :, None, None] * acts
