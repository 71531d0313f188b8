"""One import line per method: importing this package registers every explainer."""

from explainers.methods import (  # noqa: F401
    cam,
    deconvnet,
    eigen_cam,
    fem,
    grad_cam,
    grad_cam_plus_plus,
    gradient_x_input,
    guided_backprop,
    guided_grad_cam,
    integrated_gradients,
    layer_cam,
    occlusion,
    rise,
    saliency,
    score_cam,
    smooth_grad,
    xgrad_cam,
)
