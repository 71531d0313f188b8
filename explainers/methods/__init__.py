"""One import line per method: importing this package registers every explainer."""

from explainers.methods import grad_cam, saliency  # noqa: F401
