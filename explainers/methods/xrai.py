"""XRAI (Kapishnikov et al. 2019; PAIR's ``saliency.core.XRAI``): Integrated Gradients
summed over image regions, the regions chosen greedily by attribution density."""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from attriflow.explainers._batching import iter_jobs
from attriflow.explainers._gradients import input_gradient
from attriflow.explainers._lrp import low_precision
from attriflow.explainers._numerics import LowPrecisionError, working_dtype
from attriflow.explainers._scores import ScoreKind
from attriflow.explainers.base import Explainer, ExplainerSpec, Family, UnsupportedModelError
from attriflow.explainers.methods.integrated_gradients import Rule, path_points
from attriflow.explainers.registry import register

#: PAIR's segmentation settings (``saliency/core/xrai.py``): Felzenszwalb scales and sigma, the
#: size the image is resized to and the value range it is rescaled to before segmenting, the
#: smallest segment, and the radius of the disk each segment is dilated by.
SCALES = (50, 100, 150, 250, 500, 1200)
SIGMA = 0.8
SEGMENT_SIZE = (224, 224)
VALUE_RANGE = (-1.0, 1.0)
MIN_SEGMENT_SIZE = 150
DILATION_RADIUS = 5

Algorithm = Literal["full", "fast"]


class XRAIParams(BaseModel):
    """Parameters of :class:`XRAI` (defaults: PAIR's ``XRAIParameters``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(100, ge=1, le=100_000, description="Integrated Gradients steps per baseline")
    rule: Literal["riemann_pair"] | Rule = Field(
        "riemann_pair", description="IG quadrature; riemann_pair: PAIR's, points linspace(0, 1, steps) "
                                    "each weighted 1/steps")
    area_threshold: float = Field(1.0, ge=0, le=1, description="share of the image covered by chosen "
                                                               "regions before the rest is one region "
                                                               "(full algorithm only)")
    algorithm: Algorithm = "full"
    min_pixel_diff: int = Field(50, ge=1, description="a region adding fewer new pixels is dropped "
                                                      "(PAIR's experimental min_pixel_diff)")
    score: ScoreKind = "logit"


def ig_points(steps: int, rule: Literal["riemann_pair"] | Rule) -> tuple[np.ndarray, np.ndarray]:
    """Path coefficients alpha and their weights for XRAI's Integrated Gradients.

    ``riemann_pair`` is PAIR's ``IntegratedGradients``: ``steps`` points ``linspace(0, 1,
    steps)``, both ends included, each weighted ``1 / steps`` (so the weights sum to 1 but
    are neither a left/right Riemann sum nor a trapezoid); other rules are
    :func:`~attriflow.explainers.methods.integrated_gradients.path_points`'s.
    """
    if rule == "riemann_pair":
        return np.linspace(0, 1, steps), np.full(steps, 1.0 / steps)
    return path_points(steps, rule)


def _dilate(masks: np.ndarray, radius: int) -> np.ndarray:
    """scikit-image's ``dilation(mask, disk(radius))`` of each (H, W) mask of ``masks`` (M, H,
    W), computed on the mask's bounding box grown by ``radius`` (the same result: beyond it no
    pixel is within ``radius`` of the mask, and the reflected border of ``dilation`` never
    brings a pixel nearer than the mask itself)."""
    from skimage.morphology import dilation, disk

    footprint = disk(radius)
    out = np.zeros_like(masks)
    h, w = masks.shape[1:]
    for k, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if not len(rows):
            continue  # an empty mask stays empty
        r0, r1 = max(rows[0] - radius, 0), min(rows[-1] + radius + 1, h)
        c0, c1 = max(cols[0] - radius, 0), min(cols[-1] + radius + 1, w)
        out[k, r0:r1, c0:c1] = dilation(mask[r0:r1, c0:c1], footprint=footprint)
    return out


def felzenszwalb_masks(image: np.ndarray, resize_image: bool = True,
                       dilation_radius: int = DILATION_RADIUS) -> np.ndarray:
    """XRAI's candidate regions: Felzenszwalb segments of ``image`` at six scales, dilated.

    As PAIR's ``saliency.core.xrai._get_segments_felzenszwalb``: the image is min-max
    rescaled to [-1, 1] over all its values, resized to 224 x 224 (cubic, anti-aliased),
    segmented by scikit-image's ``segmentation.felzenszwalb`` at scales 50, 100, 150, 250,
    500 and 1200 (sigma 0.8, segments of at least 150 pixels), the labels resized back to the
    image (nearest), one mask per label value from the smallest to the largest of each
    segmentation (labels the resize dropped give empty masks), and each mask dilated by a disk
    of ``dilation_radius`` pixels. A constant image (where PAIR divides 0 by 0) is taken as
    -1 everywhere.

    Parameters
    ----------
    image : ndarray, shape (H, W, C)
        The image in its display range (the model's normalisation undone); any float dtype.
    resize_image : bool
        Segment at 224 x 224 (PAIR's default) rather than at the image's own size.
    dilation_radius : int
        Radius of the dilation disk; 0 leaves the segments as they are.

    Returns
    -------
    ndarray of bool, shape (M, H, W)
        The masks, scale by scale, label by label (PAIR's order).
    """
    from skimage.segmentation import felzenszwalb
    from skimage.transform import resize

    shape = image.shape[:2]
    lo, hi = float(np.min(image)), float(np.max(image))
    unit = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    im = unit * (VALUE_RANGE[1] - VALUE_RANGE[0]) + VALUE_RANGE[0]
    if resize_image:
        im = resize(im, SEGMENT_SIZE, order=3, mode="constant", preserve_range=True, anti_aliasing=True)
    masks = []
    for scale in SCALES:
        seg = felzenszwalb(im, scale=scale, sigma=SIGMA, min_size=MIN_SEGMENT_SIZE)
        if resize_image:
            seg = resize(seg, shape, order=0, preserve_range=True, mode="constant",
                         anti_aliasing=False).astype(int)
        masks.append(seg[None] == np.arange(seg.min(), seg.max() + 1)[:, None, None])
    out = np.concatenate(masks)
    return _dilate(out, dilation_radius) if dilation_radius else out


#: Packed masks of recently segmented images, by content (see :func:`_masks_of`).
_MASK_CACHE: OrderedDict[tuple[object, ...], tuple[tuple[int, ...], np.ndarray]] = OrderedDict()
MASK_CACHE_BYTES = 64 << 20
_MASK_LOCK = threading.Lock()


def _masks_of(image: np.ndarray) -> np.ndarray:
    """:func:`felzenszwalb_masks` of ``image``, remembered for the last images seen (up to
    ``MASK_CACHE_BYTES`` of bit-packed masks, least recently used first out). Segmenting
    costs about 0.1 s per scale whatever the image size (it runs at 224 x 224); the same
    images come back when a run explains them for several targets or under a randomised
    model (the sanity checks), where only the attribution changes."""
    key = (image.shape, image.dtype.str, hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest())
    with _MASK_LOCK:
        hit = _MASK_CACHE.get(key)
        if hit is not None:
            _MASK_CACHE.move_to_end(key)
    if hit is not None:
        shape, packed = hit
        return np.unpackbits(packed, count=math.prod(shape)).reshape(shape).view(bool)
    masks = felzenszwalb_masks(image)
    with _MASK_LOCK:
        _MASK_CACHE[key] = (masks.shape, np.packbits(masks, axis=None))
        while sum(p.nbytes for _, p in _MASK_CACHE.values()) > MASK_CACHE_BYTES and len(_MASK_CACHE) > 1:
            _MASK_CACHE.popitem(last=False)
    return masks


def _row_sums(masks: np.ndarray, values: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """``masks @ values`` for bool ``masks`` (M, K), a few thousand columns at a time (the
    float copy of all of ``masks`` would be M x K x 8 bytes)."""
    out = np.zeros(len(masks))
    for s in range(0, masks.shape[1], chunk):
        out += masks[:, s:s + chunk] @ values[s:s + chunk]
    return out


def _density(attr: np.ndarray, mask: np.ndarray) -> float:
    """Mean attribution over ``mask`` (``-inf`` for an empty mask): PAIR's ``_gain_density``,
    the same NumPy sum in the same order."""
    return float(attr[mask].mean()) if mask.any() else -math.inf


def _ranks(shape: tuple[int, ...], trace: list[tuple[np.ndarray, float]], rest: np.ndarray) -> np.ndarray:
    """Rank of each pixel's region, 1 = the highest gain (a stable sort of the chosen regions
    by gain, then the unassigned rest)."""
    ranks = np.zeros(shape, dtype=np.int64)
    order = [m for m, _ in sorted(trace, key=lambda mg: -mg[1])] + ([rest] if rest.any() else [])
    for i, m in enumerate(order):
        ranks[m] = i + 1
    return ranks


def xrai_regions(attr: np.ndarray, masks: np.ndarray, algorithm: Algorithm = "full",
                 area_threshold: float = 1.0, min_pixel_diff: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """XRAI's region stage: regions ranked by attribution density, each painted with its gain.

    ``full`` (PAIR's ``XRAI._xrai``): while the chosen area is at most ``area_threshold``
    of the image, drop every candidate that would add fewer than ``min_pixel_diff`` new
    pixels, take the one whose new pixels have the highest mean attribution (the first in
    mask order on a tie) and paint those pixels with it. ``fast`` (PAIR's
    ``XRAI._xrai_fast``): the candidates sorted once by the mean attribution of the whole
    mask, then each adds its new pixels (at least ``min_pixel_diff``) painted with their
    mean; ``area_threshold`` is ignored. In both, pixels no region took get their own mean.

    The full search keeps every candidate's count and sum of not-yet-chosen pixels and
    subtracts each chosen region's pixels from them (one pass over the masks in all, where
    PAIR rescans every mask at every step); the winner is then confirmed among the
    candidates within rounding of the best by PAIR's own mean of the pixels, so ties and
    the painted gains are PAIR's to the last bit.

    Parameters
    ----------
    attr : ndarray, shape (H, W)
        Per-pixel attribution (PAIR: the channel maximum of the IG map).
    masks : ndarray of bool, shape (M, H, W)
        Candidate regions, in order (see :func:`felzenszwalb_masks`).
    algorithm : {"full", "fast"}
        The greedy search or its one-sort approximation.
    area_threshold : float
        Share of the image in [0, 1] after which the full search stops.
    min_pixel_diff : int
        Fewest new pixels a region must add (at least 1).

    Returns
    -------
    gains : ndarray of float64, shape (H, W)
        PAIR's ``attribution_mask``.
    ranks : ndarray of int64, shape (H, W)
        PAIR's ``segments`` with ``flatten_xrai_segments``: 1 for the most important region.

    Raises
    ------
    ValueError
        If the shapes disagree or ``algorithm`` is unknown.
    """
    if masks.shape[1:] != attr.shape:
        raise ValueError(f"masks {masks.shape} do not match the attribution {attr.shape}")
    if algorithm not in ("full", "fast"):
        raise ValueError(f"unknown algorithm {algorithm!r} (full or fast)")
    attr = np.asarray(attr, dtype=np.float64)
    flat = attr.ravel()
    cand = masks.reshape(len(masks), -1)
    gains = np.full(flat.shape, -math.inf)
    chosen = np.zeros(flat.shape, dtype=bool)
    trace: list[tuple[np.ndarray, float]] = []
    if algorithm == "fast":
        first = [_density(flat, m) for m in cand]
        for k in sorted(range(len(cand)), key=lambda j: -first[j]):  # stable, as PAIR's sort
            new = cand[k] & ~chosen
            if int(new.sum()) < min_pixel_diff:
                continue
            gain = _density(flat, new)
            trace.append((new, gain))
            gains[new] = gain
            chosen |= cand[k]
    else:
        count = cand.sum(1)
        total = _row_sums(cand, flat)  # running sums of each candidate's unchosen pixels
        alive = np.ones(len(cand), dtype=bool)
        scale = float(np.abs(flat).max()) if flat.size else 0.0
        area = 0.0
        while area <= area_threshold:
            alive &= count >= min_pixel_diff
            if not alive.any():
                break
            approx = np.where(alive, total / np.maximum(count, 1), -math.inf)
            best = approx.max()
            # the running sums drift by rounding; PAIR's means decide between near-ties
            near = np.flatnonzero(alive & (approx >= best - 1e-9 * scale))
            if scale == 0:  # every mean is 0.0: the first candidate, as PAIR's strict '>'
                k = int(near[0])
                new = cand[k] & ~chosen
                gain = _density(flat, new)
            else:
                exact = [_density(flat, cand[j] & ~chosen) for j in near]
                k = int(near[int(np.argmax(exact))])  # the first maximum, as PAIR's strict '>'
                gain = max(exact)
                new = cand[k] & ~chosen
            trace.append((new, gain))
            gains[new] = gain
            chosen |= new
            area = float(np.mean(chosen))
            alive[k] = False
            idx = np.flatnonzero(new)
            sub = cand[:, idx]
            count = count - sub.sum(1)
            total = total - _row_sums(sub, flat[idx])
    rest = gains == -math.inf
    if rest.any():
        gains[rest] = _density(flat, rest)
    return gains.reshape(attr.shape), _ranks(flat.shape, trace, rest).reshape(attr.shape)


@register
class XRAI(Explainer):
    """Integrated Gradients from a black and a white image, averaged, then made region-based:
    over-segmentations of the image are searched greedily for the regions of highest mean
    attribution, and each pixel gets the mean attribution of the region that took it.

    The two baselines are PAIR's defaults: constant images at the smallest and at the largest
    value of the model input (over all pixels and channels, per image). Integrated Gradients
    from each uses ``steps`` points by ``rule`` (default: PAIR's ``IntegratedGradients``,
    points ``linspace(0, 1, steps)`` each weighted ``1 / steps``, which is none of
    ``integrated_gradients``' rules); the two maps are averaged and reduced to the channel
    maximum. The regions are :func:`felzenszwalb_masks` of the image with the model's
    normalisation undone (``normalization``, when the pipeline knows it; PAIR segments the
    array it is given, after min-max rescaling, so an affine change of all channels at once
    does not matter but one per channel does), and :func:`xrai_regions` ranks them. This is
    PAIR's ``XRAI().GetMask(x, call_model_function, extra_parameters=XRAIParameters(steps,
    area_threshold, algorithm))`` (the tests compare the two); PAIR's ``return_xrai_segments``
    (region ranks) is the second output of :func:`xrai_regions`.

    The path points of every image and both baselines are packed into gradient passes of
    ``batch_size``; segmentation (scikit-image, six scales at 224 x 224) and the region
    search run on the CPU, per image.

    Returns float32 maps of shape (N, H, W), piecewise constant; an image whose gradient is
    NaN or infinite somewhere on a path gets a NaN map (the pipeline flags it; PAIR would
    either skip the regions concerned or fail).

    Raises
    ------
    UnsupportedModelError
        If ``normalization`` does not have one mean and one standard deviation per channel
        of the input.
    LowPrecisionError
        For float16 / bfloat16 inputs or autocast: the greedy search compares the mean
        attributions of overlapping regions, which often differ by less than 16-bit gradients
        are accurate, so regions swap ranks (a rank correlation of 0.4 with the float32 map
        for one image of test_half.py's CNN).

    References
    ----------
    A. Kapishnikov, T. Bolukbasi, F. Viegas, M. Terry, "XRAI: Better Attributions Through
    Regions", ICCV 2019.
    """

    spec = ExplainerSpec(
        name="xrai",
        family=Family.GRADIENT,
        access=("gradients",),
        batches_evaluations=True,
        summary="integrated gradients (black and white baselines) summed over greedily chosen regions",
        references=("kapishnikov2019",),
        needs_internals=False,
    )
    Params = XRAIParams

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        s = 2 * params.steps  # type: ignore[attr-defined]  # two baselines
        return {"forward": s, "backward": s}

    def refuse(self, example: Tensor) -> None:  # noqa: D102
        dtype = low_precision(example)
        if dtype is not None:
            raise LowPrecisionError(
                f"xrai: in {dtype} (fp16 / half) the integrated gradients are accurate to about 3 digits, "
                "and XRAI's greedy search ranks regions whose mean attributions often differ by less, so "
                "regions swap ranks and the map is not the float32 one; explain xrai in float32")

    def _images(self, inputs: Tensor) -> np.ndarray:
        """(N, H, W, C) float64 images as the researcher sees them (normalisation undone)."""
        x = inputs.detach().to(torch.float64).cpu()
        if self.normalization is not None:
            mean, std = self.normalization
            if len(mean) != x.shape[1] or len(std) != x.shape[1]:
                raise UnsupportedModelError(
                    f"xrai: normalization has {len(mean)} means and {len(std)} standard deviations for "
                    f"inputs of {x.shape[1]} channels; the segmentation needs one of each per channel")
            x = x * torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1) \
                + torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        return x.permute(0, 2, 3, 1).numpy()

    def _ig(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Channel maximum of the mean of IG from the min and the max baseline, (N, H, W)."""
        n = len(inputs)
        alphas, weights = ig_points(self.p.steps, self.p.rule)
        alpha = torch.as_tensor(alphas, dtype=inputs.dtype, device=inputs.device)
        work = working_dtype(inputs.dtype)
        weight = torch.as_tensor(weights, dtype=work, device=inputs.device)
        flat = inputs.flatten(1)
        base = torch.stack([flat.amin(1), flat.amax(1)], 1).reshape(-1)  # item 2i + b: image i, baseline b
        image = torch.arange(2 * n, device=inputs.device) // 2
        delta = inputs[image] - base.view(-1, 1, 1, 1)
        total = torch.zeros(delta.shape, dtype=work, device=inputs.device)
        for item, step in iter_jobs(2 * n, self.p.steps, self.batch_size, inputs.device):
            points = base[item].view(-1, 1, 1, 1) + alpha[step].view(-1, 1, 1, 1) * delta[item]
            grad = input_gradient(self.model, points, targets[image[item]], self.p.score)
            total.index_add_(0, item, grad.to(work) * weight[step].view(-1, 1, 1, 1))
        attr = (total * delta.to(work)).view(n, 2, *inputs.shape[1:])
        return ((attr[:, 0] + attr[:, 1]) / 2).amax(1)

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        self.refuse(inputs)  # also under an autocast entered after the model was checked
        images = self._images(inputs)
        attr = self._ig(inputs, targets).to(torch.float64).cpu().numpy()
        maps = []
        for img, a in zip(images, attr):
            if not np.isfinite(a).all():
                maps.append(np.full(a.shape, np.nan))
                continue
            masks = _masks_of(img)
            maps.append(xrai_regions(a, masks, self.p.algorithm, self.p.area_threshold,
                                     self.p.min_pixel_diff)[0])
        return torch.from_numpy(np.stack(maps)).to(device=inputs.device, dtype=torch.float32)
