"""Grad-CAM (Selvaraju et al. 2017)."""

from __future__ import annotations

from torch import Tensor

from attriflow.explainers._cam import CAMExplainer
from attriflow.explainers._numerics import as_working
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


@register
class GradCAM(CAMExplainer):
    """Gradient-weighted class activation map.

    Channel weights are the spatial mean of the target score's gradient at ``layer``; the
    map is ``ReLU(sum_k w_k A_k)`` (the paper's ReLU can be switched off). The gradient is
    taken only down to ``layer``, not through the whole network.

    References
    ----------
    R. R. Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4, 3))
    >>> cam = GradCAM(net, layer="1")
    >>> tuple(cam.attribute(torch.rand(2, 3, 8, 8), torch.tensor([0, 2])).shape)
    (2, 8, 8)
    """

    spec = ExplainerSpec(
        name="grad_cam",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.CAM,
        access=("gradients", "activations"),
        summary="activations weighted by spatially averaged gradients",
        references=("selvaraju2017",),
    )

    def weighted(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """``w_k A_k`` (N, C, h, w), ``w_k`` the spatial mean of channel k's gradient."""
        assert grads is not None
        acts, grads = as_working(acts), as_working(grads)  # float32 sums for 16-bit tensors
        return grads.mean(dim=(2, 3), keepdim=True) * acts
