"""Finer-CAM (Zhang et al. 2025)."""

from __future__ import annotations

import warnings
from typing import Annotated

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from attriflow.explainers._cam import CAMParams
from attriflow.explainers._numerics import as_working
from attriflow.explainers.base import ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.methods.grad_cam import GradCAM
from attriflow.explainers.registry import register


class FinerCAMParams(CAMParams):
    """Parameters of :class:`FinerCAM` (pytorch-grad-cam's names and defaults)."""

    comparison_categories: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (1, 2, 3)
    alpha: float = 1.0


@register
class FinerCAM(GradCAM):
    """Grad-CAM of the target's score minus the scores of its most similar classes.

    Classes are ranked by how close their logit is to the target's, ``|z_k - z_t|``
    (rank 0 is the target, 1 the most similar other class; ties by class index);
    ``comparison_categories`` picks the ranks compared with (ranks beyond the number of
    classes are dropped, as in the peer). With ``p = softmax(z)`` and ``y`` the class scores
    of kind ``score`` (the logits by default), the explained score is

    ``S = sum_k p_k (y_t - alpha * y_k) / sum_k p_k``

    over the compared classes ``k`` (the weights are differentiated too; ``p_k / sum_j p_j``
    is computed as the softmax of the compared logits alone), and the map is Grad-CAM's:
    ``ReLU(sum_c mean_{h,w}(dS/dA_c) A_c)``. ``alpha = 0`` gives Grad-CAM of ``y_t``;
    ``alpha = 1`` removes what the target shares with its neighbours.

    Equal to pytorch-grad-cam's ``FinerCAM`` (``finer_cam.py``, base method ``GradCAM``,
    target ``FinerWeightedTarget``) called with ``target_idx`` = the target and the same
    ``alpha`` / ``comparison_categories``, after its ReLU, min-max scaling and resize (the
    test). pytorch-grad-cam ranks by proximity to the predicted class unless given
    ``target_idx`` (one class for the whole batch); here each image's own target is the
    reference. Only the Grad-CAM base is implemented (pytorch-grad-cam's default).

    One deviation: pytorch-grad-cam divides by ``sum_k p_k + 1e-9`` with ``p`` the softmax
    over all classes. The two agree within ``1e-9 / sum_k p_k`` (relative) while the
    compared classes keep some probability; when the target's softmax saturates
    (``sum_k p_k`` below about 1e-9: float32 probabilities of exactly 0 on a confident
    prediction) its guard dominates, and its map is the gradient of ``sum_k p_k (...) / 1e-9``
    (a different direction) or, in float32, all zero. Ours stays the weighted mean of
    differences (the test compares it there with pytorch-grad-cam's ``GradCAM`` of that
    score).

    Raises
    ------
    UnsupportedModelError
        For a model with a single output (no class to compare with), or when every rank in
        ``comparison_categories`` is beyond the number of classes.

    References
    ----------
    Z. Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details for Visual
    Explanation", CVPR 2025; pytorch-grad-cam 1.5.7 ``pytorch_grad_cam.FinerCAM``.
    """

    spec = ExplainerSpec(
        name="finer_cam",
        family=Family.CAM,
        access=("gradients", "activations"),
        summary="Grad-CAM of the target score minus those of its most similar classes",
        references=("zhang2025",),
    )
    Params = FinerCAMParams

    def refuse(self, example: Tensor) -> None:
        """Refuse a layer without spatial output (:meth:`CAMExplainer.refuse`) and a model with
        a single output."""
        super().refuse(example)
        classes = self.__dict__.get("_classes")
        if classes is not None and classes < 2:
            raise UnsupportedModelError(
                f"{self.spec.name}: the model has a single output, so there is no class to compare the "
                "target with; use grad_cam")
        if classes is not None and min(self.p.comparison_categories) >= classes:
            raise UnsupportedModelError(
                f"{self.spec.name}: params.comparison_categories {list(self.p.comparison_categories)} are "
                f"all ranks beyond the model's {classes} classes; use ranks below {classes}")
        dropped = [r for r in self.p.comparison_categories if classes is not None and r >= classes]
        if dropped and "comparison_categories" in self.p.model_fields_set:  # the default (1, 2, 3) is not
            warnings.warn(f"{self.spec.name}: params.comparison_categories {dropped} are beyond the model's "
                          f"{classes} classes and are left out (as pytorch-grad-cam does)", UserWarning,
                          stacklevel=2)

    def scores(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The explained score ``S`` of each image, shape (N,), in working precision."""
        z = as_working(logits)
        k = z.shape[1]
        index = targets[:, None]
        gap = (z - z.gather(1, index)).abs().detach()
        gap.scatter_(1, index, -1.0)  # the target is rank 0 even if another logit ties with it
        order = torch.sort(gap, dim=1, stable=True).indices
        ranks = [r for r in self.p.comparison_categories if r < k]
        if not ranks:
            raise UnsupportedModelError(
                f"{self.spec.name}: comparison_categories {self.p.comparison_categories} are all beyond "
                f"the model's {k} classes")
        compared = order[:, ranks]  # (N, R) the most similar classes
        if self.p.score == "prob":
            y = torch.softmax(z, dim=1)
        elif self.p.score == "log_prob":
            y = torch.log_softmax(z, dim=1)
        else:
            y = z
        # p_k / sum_j p_j over the compared classes is the softmax of their logits alone: the
        # normaliser of the full softmax cancels, so the weights never underflow to 0 / 0
        weights = torch.softmax(z.gather(1, compared), dim=1)
        diff = y.gather(1, index) - self.p.alpha * y.gather(1, compared)
        return (weights * diff).sum(dim=1)
