"""The shared part of the sanity baselines (family ``baseline``): maps that read no model.

Adebayo et al. (2018) showed that an edge detector, which knows nothing of the model,
produces maps that look like many saliency methods' maps. A method's scores mean something
only where they beat such "no information" maps, so every evaluation can carry them.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from attriflow.explainers.base import Explainer, ExplainerSpec


class BaselineExplainer(Explainer):
    """An explainer whose map does not depend on the model or the target.

    ``attribute`` still checks the model's output once (like every explainer), but the map
    costs no forward or backward pass.
    """

    spec: ClassVar[ExplainerSpec]

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": 0, "backward": 0}
