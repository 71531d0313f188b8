"""Layer-CAM (Jiang et al. 2021)."""

from __future__ import annotations

from torch import Tensor

from attriflow.explainers._cam import CAMExplainer
from attriflow.explainers._numerics import as_working
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


@register
class LayerCAM(CAMExplainer):
    """Element-wise weighting: ``ReLU(sum_k relu(g_k) * A_k)``; suited to shallow layers too.

    References
    ----------
    P.-T. Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for
    Localization", IEEE TIP 2021.
    """

    spec = ExplainerSpec(
        name="layer_cam",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.CAM,
        access=("gradients", "activations"),
        summary="activations weighted element-wise by positive gradients",
        references=("jiang2021",),
    )

    def weighted(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """``relu(g) * A`` (N, C, h, w), position by position."""
        assert grads is not None
        acts, grads = as_working(acts), as_working(grads)  # float32 sums for 16-bit tensors
        return grads.clamp_min(0) * acts
