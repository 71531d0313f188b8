"""Gradient saliency (Simonyan et al. 2014)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from attriflow.explainers._gradients import Reduce, input_gradient, reduce_channels
from attriflow.explainers._numerics import as_working
from attriflow.explainers._scores import ScoreKind
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register


class SaliencyParams(BaseModel):
    """Parameters of :class:`Saliency`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    score: ScoreKind = "logit"
    reduce: Reduce = "max_abs"


@register
class Saliency(Explainer):
    """Gradient of the target score with respect to the input.

    The channel reduction defaults to Simonyan et al.'s maximum of the absolute gradient
    over colour channels (``max_abs``); ``sum_abs``, ``l2`` and the signed ``sum`` are options.

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
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.GRADIENT,
        access=("gradients",),
        summary="input gradient of the target score",
        references=("simonyan2014",),
        needs_internals=False,
    )
    Params = SaliencyParams

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        grad = as_working(input_gradient(self.model, inputs, targets, self.p.score))  # float32 for 16-bit
        return reduce_channels(grad, self.p.reduce)
