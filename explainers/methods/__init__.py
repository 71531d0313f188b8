"""One import line per method: importing this package registers every explainer."""

from explainers.methods import (  # noqa: F401
    deconvnet,
    grad_cam,
    gradient_x_input,
    guided_backprop,
    integrated_gradients,
    saliency,
    smooth_grad,
)
