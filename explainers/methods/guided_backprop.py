"""Guided back-propagation (Springenberg et al. 2015)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from attriflow.explainers._gradients import (
    Reduce,
    input_gradient,
    reduce_channels,
    refuse_unguided,
    relu_backward,
)
from attriflow.explainers._scores import ScoreKind
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register


class GuidedBackpropParams(BaseModel):
    """Parameters of :class:`GuidedBackprop`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    score: ScoreKind = "logit"
    reduce: Reduce = "max_abs"


@register
class GuidedBackprop(Explainer):
    """Input gradient where every ReLU passes back only positive gradients at positive inputs.

    Notes
    -----
    Every rectifier is guided, module or functional call (``F.relu(x, inplace=True)`` in
    DenseNet's and Inception's ``forward`` included; ReLU6 inside (0, 6)); Captum's module
    hooks miss the functional ones and return the plain gradient there.

    Raises
    ------
    UnsupportedModelError
        When the model applies other element-wise non-linearities (SiLU, GELU, Hardswish,
        sigmoid gates, ...), for which the guided rule is not defined: the map would be
        the plain gradient there. The message names the functions and modules.

    References
    ----------
    J. T. Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR-W 2015.
    """

    spec = ExplainerSpec(
        name="guided_backprop",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.GRADIENT,
        summary="gradient with positive-only ReLU back-propagation",
        references=("springenberg2015",),
    )
    Params = GuidedBackpropParams
    mode = "guided"

    def refuse(self, example: Tensor) -> None:  # noqa: D102
        refuse_unguided(self.spec.name, self.model, example)

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        with relu_backward(self.model, self.mode):  # type: ignore[arg-type]
            grad = input_gradient(self.model, inputs, targets, self.p.score)
        return reduce_channels(grad, self.p.reduce)
