"""Shared machinery of class-activation-map explainers.

A CAM method computes a map at the resolution of one layer from that layer's activations
(and, for gradient CAMs, the target score's gradient with respect to them); this base
class finds the layer, records activations (and gradients, taken only as deep as the
layer), applies the optional ReLU and upsamples bilinearly to the input size. It also
gives every CAM pytorch-grad-cam's two smoothing options (``BaseCAM.__call__``'s
``eigen_smooth`` and ``aug_smooth``), see :class:`CAMParams`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn

from attriflow.explainers._hooks import capture_outputs, default_cam_layer, get_layer, spatial_layers
from attriflow.explainers._numerics import as_working, minmax_scale
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers._typing import JSONValue
from attriflow.explainers.base import Explainer, ExplainerParamError, UnsupportedModelError

#: pytorch-grad-cam's default test-time augmentations (``BaseCAM.__init__``:
#: ``tta.Compose([tta.HorizontalFlip(), tta.Multiply(factors=[0.9, 1, 1.1])])``), in ttach's
#: product order: (horizontal flip, factor the input is multiplied by).
AUGMENTATIONS: tuple[tuple[bool, float], ...] = (
    (False, 0.9), (False, 1.0), (False, 1.1), (True, 0.9), (True, 1.0), (True, 1.1))

#: Denominator guard of pytorch-grad-cam's ``scale_cam_image`` (min-max scaling).
_SCALE_EPS = 1e-7


class CAMParams(BaseModel):
    """Parameters shared by CAM explainers.

    Attributes
    ----------
    layer : str or None
        Module whose output is explained; None: the last module with a spatial output.
    score : {"logit", "prob", "log_prob"}
        The target's score whose gradient (or value) weighs the channels.
    relu : bool
        Clamp the layer map at 0 (the papers' ReLU).
    eigen_smooth : bool
        pytorch-grad-cam's ``eigen_smooth=True`` (``BaseCAM.get_cam_image``): the layer map
        is the projection of the per-channel weighted activations (the (N, C, h, w) tensor
        whose channel sum is the method's map) on their first principal component over
        positions (``get_2d_projection``), instead of their channel sum. The component's
        sign is arbitrary (pytorch-grad-cam keeps LAPACK's); ours is oriented to correlate
        positively with the unsmoothed map (:func:`first_component`). Only for CAMs whose
        map is such a channel sum; the others refuse it with :class:`ExplainerParamError`.
    aug_smooth : bool
        pytorch-grad-cam's ``aug_smooth=True`` (``BaseCAM.forward_augmentation_smoothing``):
        the map is computed for the input, its horizontal flip, and both multiplied by 0.9
        and 1.1 (six copies, ttach's ``HorizontalFlip`` x ``Multiply([0.9, 1, 1.1])``);
        each map is upsampled, min-max scaled to [0, 1] as pytorch-grad-cam scales every
        map before averaging, flipped back and the six are averaged at input resolution.
        The result lies in [0, 1] and costs six passes. Needs ``relu=True`` (a signed map's
        zero would move under the min-max scaling).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    layer: str | None = None
    score: ScoreKind = "logit"
    relu: bool = True
    eigen_smooth: bool = False
    aug_smooth: bool = False

    @model_validator(mode="after")
    def _aug_needs_relu(self) -> CAMParams:
        if self.aug_smooth and not self.relu:
            raise ValueError(
                "aug_smooth=True needs relu=True: it averages the augmented maps min-max scaled to "
                "[0, 1] (pytorch-grad-cam's forward_augmentation_smoothing), which moves a signed "
                "map's zero; set relu=True or aug_smooth=False")
        return self


#: Parameters left out of ``params()`` (and so of the provenance digest) at their default
#: False, so that stores written before they existed keep their entries.
_SMOOTHING = ("eigen_smooth", "aug_smooth")


class CAMExplainer(Explainer):
    """Base of CAM explainers: subclasses implement :meth:`weighted` or :meth:`combine`.

    A CAM whose layer map is the channel sum of a per-channel (N, C, h, w) tensor (weights
    times activations) implements :meth:`weighted`; :meth:`combine` sums it and
    ``eigen_smooth`` projects it. A CAM whose map is no such sum (a principal component)
    overrides :meth:`combine` and refuses ``eigen_smooth`` (reason in
    ``eigen_smooth_refusal``). A subclass changes the single-pass map by overriding
    :meth:`layer_map` or :meth:`input_map`, not ``_attribute`` (which applies
    ``aug_smooth``; a subclass that overrides it refuses ``aug_smooth``).

    ``layer`` defaults to the last module with a spatial output (the last convolutional
    block); a module called several times in one forward pass contributes its last call.
    Maps are upsampled with ``F.interpolate(mode="bilinear", align_corners=False)``
    (half-pixel centres, as ``cv2.resize``), never min-max scaled (except by ``aug_smooth``).

    Raises
    ------
    ExplainerParamError
        At construction, for ``eigen_smooth=True`` on a CAM without :meth:`weighted` and
        ``aug_smooth=True`` on one that overrides ``_attribute`` (naming method and reason).
    """

    Params: ClassVar[type[BaseModel]] = CAMParams
    uses_gradients: ClassVar[bool] = True
    #: why ``eigen_smooth`` does not apply, for a subclass without :meth:`weighted`
    eigen_smooth_refusal: ClassVar[str] = "its map is not a channel sum of weighted activations to project"

    def __init__(self, model: nn.Module, **params: Any) -> None:
        super().__init__(model, **params)
        if self.p.eigen_smooth and not type(self).has_weighted():
            raise ExplainerParamError(f"explainer {self.spec.name!r}: eigen_smooth=True does not apply: "
                                      f"{self.eigen_smooth_refusal}")
        if self.p.aug_smooth and type(self)._attribute is not CAMExplainer._attribute:
            raise ExplainerParamError(f"explainer {self.spec.name!r}: aug_smooth=True is not supported: the "
                                      "method computes its map in its own _attribute, which the augmentation "
                                      "does not wrap")
        if self.p.layer is not None:
            get_layer(model, self.p.layer)  # fail early with the list of valid names

    @classmethod
    def has_weighted(cls) -> bool:
        """True when the class implements :meth:`weighted` (and so supports ``eigen_smooth``)."""
        return cls.weighted is not CAMExplainer.weighted

    def params(self) -> dict[str, JSONValue]:
        """Parameters as JSON (see :meth:`Explainer.params`), without ``eigen_smooth`` and
        ``aug_smooth`` when they are False: a map computed before these options existed
        keeps its provenance digest."""
        out = super().params()
        for key in _SMOOTHING:
            if out.get(key) is False:
                del out[key]
        return out

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:
        """Passes per image: :meth:`pass_cost`, six times with ``aug_smooth``."""
        single = cls.pass_cost(params)
        if not getattr(params, "aug_smooth", False):
            return single
        k = len(AUGMENTATIONS)
        return {key: v * k if isinstance(v, int) else f"{k} x ({v})" for key, v in single.items()}

    @classmethod
    def pass_cost(cls, params: BaseModel) -> dict[str, int | str]:
        """Passes per image of one map, without augmentation (override this, not
        :meth:`estimate_cost`)."""
        return super().estimate_cost(params)

    def refuse(self, example: Tensor) -> None:
        """Refuse a configured layer without a spatial output: a CAM weighs the layer's
        (N, C, h, w) feature maps, so a layer whose output is not 4-D (a classifier, a
        flatten) cannot be explained, and one of 1 x 1 positions (the global pooling) gives
        a constant map. Subclasses that refuse more call this first.

        Raises
        ------
        UnsupportedModelError
            Naming the layer, its output shape and the spatial layers that work.
        """
        if self.p.layer is None:
            return  # the automatic layer is the last spatial one
        name = str(self.p.layer)
        with capture_outputs(self.model, [name]) as acts, torch.no_grad():
            self.model(example[:1])
        shape = tuple(acts[name].shape)
        if len(shape) == 4 and shape[-1] * shape[-2] > 1:
            return
        what = "1 x 1 positions: every map would be constant" if len(shape) == 4 else \
            "no (N, C, h, w) feature maps to weigh"
        usable = ", ".join(n for n, _ in spatial_layers(self.model, example[:1])[-6:])
        raise UnsupportedModelError(
            f"{self.spec.name}: params.layer {name!r} outputs shape {shape}, {what}; use a convolutional "
            f"layer (the last spatial ones: {usable})")

    def resolve(self, example: Tensor) -> None:
        """Fix the automatically found target layer (recorded in ``params()``)."""
        if self.p.layer is None:
            self.resolved["layer"] = default_cam_layer(self.model, example[:1])

    def layer_name(self, example: Tensor) -> str:
        """Target layer: the configured one or the automatically found last block."""
        if self.p.layer is not None:
            return str(self.p.layer)
        if "layer" not in self.resolved:
            self.resolve(example)
        return str(self.resolved["layer"])

    def activations(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        """Activations (N, C, h, w) of the layer and, for gradient CAMs, their gradients."""
        name = self.layer_name(inputs)
        with capture_outputs(self.model, [name]) as acts:
            if not self.uses_gradients:
                with torch.no_grad():
                    self.model(inputs)
                return acts[name].detach(), None
            with torch.enable_grad():
                for p in self.model.parameters():
                    p.requires_grad_(False)  # restored by attribute(); no weight gradients
                x = inputs.detach().clone().requires_grad_(True)
                scores = self.scores(self.model(x), targets)
                act = acts[name]
                (grad,) = torch.autograd.grad(scores.sum(), act)
        return act.detach(), grad.detach()

    def scores(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The scores (N,) whose gradients a gradient CAM reads: the target's ``params.score``
        (override for another objective, as Finer-CAM's contrast with similar classes)."""
        return target_scores(logits, targets, self.p.score)

    def weighted(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """The per-channel weighted activations, shape (N, C, h, w), whose channel sum is the
        method's layer map (pytorch-grad-cam's ``weighted_activations``); the subject of
        ``eigen_smooth``. Not every CAM has one (see :meth:`has_weighted`)."""
        raise NotImplementedError

    def combine(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """The method's map at layer resolution, shape (N, h, w), before the ReLU: the
        channel sum of :meth:`weighted` (override where the map is no such sum)."""
        return self.weighted(inputs, targets, acts, grads).sum(dim=1)

    def reduce(self, weighted: Tensor) -> Tensor:
        """Layer map (N, h, w) of the weighted activations (N, C, h, w): their channel sum,
        or with ``eigen_smooth`` their first principal component (:func:`first_component`)."""
        return first_component(weighted) if self.p.eigen_smooth else weighted.sum(dim=1)

    def layer_map(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Map at the layer's resolution after the optional ReLU, shape (N, h, w)."""
        acts, grads = self.activations(inputs, targets)
        if self.p.eigen_smooth:
            cam = self.reduce(self.weighted(inputs, targets, acts, grads))
        else:
            cam = self.combine(inputs, targets, acts, grads)
        return cam.clamp_min(0) if self.p.relu else cam

    def input_map(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One pass's map (no augmentation) upsampled to the input size, shape (N, H, W)."""
        cam = self.layer_map(inputs, targets)[:, None]
        return F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def augmented_map(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """``aug_smooth``: the mean over :data:`AUGMENTATIONS` of the de-augmented maps, each
        min-max scaled to [0, 1] (pytorch-grad-cam's ``forward_augmentation_smoothing``).

        The copies of all images are made at once and explained ``batch_size`` at a time
        (one augmentation at a time for methods that pack their own evaluations);
        ``last_forward_passes``, when the method reports it, sums the copies' passes.

        Parameters
        ----------
        inputs : Tensor, shape (N, C, H, W)
            The chunk of images.
        targets : Tensor, shape (N,)
            Their target classes.

        Returns
        -------
        Tensor, shape (N, H, W)
            Values in [0, 1], in the working dtype of the maps (float32 for 16-bit models).
        """
        n, k = len(inputs), len(AUGMENTATIONS)
        copies = torch.cat([(inputs.flip(-1) if flip else inputs) * factor for flip, factor in AUGMENTATIONS])
        repeated = targets.repeat(k)
        step = n if self.spec.batches_evaluations else max(1, self.batch_size)
        maps: list[Tensor] = []
        passes: list[Tensor] = []
        for start in range(0, len(copies), step):
            self.last_forward_passes = None
            maps.append(self.input_map(copies[start : start + step], repeated[start : start + step]))
            if self.last_forward_passes is not None:
                passes.append(self.last_forward_passes)
        scaled = minmax_scale(torch.cat(maps), _SCALE_EPS).view(k, n, *inputs.shape[-2:])
        flips = torch.tensor([flip for flip, _ in AUGMENTATIONS], device=scaled.device)
        scaled = torch.where(flips[:, None, None, None], scaled.flip(-1), scaled)
        self.last_forward_passes = torch.cat(passes).view(k, n).sum(0) if len(passes) == len(maps) else None
        return scaled.mean(dim=0)

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        if self.p.aug_smooth:
            return self.augmented_map(inputs, targets)
        return self.input_map(inputs, targets)


def first_component(maps: Tensor) -> Tensor:
    """Per image, the projection of the (h*w, C) matrix of ``maps`` (N, C, h, w), centred
    over positions, on its first principal component, shape (N, h, w): pytorch-grad-cam's
    ``get_2d_projection``, oriented to correlate positively with the channel sum.

    The projection on the first right singular vector is the first left singular vector
    times its singular value: the top eigenpair of the smaller of the Gram (hw x hw) and
    covariance (C x C) matrices, formed in float64 (float32 results for 16-bit maps).
    """
    n, c, h, w = maps.shape
    maps = as_working(maps)  # float32 for 16-bit activations (sums of products overflow)
    mats = maps.reshape(n, c, h * w).transpose(1, 2)  # (N, hw, C)
    centred = mats - mats.mean(dim=1, keepdim=True)
    d = centred.to(torch.float64)
    if h * w <= c:
        evals, evecs = torch.linalg.eigh(d @ d.transpose(1, 2))
        proj = (evecs[..., -1] * evals[..., -1:].clamp_min(0).sqrt()).to(maps.dtype)
    else:
        _, evecs = torch.linalg.eigh(d.transpose(1, 2) @ d)
        proj = (d @ evecs[..., -1:])[..., 0].to(maps.dtype)
    return orient(proj, mats.sum(dim=2)).reshape(n, h, w)


def orient(proj: Tensor, reference: Tensor) -> Tensor:
    """``proj`` (N, P) with each row's sign flipped where it correlates negatively with the
    same row of ``reference`` (N, P): the sign of a principal component is arbitrary."""
    corr = ((proj - proj.mean(1, keepdim=True)) * (reference - reference.mean(1, keepdim=True))).sum(1)
    return proj * torch.where(corr < 0, -1.0, 1.0).to(proj.dtype)[:, None]
