"""FEM, the Feature Explanation Method (Fuad et al. 2020)."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from attriflow.explainers._cam import CAMExplainer, CAMParams
from attriflow.explainers._hooks import capture_outputs
from attriflow.explainers._numerics import as_working
from attriflow.explainers.base import ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.registry import register


class FEMParams(CAMParams):
    """Parameters of :class:`FEM`."""

    k: float = Field(2.0, ge=0.0)


@register
class FEM(CAMExplainer):
    """Gradient-free map of strongly activated regions.

    Per channel, the positions whose activation reaches ``mu_k + K sigma_k`` (spatial mean
    and population standard deviation) form a binary mask weighted by ``mu_k``; the map is
    the weighted sum of the masks (seed-taxonomy.md, section 2; K = 2). Class-agnostic.

    References
    ----------
    K. A. A. Fuad et al., "Features Understanding in 3D CNNs for Actions Recognition in
    Video", IPTA 2020.
    """

    spec = ExplainerSpec(
        name="fem",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.CAM,
        access=("activations",),
        summary="channel-mean weighted masks of high activations (gradient-free)",
        references=("fuad2020",),
    )
    Params = FEMParams
    uses_gradients = False

    def refuse(self, example: Tensor) -> None:
        """Refuse a layer too small for the threshold: with ``n`` positions no activation
        lies more than ``sqrt(n - 1)`` population standard deviations above the mean, so
        for ``sqrt(n - 1) < K`` every mask is empty and the map all zero (a 2x2 layer at
        K = 2).

        Raises
        ------
        UnsupportedModelError
            Naming the layer, its size and ``k``.
        """
        super().refuse(example)
        name = self.layer_name(example)
        with capture_outputs(self.model, [name]) as acts, torch.no_grad():
            self.model(example)
        h, w = acts[name].shape[-2:]
        if math.sqrt(h * w - 1) < self.p.k:
            raise UnsupportedModelError(
                f"fem: layer {name!r} has {h}x{w} positions; with k = {self.p.k:g} no activation can "
                f"reach mean + k * std (it needs more than {int(self.p.k ** 2) + 1} positions), so the "
                "map would be all zero. Use a larger input or an earlier layer (params.layer)")

    def weighted(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """``mu_k * 1[A_k >= mu_k + K sigma_k]`` (N, C, h, w): each channel's weighted mask."""
        acts = as_working(acts)  # float32 for 16-bit activations: squares overflow float16
        mean = acts.mean(dim=(2, 3), keepdim=True)
        std = acts.std(dim=(2, 3), keepdim=True, unbiased=False)
        masks = (acts >= mean + self.p.k * std).to(acts.dtype)
        return mean * masks
