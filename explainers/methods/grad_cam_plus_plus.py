"""Grad-CAM++ (Chattopadhay et al. 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from attriflow.explainers._cam import CAMExplainer
from attriflow.explainers._numerics import as_working, guard
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


@register
class GradCAMPlusPlus(CAMExplainer):
    """Grad-CAM with pixel-wise weighting of positive gradients.

    With the exponential-score assumption of the paper (eq. 19), higher derivatives are
    powers of the first: ``a = g^2 / (2 g^2 + sum(A) g^3 + 1e-6)`` where ``g != 0`` (else 0),
    ``w_k = sum_ij a_ij relu(g_ij)``, map ``ReLU(sum_k w_k A_k)``; the constant 1e-6 is
    pytorch-grad-cam's. Computed in float32 for float16 / bfloat16 activations and gradients
    (where ``g^3`` underflows and the constant would round), see :mod:`explainers._numerics`.

    References
    ----------
    A. Chattopadhay et al., "Grad-CAM++: Generalized Gradient-Based Visual Explanations for
    Deep Convolutional Networks", WACV 2018.
    """

    spec = ExplainerSpec(
        name="grad_cam_plus_plus",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.CAM,
        access=("gradients", "activations"),
        summary="activations weighted by positive gradients with pixel-wise coefficients",
        references=("chattopadhay2018",),
    )

    def weighted(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """``w_k A_k`` (N, C, h, w) with the Grad-CAM++ weights ``w_k``."""
        assert grads is not None
        acts, grads = as_working(acts), as_working(grads)  # float32 for 16-bit: g^3 underflows
        g2 = grads * grads
        g3 = g2 * grads
        total = acts.sum(dim=(2, 3), keepdim=True)
        a = g2 / (2 * g2 + total * g3 + guard(1e-6, g2.dtype))
        a = torch.where(grads != 0, a, torch.zeros_like(a))
        weights = (grads.clamp_min(0) * a).sum(dim=(2, 3), keepdim=True)
        return weights * acts
