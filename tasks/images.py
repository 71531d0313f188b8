"""Image decoding and preprocessing (torchvision's classification presets), with the box and
mask transforms that keep ground truth on the same pixels as the image.

Decoding: Pillow, then RGB (grey, palette and CMYK are converted; RGBA, LA and palette
transparency are composited on black; 16-bit images are scaled to 8 bits).

Preprocessing (:class:`Preprocess`), the code path of torchvision's ``ImageClassification``
preset (``ResNet50_Weights.IMAGENET1K_V2.transforms()`` without its normalisation): the
shorter side is resized to ``resize`` with ``torchvision.transforms.functional.resize``
(aspect ratio kept), ``center_crop`` cuts out ``size`` (zero padding where the resized image
is smaller, as torchvision pads), and ``pil_to_tensor() / 255`` gives float32 in [0, 1].
``resize=None`` squashes the image to ``size`` (aspect ratio not kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from attriflow.tasks.config import DataConfig, PreprocessConfig

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
#: ``data.preprocess: auto`` crops this fraction of the resized image (torchvision's 224 / 256).
DEFAULT_CROP_PCT = 0.875
DEFAULT_SIZE = (64, 64)


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the config field, the file and,
    for manifests, the line."""


def to_rgb(img: Image.Image) -> Image.Image:
    """A Pillow image as 8-bit RGB.

    Parameters
    ----------
    img : PIL.Image.Image
        Any mode: RGBA, LA and palette images with transparency are composited on black;
        16-bit and 32-bit integer images are scaled to 8 bits (by 65535 when a value exceeds
        255, else by 255); every other mode goes through Pillow's ``convert("RGB")``.

    Returns
    -------
    PIL.Image.Image
        A new image in mode ``RGB``.
    """
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(base, rgba)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255.0).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def decode(path: Path) -> Image.Image:
    """Decode an image file to 8-bit RGB with Pillow (see :func:`to_rgb`).

    Parameters
    ----------
    path : Path
        The file. Its size is not limited here: :func:`check` applies ``data.max_pixels``
        when the run is planned.

    Returns
    -------
    PIL.Image.Image
        The image in mode ``RGB``.
    """
    Image.MAX_IMAGE_PIXELS = None  # the size limit is ``data.max_pixels``, checked when planning
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def check(path: Path, max_pixels: int) -> tuple[str | None, tuple[int, int]]:
    """Whether an image file can be used, and its size.

    Parameters
    ----------
    path : Path
        The file; it is decoded once, so corrupt and truncated files are found.
    max_pixels : int
        Larger images (width x height) are refused as "huge" before decoding.

    Returns
    -------
    reason : str or None
        Why the file cannot be used (``empty image``, ``huge image: ...``, the decoder's
        error), None when it can.
    hw : tuple of int
        ``(height, width)`` in pixels, ``(0, 0)`` when the header cannot be read.
    """
    Image.MAX_IMAGE_PIXELS = None  # our own limit below replaces Pillow's bomb check
    hw = (0, 0)
    try:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
            hw = (h, w)
            if w == 0 or h == 0:
                return "empty image", hw
            if w * h > max_pixels:
                return f"huge image: {w}x{h} = {w * h} pixels > data.max_pixels = {max_pixels}", hw
            img.load()
    except Exception as err:  # noqa: BLE001  (any decoder failure means: skip and report)
        return f"{type(err).__name__}: {err}", hw
    return None, hw


