"""Gradient saliency (Simonyan et al. 2014)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from explainers._scores import ScoreKind, target_scores
from explainers.base import Explainer, ExplainerSpec, Family
from explainers.registry import register


class SaliencyParams(BaseModel):
    """Parameters of :class:`Saliency`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    score: ScoreKind = "logit"
    reduce: Literal["max_abs", "sum_abs", "sum"] = "max_abs"


@register
class Saliency(Explainer):
    """Gradient of the target score with respect to the input.

    The channel reduction defaults to Simonyan et al.'s maximum of the absolute gradient
    over colour channels (``max_abs``); ``sum_abs`` and the signed ``sum`` are options.

    References
    ----------
    K. Simonyan, A. Vedaldi, A. Zisserman, "Deep Inside Convolutional Networks", ICLR-W 2014.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.Flatten(),
    ...                           torch.nn.Linear(2 * 8 * 8, 4))
    >>> maps = Saliency(net).attribute(torch.rand(2, 3, 8, 8), torch.tensor([0, 3]))
    >>> tuple(maps.shape)
    (2, 8, 8)
    """

    spec = ExplainerSpec(
        name="saliency",
        family=Family.GRADIENT,
        access=("gradients",),
        summary="input gradient of the target score",
        references=("simonyan2014",),
    )
    Params = SaliencyParams

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        x = inputs.clone().requires_grad_(True)
        with torch.enable_grad():
            scores = target_scores(self.model(x), targets, self.p.score)
            (grad,) = torch.autograd.grad(scores.sum(), x)
        if self.p.reduce == "max_abs":
            return grad.abs().amax(dim=1)
        if self.p.reduce == "sum_abs":
            return grad.abs().sum(dim=1)
        return grad.sum(dim=1)
