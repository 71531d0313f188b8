"""XGrad-CAM (Fu et al. 2020)."""

from __future__ import annotations

from torch import Tensor

from attriflow.explainers._cam import CAMExplainer
from attriflow.explainers._numerics import as_working, guard
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


@register
class XGradCAM(CAMExplainer):
    """Axiom-based Grad-CAM: ``w_k = sum_ij g_ij A_ij / (sum_ij A_ij + 1e-7)``.

    Computed in float32 for float16 / bfloat16 activations (the guard would round to a
    subnormal and the sums can overflow), see :mod:`explainers._numerics`.

    References
    ----------
    R. Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of
    CNNs", BMVC 2020.
    """

    spec = ExplainerSpec(
        name="xgrad_cam",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.CAM,
        access=("gradients", "activations"),
        summary="activations weighted by activation-normalised gradients",
        references=("fu2020",),
    )

    def weighted(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """``w_k A_k`` (N, C, h, w) with the XGrad-CAM weights ``w_k``."""
        assert grads is not None
        acts, grads = as_working(acts), as_working(grads)  # float32 sums for 16-bit tensors
        weights = (grads * acts).sum(dim=(2, 3), keepdim=True) / (acts.sum(dim=(2, 3), keepdim=True)
                                                                 + guard(1e-7, acts.dtype))
        return weights * acts
