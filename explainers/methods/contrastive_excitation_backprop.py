"""Contrastive Excitation Backprop (Zhang et al., ECCV 2016 / IJCV 2018), as TorchRay computes it."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from attriflow.explainers._hooks import get_layer, trace
from attriflow.explainers.base import ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.methods.excitation_backprop import ExcitationBackprop, excitation_signal, resize
from attriflow.explainers.registry import register

_CLASSIFIER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def default_classifier_layer(model: nn.Module, example: Tensor) -> str:
    """The last Conv/Linear module called in a forward pass (the one computing the logits).

    TorchRay's ``_get_classifier_layer`` takes the last Conv/Linear module in parameter
    order; the call order is the same for sequential heads and does not depend on the order
    the modules were declared in.

    Raises
    ------
    UnsupportedModelError
        When the forward pass calls no Conv/Linear module, or calls the last one more than once.
    """
    calls = [c for c in trace(model, example[:1]) if isinstance(c.module, _CLASSIFIER_TYPES)]
    if not calls:
        raise UnsupportedModelError(
            "contrastive_excitation_backprop: found no Conv/Linear module for params.classifier_layer "
            "(the layer computing the logits); set it")
    last = calls[-1]
    if sum(c.module is last.module for c in calls) > 1:
        raise UnsupportedModelError(
            f"contrastive_excitation_backprop: the last Conv/Linear module {last.name!r} is called more than "
            "once per forward pass; set params.classifier_layer to the layer computing the logits")
    return last.name


class ContrastiveExcitationBackpropParams(BaseModel):
    """Parameters of :class:`ContrastiveExcitationBackprop`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layer: str | None = None
    classifier_layer: str | None = None


@register
class ContrastiveExcitationBackprop(ExcitationBackprop):
    """Contrastive Excitation Backprop: the target's winning probability minus that of its
    "dual" (the target unit with negated classifier weights), at a layer, clamped at 0.

    With ``P`` Excitation Backprop's signal (:class:`ExcitationBackprop`) and ``C`` the same
    signal with the classifier layer's weights negated (``w -> -w`` in that layer's
    backward only, so its excitatory weights are the target's inhibitory ones), the map is
    ``max(sum_c (P - C), 0)`` at the output of ``layer``, bilinearly resized to the input.
    ``P`` and ``C`` each sum to 1 at the classifier's input, so the unclamped difference
    sums to 0 there.

    Equal to TorchRay's ``contrastive_excitation_backprop(model, x, t, saliency_layer=layer,
    contrast_layer=..., classifier_layer=..., resize=True)[:, 0]`` (for torchvision ResNets
    on ``update_resnet(model)``, see :mod:`explainers.methods.excitation_backprop`).
    TorchRay makes two passes: one with the classifier negated to record ``C`` at a
    ``contrast_layer``, one that subtracts it there. Every EB rule is linear in the signal
    it carries (the activations are fixed), so for any contrast layer that all paths from
    ``layer`` to the classifier cross (a block output, the classifier's input), the result
    is the same as subtracting at the classifier's input, which is what is computed here,
    in one forward and one backward pass (the classifier's backward is ``P``'s part minus
    ``C``'s). There is therefore no ``contrast_layer`` parameter; a contrast layer on one
    branch only, or below ``layer`` (where TorchRay subtracts nothing), is a TorchRay
    setting not reproduced.

    Read right below a 1 x 1-convolution classifier (SqueezeNet's ``features``), ``P`` and
    ``C`` both sum to each position's signal, so the map is 0 up to rounding (TorchRay's
    too); read it deeper (``features.11``) there.

    Parameters
    ----------
    layer : str or None
        As :class:`ExcitationBackprop` (default: the last module with a spatial output).
    classifier_layer : str or None
        The Conv/Linear module whose weights are negated. None (default): the last Conv/Linear
        module called in the forward pass (the layer computing the logits, ``fc`` /
        ``classifier.6``), TorchRay's automatic choice.

    Raises
    ------
    UnsupportedModelError
        As :class:`ExcitationBackprop`; when no classifier layer is found or the configured
        one is not a Conv/Linear module or not between ``layer`` and the logits (naming
        ``classifier_layer``).

    References
    ----------
    J. Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016, Sec. 3.3;
    TorchRay ``torchray.attribution.excitation_backprop.contrastive_excitation_backprop``.
    """

    spec = ExplainerSpec(
        name="contrastive_excitation_backprop",
        family=Family.RELEVANCE,
        summary="Excitation Backprop of the target minus its negated-classifier dual, clamped",
        references=("zhang2016",),
    )
    Params = ContrastiveExcitationBackpropParams

    def __init__(self, model: nn.Module, **params: Any) -> None:
        super().__init__(model, **params)
        if self.p.classifier_layer is not None:
            module = get_layer(model, self.p.classifier_layer)
            if not isinstance(module, _CLASSIFIER_TYPES):
                raise UnsupportedModelError(
                    f"{self.spec.name}: params.classifier_layer {self.p.classifier_layer!r} is a "
                    f"{type(module).__name__}, not a Conv/Linear layer")

    def resolve(self, example: Tensor) -> None:  # noqa: D102
        super().resolve(example)
        if self.p.classifier_layer is None:
            self.resolved["classifier_layer"] = default_classifier_layer(self.model, example[:1])

    def classifier_name(self, example: Tensor) -> str:
        """The configured classifier layer, or the automatically found one."""
        if self.p.classifier_layer is not None:
            return str(self.p.classifier_layer)
        if "classifier_layer" not in self.resolved:
            self.resolve(example)
        return str(self.resolved["classifier_layer"])

    def layer_map(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """``sum_c (P - C)`` at the layer, shape (N, h, w), before the clamp and resizing."""
        classifier = get_layer(self.model, self.classifier_name(inputs))
        return excitation_signal(self.model, inputs, targets, self.layer_name(inputs), self.spec.name,
                                 classifier=classifier)

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        return resize(self.layer_map(inputs, targets).clamp_min(0), tuple(inputs.shape[-2:]))
