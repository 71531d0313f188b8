"""Shapley-CAM (Cai et al. 2025)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel
from torch import Tensor

from attriflow.explainers._cam import CAMParams
from attriflow.explainers._hooks import capture_outputs
from attriflow.explainers._numerics import as_working
from attriflow.explainers._scores import target_scores
from attriflow.explainers.base import ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.methods.grad_cam import GradCAM
from attriflow.explainers.registry import register


class ShapleyCAMParams(CAMParams):
    """Parameters of :class:`ShapleyCAM`; ``score="rest"`` is the paper's ReST target."""

    score: Literal["logit", "log_prob", "prob", "rest"] = "logit"  # type: ignore[assignment]


def shapley_scores(logits: Tensor, targets: Tensor, kind: str) -> Tensor:
    """Target score per image, (N,): :func:`explainers._scores.target_scores`, or for
    ``"rest"`` the residual softmax target ``logit_t + log_softmax_t`` (= logit minus the
    cross-entropy; pytorch-grad-cam's ``ClassifierOutputReST``)."""
    if kind == "rest":
        return logits.gather(1, targets[:, None])[:, 0] + torch.log_softmax(logits, dim=1).gather(
            1, targets[:, None])[:, 0]
    return target_scores(logits, targets, kind)  # type: ignore[arg-type]


@register
class ShapleyCAM(GradCAM):
    """Activations weighted by the gradient corrected with a Hessian-vector product.

    With ``A`` the activations of ``layer`` (N, C, h, w), ``g = dS/dA`` and ``H A`` the
    Hessian of the target score ``S`` with respect to ``A`` applied to ``A`` itself (a
    double backward), the channel weights are ``w_c = mean_{h,w} (g - H A / 2)_c`` and the
    map is ``ReLU(sum_c w_c A_c)``: the second-order Taylor estimate of each channel's
    Shapley value (the paper's eq. 9-10). Equal to pytorch-grad-cam's ``ShapleyCAM``
    (``shapley_cam.py``: ``weight = mean(grads - 0.5 * hvp)`` with
    ``hvp = autograd.grad(grads, activations, grad_outputs=activations)``) after its
    ReLU, min-max scaling and resize, the test; ``score="logit"`` is its
    ``ClassifierOutputTarget``, ``"prob"`` its ``ClassifierOutputSoftmaxTarget`` and
    ``"rest"`` its ``ClassifierOutputReST`` (``logit - cross_entropy``, the paper's
    recommended target). The gradient and the Hessian-vector product are taken only as
    deep as ``layer``.

    When is ``H A`` zero? The second derivative of a piecewise-linear function (ReLU,
    max-pool, convolution, eval-mode batch norm, average pool, linear) is zero, so for a
    ReLU network whose score is the logit (the default) the correction vanishes and
    Shapley-CAM is Grad-CAM exactly; that is the method's answer there, not a failure. It
    differs where the score is not linear in the logits (``prob``, ``log_prob``, ``rest``)
    or the network after ``layer`` has smooth parts (SiLU, GELU, sigmoid gates, LayerNorm).

    :meth:`activations` returns ``(A, g - H A / 2)``: the corrected gradient, whose spatial
    mean is the weight (:meth:`weighted`). One forward, one backward with a graph and one
    double backward, down to ``layer``.

    Raises
    ------
    UnsupportedModelError
        When the model's backward pass after ``layer`` cannot be differentiated again (a
        custom autograd function marked ``@once_differentiable`` or computing its backward
        outside autograd, an operation without a double backward), which would make the
        Hessian term silently 0: the message names the layer and quotes PyTorch's error.
        Found by :meth:`check` on one image: the backward is seeded with a ones vector that
        tracks gradients and the double backward also runs to that seed; a non-zero gradient
        that does not depend on the seed has lost its graph, whereas one that does not depend
        on ``A`` (a linear head after the layer) legitimately has ``H A = 0``.

    References
    ----------
    H. Cai et al., "CAMs as Shapley Value-based Explainers", arXiv:2501.06261, 2025;
    pytorch-grad-cam 1.5.7 ``pytorch_grad_cam.ShapleyCAM``.
    """

    spec = ExplainerSpec(
        name="shapley_cam",
        family=Family.CAM,
        access=("gradients", "activations"),
        summary="activations weighted by the gradient minus half a Hessian-vector product",
        references=("cai2025",),
    )
    Params = ShapleyCAMParams

    @classmethod
    def pass_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": 1, "backward": 2}  # the gradient (with its graph) and the double backward

    def refuse(self, example: Tensor) -> None:
        """Refuse a layer without spatial output (:meth:`CAMExplainer.refuse`) and a model whose
        backward cannot be differentiated (one image's Hessian-vector product is tried)."""
        super().refuse(example)
        self._corrected(example[:1], torch.zeros(1, dtype=torch.int64, device=example.device), probe=True)

    def activations(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        """Activations ``A`` (N, C, h, w) and the corrected gradients ``g - H A / 2`` (N, C, h, w)
        in :func:`explainers._numerics.working_dtype`."""
        return self._corrected(inputs, targets, probe=False)

    def _corrected(self, inputs: Tensor, targets: Tensor, probe: bool) -> tuple[Tensor, Tensor]:
        """:meth:`activations`; with ``probe`` the double backward also runs to the seed, through
        every backward step after the layer, so one that cannot be differentiated raises here
        (the check's one-image trial) instead of dropping out of the Hessian silently."""
        name = self.layer_name(inputs)
        with capture_outputs(self.model, [name]) as acts, torch.enable_grad():
            for p in self.model.parameters():
                p.requires_grad_(False)  # restored by attribute(); no weight gradients
            x = inputs.detach().clone().requires_grad_(True)
            scores = shapley_scores(self.model(x), targets, self.p.score)
            act = acts[name]
            # the backward is seeded with ones that track gradients: the true gradient is linear
            # in the seed, so one without a graph means a backward step that cannot be
            # differentiated (a custom function's); one that does not depend on A has H = 0
            seed = torch.ones_like(scores).requires_grad_(True)
            why = "its gradient has no graph (a backward step that cannot be differentiated)"
            try:
                (grad,) = torch.autograd.grad(scores, act, grad_outputs=seed, create_graph=True)
                hvp = None
                if grad.requires_grad:
                    wrt = (act, seed) if probe else (act,)
                    found = torch.autograd.grad(grad, wrt, grad_outputs=act.detach(), allow_unused=True)
                    hvp = found[0]
                    if probe and found[1] is None and bool(grad.detach().ne(0).any()):
                        grad = None  # a non-zero gradient that does not depend on the seed: cut
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                why = f"PyTorch cannot: {err}"
                grad = None
            if grad is None or not grad.requires_grad:
                raise UnsupportedModelError(
                    f"{self.spec.name}: the Hessian-vector product at layer {name!r} needs a double "
                    f"backward through the model after it, and {why}; use grad_cam (Shapley-CAM's "
                    "first-order term)")
        corrected = as_working(grad.detach())
        if hvp is not None:
            corrected = corrected - 0.5 * as_working(hvp.detach())
        return act.detach(), corrected
