"""The embedded dataset: handwritten digits on real textures and photo crops.

Every image is synthesised from assets that ship inside installed packages, so it works
offline and needs no download: glyphs are scikit-learn's handwritten digits (8x8, 16 grey
levels, 1797 samples), backgrounds are crops of scikit-image's textures (brick, grass,
gravel, tinted) and photographs (astronaut, chelsea, coffee, rocket). The class is the
digit (10 classes); the ground truth is the glyph's mask (``alpha >= 0.5``) and its tight
bounding box.

Sample ``i`` of a split depends only on ``(seed, split, i)``: asking for more samples never
changes the first ones. Train and test use disjoint digit glyphs (every fourth glyph of
scikit-learn's set is reserved for the test split).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
SPLIT_SIZES = {"train": 6000, "test": 1000}
#: Bumped whenever rendering changes: run stores identify embedded samples by it.
RENDER_VERSION = 1
#: Mean and standard deviation the reference CNN normalises with (per RGB channel).
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
_BACKGROUNDS = ("brick", "grass", "gravel", "astronaut", "chelsea", "coffee", "rocket")
_SOURCE_SIZE = 256
#: Largest size :func:`render` draws (background crops come from 256 px sources).
MAX_RENDER_SIZE = _SOURCE_SIZE // 2


@dataclass(frozen=True)
class EmbeddedSample:
    """One synthesised image with its ground truth and the pieces it was made from."""

    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    label: int
    mask: np.ndarray  # (H, W) bool, glyph pixels
    box: tuple[int, int, int, int]  # (y0, x0, y1, x1), exclusive upper corner
    background: np.ndarray  # (H, W, 3) float32, the image without the glyph
    alpha: np.ndarray  # (H, W) float32 glyph opacity


@functools.cache
def _glyphs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@functools.cache
def _sources() -> tuple[np.ndarray, ...]:
    """Background sources as float32 (S, S, 3) arrays in [0, 1]."""
    from skimage import data as skdata

    out = []
    for name in _BACKGROUNDS:
        img = np.asarray(getattr(skdata, name)(), dtype=np.float32) / 255.0
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        t = torch.from_numpy(img).permute(2, 0, 1)[None]
        t = F.interpolate(t, size=(_SOURCE_SIZE, _SOURCE_SIZE), mode="bilinear",
                          antialias=True, align_corners=False)
        out.append(t[0].permute(1, 2, 0).contiguous().numpy())
    return tuple(out)


def _split_glyphs(split: str) -> np.ndarray:
    n = len(_glyphs()[0])
    idx = np.arange(n)
    return idx[idx % 4 == 0] if split == "test" else idx[idx % 4 != 0]


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(img))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = t[0]
    return (out[0] if img.ndim == 2 else out.permute(1, 2, 0)).contiguous().numpy()


def render(index: int, *, split: str = "test", seed: int = 0, image_size: int = 64) -> EmbeddedSample:
    """Synthesise sample ``index`` of ``split``.

    Parameters
    ----------
    index : int
        Sample index within the split.
    split : {"train", "test"}
        Which split (disjoint glyphs).
    seed : int
        Dataset seed.
    image_size : int
        Side of the square image in pixels (at least 32).

    Returns
    -------
    EmbeddedSample
        The image and its ground truth.
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= image_size <= MAX_RENDER_SIZE:
        raise ValueError(f"image_size must be in [1, {MAX_RENDER_SIZE}], got {image_size} "
                         "(larger embedded images are rendered at the maximum and resized)")
    glyphs, targets = _glyphs()
    pool = _split_glyphs(split)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    g = int(pool[rng.integers(len(pool))])
    s = image_size

    # background: a random crop of a random source, tinted when it is a grey texture
    src_i = int(rng.integers(len(_BACKGROUNDS)))
    src = _sources()[src_i]
    crop = int(rng.integers(s, _SOURCE_SIZE // 2 + 1))
    y, x = (int(v) for v in rng.integers(0, _SOURCE_SIZE - crop + 1, size=2))
    bg = _resize(src[y : y + crop, x : x + crop], s)
    if src_i < 3:
        bg = bg * rng.uniform(0.35, 1.0, size=3).astype(np.float32)
    bg = np.clip(bg, 0.0, 1.0).astype(np.float32)

    # glyph: upsampled digit at a random scale and position
    size = int(rng.integers(int(0.375 * s), int(0.625 * s) + 1))
    alpha = np.clip(_resize(glyphs[g], size) / 0.6, 0.0, 1.0)
    gy, gx = (int(v) for v in rng.integers(0, s - size + 1, size=2))
    full = np.zeros((s, s), dtype=np.float32)
    full[gy : gy + size, gx : gx + size] = alpha

    # colour with strong luminance contrast to the background under the glyph
    under = bg[gy : gy + size, gx : gx + size].reshape(-1, 3).mean(axis=0)
    lum = float(under @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    target_lum = 0.9 if lum < 0.5 else 0.1
    colour = np.clip(colour - colour.mean() + target_lum, 0.0, 1.0)

    image = bg * (1.0 - full[..., None]) + colour * full[..., None]
    mask = full >= 0.5
    ys, xs = np.nonzero(mask)
    box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    return EmbeddedSample(image.astype(np.float32), int(targets[g]), mask, box, bg, full)


@dataclass(frozen=True)
class EmbeddedSplit:
    """A batch of embedded samples as arrays."""

    images: np.ndarray  # (N, 3, H, W) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64
    masks: np.ndarray  # (N, H, W) bool
    boxes: np.ndarray  # (N, 4) int64, (y0, x0, y1, x1)


def make_split(
    split: str, start: int = 0, stop: int | None = None, *, seed: int = 0, image_size: int = 64
) -> EmbeddedSplit:
    """Samples ``start:stop`` of a split as arrays.

    Parameters
    ----------
    split : {"train", "test"}
        Which split.
    start, stop : int
        Index range (``stop`` defaults to the split size).
    seed : int
        Dataset seed.
    image_size : int
        Image side in pixels.

    Returns
    -------
    EmbeddedSplit
        Images (channels first), labels, masks and boxes.
    """
    stop = SPLIT_SIZES[split] if stop is None else stop
    samples = [render(i, split=split, seed=seed, image_size=image_size) for i in range(start, stop)]
    s = image_size
    return EmbeddedSplit(
        images=np.stack([smp.image.transpose(2, 0, 1) for smp in samples]) if samples
        else np.zeros((0, 3, s, s), np.float32),
        labels=np.array([smp.label for smp in samples], dtype=np.int64),
        masks=np.stack([smp.mask for smp in samples]) if samples else np.zeros((0, s, s), bool),
        boxes=np.array([smp.box for smp in samples], dtype=np.int64).reshape(-1, 4),
    )