def _ceil_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return -((-num) // den)


def _crop_offset(n: int, crop: int) -> int:
    """Where torchvision's ``center_crop`` starts along one axis (negative: zero padding)."""
    if crop > n:
        return -((crop - n) // 2)
    return int(round((n - crop) / 2.0))


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes a model input: torchvision's classification presets.

    Attributes
    ----------
    size : tuple of int
        ``(H, W)`` of the output image, in pixels.
    resize : int, (int, int) or None
        An int: the shorter side is resized to this many pixels (aspect ratio kept; the
        longer side becomes ``int(resize * long / short)``, as torchvision), then the centre
        ``size`` is cropped. ``(RH, RW)``: the image is scaled, aspect ratio kept, by
        ``max(RH / h, RW / w)`` so that it covers ``RH x RW`` (timm's ``ResizeKeepRatio``
        idea; ``auto`` uses it for non-square sizes so that no crop needs padding), then
        the centre is cropped. None squashes the image to ``size`` (aspect ratio not kept).
    interpolation : {"nearest", "bilinear", "bicubic"}
        torchvision's ``InterpolationMode`` for the image.
    antialias : bool
        torchvision's ``antialias``. Pillow always antialiases, so ``False`` resizes the
        uint8 tensor instead (torchvision's tensor path).
    """

    size: tuple[int, int]
    resize: int | tuple[int, int] | None
    interpolation: str = "bilinear"
    antialias: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) in pixels, got {self.size!r}")
        if isinstance(self.resize, (list, tuple)):
            object.__setattr__(self, "resize", tuple(int(v) for v in self.resize))
        if self.resize is not None and min(np.atleast_1d(self.resize)) < 1:
            raise ValueError(f"resize must be a positive number of pixels or None, got {self.resize!r}")

    def resized_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Size after the resize step, before the crop.

        Parameters
        ----------
        hw : tuple of int
            ``(height, width)`` of the original image.

        Returns
        -------
        tuple of int
            ``(height, width)``, as torchvision's ``_compute_resized_output_size``.
        """
        if self.resize is None:
            return self.size
        h, w = hw
        if isinstance(self.resize, tuple):
            scale = max(self.resize[0] / h, self.resize[1] / w)
            return max(1, round(h * scale)), max(1, round(w * scale))
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)

    def crop_offset(self, hw: tuple[int, int]) -> tuple[int, int]:
        """``(top, left)`` of the centre crop in the resized image (negative: padding).

        Parameters
        ----------
        hw : tuple of int
            ``(height, width)`` of the original image.

        Returns
        -------
        tuple of int
            torchvision's ``center_crop`` offsets: ``int(round((h - H) / 2))``, or minus
            the top/left zero padding when the resized image is smaller than the crop.
        """
        rh, rw = self.resized_hw(hw)
        return _crop_offset(rh, self.size[0]), _crop_offset(rw, self.size[1])

    def image(self, img: Image.Image) -> np.ndarray:
        """The model input of a Pillow image (before the model's normalisation).

        Parameters
        ----------
        img : PIL.Image.Image
            Any mode; converted with :func:`to_rgb` first.

        Returns
        -------
        np.ndarray, shape (3, H, W)
            float32 in [0, 1]: ``torchvision.transforms.functional`` ``resize`` then
            ``center_crop`` then ``pil_to_tensor() / 255``.
        """
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        mode = InterpolationMode[self.interpolation.upper()]
        pic: Image.Image | torch.Tensor = to_rgb(img)
        if self.resize is None:
            size = list(self.size)
        elif isinstance(self.resize, tuple):
            size = list(self.resized_hw((pic.height, pic.width)))
        else:
            size = [self.resize]
        if not self.antialias:
            pic = TF.pil_to_tensor(pic)  # type: ignore[arg-type]
        pic = TF.resize(pic, size, interpolation=mode, antialias=self.antialias)
        pic = TF.center_crop(pic, list(self.size))
        t = pic if isinstance(pic, torch.Tensor) else TF.pil_to_tensor(pic)
        return (t.to(torch.float32) / 255.0).numpy()

    def boxes(self, boxes: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
        """Boxes in the output image's pixels, on exactly the pixels :meth:`mask` gives.

        Output pixel ``j`` of an axis samples source pixel ``floor((j + 0.5) * n_in / n_out)``
        (nearest-exact), so a source interval ``[a, b)`` becomes
        ``[ceil(a * n_out / n_in - 0.5), ceil(b * n_out / n_in - 0.5))``, computed exactly in
        integers; the crop offset is subtracted and the result clipped to the output.

        Parameters
        ----------
        boxes : np.ndarray, shape (M, 4)
            int64 ``(y0, x0, y1, x1)``, 0-based, upper corner exclusive, in the original
            image's pixels (parts outside the image are ignored: VOC-style annotations
            are often one pixel over).
        hw : tuple of int
            ``(height, width)`` of the original image.

        Returns
        -------
        kept : np.ndarray, shape (M', 4)
            int64 boxes in output pixels, inside ``[0, H] x [0, W]``, of the boxes with at
            least one output pixel.
        keep : np.ndarray, shape (M,)
            bool, which input boxes are in ``kept``.
        n_clipped : int
            Kept boxes that lost pixels to the crop.
        """
        b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        h, w = hw
        rh, rw = self.resized_hw(hw)
        top, left = self.crop_offset(hw)
        src = np.clip(b, 0, np.array([h, w, h, w], dtype=np.int64))
        ins = np.array([h, w, h, w], dtype=np.int64)
        outs = np.array([rh, rw, rh, rw], dtype=np.int64)
        mapped = _ceil_div(2 * src * outs - ins, 2 * ins) - np.array([top, left, top, left], dtype=np.int64)
        H, W = self.size
        out = np.clip(mapped, 0, np.array([H, W, H, W], dtype=np.int64))
        keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
        return out[keep], keep, int((keep & (out != mapped).any(axis=1)).sum())

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A ground-truth mask on the output image's pixels.

        Nearest-exact resampling (torchvision's ``InterpolationMode.NEAREST_EXACT`` rule:
        output pixel ``j`` takes source pixel ``floor((j + 0.5) * n_in / n_out)``, computed
        exactly in integers, as :meth:`boxes`), then torchvision's ``center_crop`` (False
        where it pads).

        Parameters
        ----------
        mask : np.ndarray, shape (h, w)
            bool, in the original image's pixels.

        Returns
        -------
        np.ndarray, shape (H, W)
            bool.
        """
        import torchvision.transforms.functional as TF

        m = np.asarray(mask, dtype=bool)
        h, w = m.shape
        rh, rw = self.resized_hw((h, w))
        iy = ((2 * np.arange(rh) + 1) * h) // (2 * rh)
        ix = ((2 * np.arange(rw) + 1) * w) // (2 * rw)
        r = torch.from_numpy(np.ascontiguousarray(m[iy][:, ix]).astype(np.uint8))[None]
        return TF.center_crop(r, list(self.size))[0].numpy().astype(bool)

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (for the manifest and the store's attrs).

        Returns
        -------
        dict
            ``size`` ([H, W]), ``resize`` (None: squash), ``interpolation``, ``antialias``.
        """
        resize = list(self.resize) if isinstance(self.resize, tuple) else self.resize
        return {"size": list(self.size), "resize": resize, "interpolation": self.interpolation,
                "antialias": self.antialias}


def resolve_preprocess(
    cfg: DataConfig,
    *,
    input_size: tuple[int, int] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    squash_default: bool = False,
) -> Preprocess:
    """The preprocessing a data config asks for, given what the model says about its inputs.

    Parameters
    ----------
    cfg : DataConfig
        ``image_size``, ``preprocess``.
    input_size : tuple of int, optional
        The model's ``(H, W)`` input size (timm's ``input_size``; torchvision: 224).
    crop_pct : float, optional
        The model's crop fraction (timm's ``crop_pct``); default 0.875, torchvision's 224/256.
    interpolation : str, optional
        The model's interpolation (timm's); default bilinear.
    squash_default : bool
        True for the shipped reference CNN, trained on squashed images: ``auto`` squashes.

    Returns
    -------
    Preprocess
        size = ``data.image_size``, else ``preprocess.crop``, else ``input_size``, else
        64 x 64. ``squash``: resize None. A :class:`PreprocessConfig`: its values (``resize:
        null`` squashes). ``auto``: squash if ``squash_default``, else the shorter side
        resized to ``floor(size / crop_pct)`` (224 -> 256) for a square size and, for a
        non-square ``(H, W)``, the image scaled to cover ``floor(H / crop_pct) x
        floor(W / crop_pct)`` (aspect ratio kept, so the crop never pads); the model's
        interpolation, antialiased.

    Raises
    ------
    DatasetError
        If the model's interpolation is not nearest, bilinear or bicubic (give
        ``data.preprocess`` explicitly).
    """
    pp = cfg.preprocess
    crop = pp.crop if isinstance(pp, PreprocessConfig) else None
    size = tuple(cfg.image_size or crop or input_size or DEFAULT_SIZE)
    hw = (int(size[0]), int(size[1]))
    if isinstance(pp, PreprocessConfig):
        return Preprocess(hw, pp.resize, pp.interpolation, pp.antialias)
    mode = (interpolation or "bilinear").lower()
    if mode not in INTERPOLATIONS:
        raise DatasetError(f"data.preprocess: the model's interpolation {interpolation!r} is not one of "
                           f"{', '.join(INTERPOLATIONS)}; give data.preprocess: "
                           "{resize: ..., interpolation: ...}")
    if pp == "squash" or squash_default:
        return Preprocess(hw, None, mode if pp == "squash" else "bilinear", True)
    pct = crop_pct or DEFAULT_CROP_PCT
    if hw[0] == hw[1]:
        return Preprocess(hw, int(hw[0] / pct), mode, True)
    return Preprocess(hw, (int(hw[0] / pct), int(hw[1] / pct)), mode, True)
