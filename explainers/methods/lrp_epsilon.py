"""LRP with the epsilon rule on every layer (Bach et al. 2015)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from attriflow.explainers._gradients import Reduce, reduce_channels
from attriflow.explainers._lrp import Rule, check_supported, low_precision, lrp, trace_layers
from attriflow.explainers.base import Explainer, ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.registry import register


class LRPEpsilonParams(BaseModel):
    """Parameters of :class:`LRPEpsilon`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epsilon: float = Field(0.25, ge=0.0)
    reduce: Reduce = "sum"


@register
class LRPEpsilon(Explainer):
    """Relevance of the target logit, ``R_j = sum_k a_j w_jk R_k / (z_k + eps sign z_k)``.

    ``epsilon = 0`` (with zennit's 1e-6 floor for zeros) is LRP-0. BatchNorm is folded into
    the preceding convolution. The initial relevance is the target logit, so the map sums
    to about that logit on bias-free ReLU networks (zennit's ``attr_output = one_hot *
    output``). See :mod:`explainers._lrp` for the implementation, the rules for activations
    other than ReLU (pass rule), squeeze-excitation gates (Arras et al.), LayerNorm (Ali et
    al. 2022), sums and concatenation, and the computations that are refused.

    Inputs are (N, C, H, W) float64, float32, or 16-bit for a ``model.half()`` model;
    ``torch.autocast`` regions are honoured. Rule arithmetic runs in float32 for 16-bit
    tensors.

    Raises
    ------
    UnsupportedModelError
        From :meth:`resolve` and ``attribute`` when the model computes something LRP has no
        rule for (GroupNorm, softmax/attention, a product of two same-shape activations,
        ...), naming it and its modules; and when a 16-bit run gives a non-finite map.

    References
    ----------
    S. Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by
    Layer-Wise Relevance Propagation", PLoS ONE 2015.
    """

    spec = ExplainerSpec(
        name="lrp_epsilon",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.RELEVANCE,
        summary="LRP, epsilon rule on every layer",
        references=("bach2015",),
    )
    Params = LRPEpsilonParams

    def rule_for(self, layer: nn.Module, first: bool) -> Rule:
        """The rule of ``layer``."""
        return Rule("epsilon", epsilon=self.p.epsilon or 1e-6)

    def resolve(self, example: Tensor) -> None:
        """Check that LRP has a rule for every computation of the model.

        Parameters
        ----------
        example : Tensor, shape (1, C, H, W)
            An input of the run's size.

        Raises
        ------
        UnsupportedModelError
            Naming the function(s) without a rule and the modules that call them.
        """
        self._check(example)

    def _check(self, example: Tensor) -> None:
        key = (tuple(example.shape[1:]), example.dtype, example.device)
        if getattr(self, "_checked_key", None) != key:  # one forward pass of one image
            check_supported(self.model, example[:1], self.spec.name)
            self._checked_key = key

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        self._check(inputs)
        key = (tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
        if getattr(self, "_traced_key", None) != key:  # the layer order and BatchNorm folds
            self._traced = trace_layers(self.model, inputs[:1])
            self._traced_key = key
        relevance = lrp(self.model, inputs, targets, self.rule_for, self._traced)
        low = low_precision(inputs)
        if low is not None and not bool(torch.isfinite(relevance).all()):
            raise UnsupportedModelError(
                f"{self.spec.name}: relevance is not finite in {low} (a carried gradient left the "
                f"range of {low}); run this model in float32 or bfloat16 instead of float16")
        return reduce_channels(relevance, self.p.reduce)
