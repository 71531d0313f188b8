"""Attribution methods behind one batched interface (pure torch: no Prefect, no I/O)."""

from attriflow.explainers import methods  # noqa: F401  (registers every method)
from attriflow.explainers._hooks import LayerNotFoundError, default_cam_layer, get_layer
from attriflow.explainers.base import (
    TAXONOMY,
    Explainer,
    ExplainerParamError,
    ExplainerSpec,
    Family,
    UnsupportedModelError,
    validate_params,
)
from attriflow.explainers.registry import REGISTRY, get_explainer, list_explainers, register

__all__ = [
    "REGISTRY",
    "TAXONOMY",
    "Explainer",
    "ExplainerParamError",
    "ExplainerSpec",
    "Family",
    "UnsupportedModelError",
    "LayerNotFoundError",
    "default_cam_layer",
    "get_explainer",
    "get_layer",
    "list_explainers",
    "register",
    "validate_params",
]
