"""DeconvNet (Zeiler & Fergus 2014)."""

from __future__ import annotations

from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.methods.guided_backprop import GuidedBackprop
from attriflow.explainers.registry import register


@register
class DeconvNet(GuidedBackprop):
    """Back-projection where every ReLU passes back the positive part of the gradient,
    ignoring the forward activation pattern (Guided Backprop's pass with ``mode="deconv"``).

    References
    ----------
    M. D. Zeiler, R. Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014.
    """

    spec = ExplainerSpec(
        name="deconvnet",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.GRADIENT,
        summary="back-projection through rectified ReLU gradients",
        references=("zeiler2014",),
    )
    mode = "deconv"
