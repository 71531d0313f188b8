"""Random map: the "no information" baseline (Adebayo et al. 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from attriflow.explainers._baseline import BaselineExplainer
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


@register
class RandomMap(BaselineExplainer):
    """Independent uniform values in [0, 1) at every pixel, ignoring model and target.

    Each image's values come from its own generator (seeded from the run seed, the sample
    and the method), drawn on the CPU in float32, so a sample's map does not depend on its
    batch, device or the other samples. Every metric should score a real method above this
    map; one that does not is not using the model.

    Returns float32 maps of shape (N, H, W).

    References
    ----------
    J. Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018.
    """

    spec = ExplainerSpec(
        name="random_map",
        family=Family.BASELINE,
        access=(),
        stochastic=True,
        summary="uniform random values (seeded per sample): the no-information baseline",
        references=("adebayo2018",),
        needs_internals=False,
    )

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        n, _, h, w = inputs.shape
        gens = generators or [torch.Generator().manual_seed(0) for _ in range(n)]
        maps = torch.stack([torch.rand((h, w), generator=g, dtype=torch.float32) for g in gens])
        return maps.to(inputs.device)
