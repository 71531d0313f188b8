"""CAM (Zhou et al. 2016) for networks with a global-average-pooling head."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from explainers._cam import CAMExplainer, CAMParams
from explainers._hooks import get_layer
from explainers._numerics import as_working
from explainers.base import ExplainerSpec, Family
from explainers.registry import register


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
                raise ValueError("cam: the model has no nn.Linear classifier; give params.fc")
            fc = linears[-1]
        if not isinstance(fc, nn.Linear):
            raise ValueError(f"cam: fc {self.p.fc!r} is not an nn.Linear")
        self.fc = fc

    def combine(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        if acts.shape[1] != self.fc.in_features:
            raise ValueError(
                f"cam: layer has {acts.shape[1]} channels but the classifier takes "
                f"{self.fc.in_features} inputs; CAM needs a GAP -> linear head"
            )
        acts = as_working(acts)  # float32 sums for 16-bit activations
        weights = self.fc.weight.detach()[targets].to(acts.dtype)
        return (weights[:, :, None, None] * acts).sum(dim=1)
