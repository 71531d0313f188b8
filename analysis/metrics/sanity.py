"""Model-parameter randomisation sanity check (Adebayo et al., NeurIPS 2018), cascading form.

Starting from the top (logit) layer and moving towards the input, the parameters of
successive layers are re-initialised with each module's own default initialiser (its
``reset_parameters``, drawn from a seed fixed per layer), keeping the earlier
randomisations; after each step the maps are recomputed and compared with the trained
model's maps by

- ``spearman_abs``: Spearman rank correlation of the absolute maps,
- ``spearman``: Spearman rank correlation of the signed maps,
- ``ssim``: structural similarity of the maps min-max normalised to [0, 1].

A method that explains the model shows similarity falling as depth grows; one that ignores
it (an edge detector) stays at 1. ``collapse_depth`` is the first depth whose mean
similarity is below a threshold (0.5).

Choices where the paper leaves room (documented, see ``../shared/research/metrics.md`` §7):
a *unit* of randomisation is a layer with parameters (``granularity="layer"``) or a block
of the network (``"block"``, the default: it keeps the number of depths small for deep
networks; see :func:`randomisation_units` for how blocks are found); a normalisation layer
(BatchNorm, GroupNorm, LayerNorm) is randomised together with the layer registered just
before it, as Adebayo et al. did for Inception's conv+BN units. A module without a
``reset_parameters`` (ConvNeXt's ``CNBlock`` with its ``layer_scale``) is randomised
through its submodules that have one, and its own parameters are re-drawn from
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, PyTorch's default for a weight
(``kaiming_uniform_(a=sqrt(5))``), where ``fan_in`` is the number of elements per output
slice (1 for a 1-d tensor or a ``(C, 1, 1)`` scale: ``layer_scale`` is drawn from
``U(-1, 1)``). It is drawn at random, not reset to its initial constant (torchvision's
1e-6): the constant would switch the residual branches off rather than randomise them, and
would leave an untrained copy unchanged. Ties in Spearman ranks get their average rank (as
``scipy.stats.spearmanr``). SSIM uses the 7x7 uniform window, ``K1=0.01, K2=0.03``, the
sample covariance and the mean over the valid (un-padded) window positions, exactly
``skimage.metrics.structural_similarity(a, b, data_range=1)``.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

SIMILARITIES = ("spearman_abs", "spearman", "ssim")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _split(module: nn.Module, name: str) -> list[tuple[str, nn.Module]] | None:
    """The children with parameters of a module that can stand for it, or None."""
    if _has_own_params(module):
        return None  # its own parameters would belong to no unit
    children = [(f"{name}.{c}", m) for c, m in module.named_children() if any(True for _ in m.parameters())]
    return children or None


def randomisation_units(
    model: nn.Module, granularity: str = "block", min_units: int = 5
) -> list[tuple[str, list[str]]]:
    """Units of the cascade, top (output side) first.

    ``"block"`` starts from the model's top-level children with parameters. While there
    are fewer than ``min_units`` of them, the block with the most parameters that can be
    split is replaced, in place, by its own children with parameters. A block can be split
    when it has such children and no parameters of its own. The rule does not look at
    module names. A ResNet (conv1+bn1, layer1..4, fc: 6 units) is left as it is. A network
    built as ``features`` + ``classifier`` is split into the blocks of ``features``:
    torchvision's MobileNetV3-small gives 14 units, EfficientNet-B0 10 (its stages),
    DenseNet-121 9 (dense blocks and transitions) and ConvNeXt-tiny 9 (stem, stages and
    downsampling layers). VGG-11 gives 11: its classifier holds most of the parameters
    and is split first into its three linear layers, then ``features`` into its eight
    convolutions. The units cover every parameter exactly once.

    Parameters
    ----------
    model : nn.Module
        The network (modules registered in execution order, as torchvision's are).
    granularity : {"block", "layer"}
        Blocks as above, or single modules with parameters of their own.
    min_units : int
        Smallest number of blocks worth a cascade (``"block"`` only); the result has fewer
        only when nothing more can be split.

    Returns
    -------
    list of (str, list of str)
        Unit name and the names of the modules it re-initialises.

    Raises
    ------
    ValueError
        For an unknown granularity or a model without parameters.
    """
    if granularity == "layer":
        candidates = [(n, m) for n, m in model.named_modules() if n and _has_own_params(m)]
    elif granularity == "block":
        candidates = [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
        while len(candidates) < min_units:
            splittable = [(i, _split(m, n)) for i, (n, m) in enumerate(candidates)]
            splittable = [(i, c) for i, c in splittable if c is not None]
            if not splittable:
                break
            i, children = max(splittable, key=lambda ic: _n_params(candidates[ic[0]][1]))
            candidates[i : i + 1] = children
    else:
        raise ValueError(f"granularity must be 'block' or 'layer', got {granularity!r}")
    units: list[tuple[str, list[str]]] = []
    for name, module in candidates:
        if units and isinstance(module, _NORMS):
            units[-1][1].append(name)  # a normalisation layer goes with the layer before it
        else:
            units.append((name, [name]))
    if not units:
        raise ValueError("the model has no parameters to randomise")
    return units[::-1]


def unit_modules(model: nn.Module, name: str, others: set[str]) -> list[tuple[str, nn.Module]]:
    """The modules with parameters of their own that re-initialising ``name`` touches.

    This is the subtree of ``name``, minus the subtrees of the other unit modules inside it.
    Such nesting happens with ``granularity="layer"``, e.g. a ConvNeXt ``CNBlock`` and its
    layers, and every parameter still goes to exactly one unit.

    Parameters
    ----------
    model : nn.Module
        The network.
    name : str
        A module name from :func:`randomisation_units`.
    others : set of str
        The module names of all units.

    Returns
    -------
    list of (str, nn.Module)
        Qualified name and module, in registration order.
    """
    root = model.get_submodule(name) if name else model
    inner = sorted(o for o in others if o != name and (not name or o.startswith(name + ".")))
    out = []
    for sub, m in root.named_modules(prefix=name):
        if any(sub == o or sub.startswith(o + ".") for o in inner):
            continue
        if _has_own_params(m):
            out.append((sub, m))
    return out


def _redraw(param: nn.Parameter) -> None:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` in place; ``fan_in`` = elements per output slice."""
    fan_in = param[0].numel() if param.dim() > 1 else 1
    bound = 1.0 / float(np.sqrt(fan_in))
    with torch.no_grad():
        param.uniform_(-bound, bound)


def _reset(modules: list[tuple[str, nn.Module]], seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, m in modules:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            else:  # e.g. ConvNeXt's layer_scale: its children are in ``modules`` too
                for p in m.parameters(recurse=False):
                    _redraw(p)
        for _, m in modules:  # running statistics of normalisation layers
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()


def unit_seed(seed: int, unit: str) -> int:
    """The seed that re-initialises one unit: from (run seed, unit name) only."""
    blob = f"{seed}:sanity:{unit}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


def cascading_randomisation(
    model: nn.Module, units: list[tuple[str, list[str]]], seed: int
) -> Iterator[tuple[int, str, nn.Module]]:
    """Yield ``(depth, unit name, model)`` with the top ``depth`` units re-initialised.

    One deep copy of ``model`` is modified in place from step to step (the trained model
    is never touched); consume each yielded model before advancing.
    """
    work = copy.deepcopy(model).eval()
    others = {name for _, names in units for name in names}
    for depth, (unit, names) in enumerate(units, start=1):
        for name in names:
            _reset(unit_modules(work, name, others), unit_seed(seed, name))
        yield depth, unit, work


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation per row of two (N, ...) arrays (average ranks for ties;
    NaN where one map is constant)."""
    ra = rankdata(a.reshape(len(a), -1), axis=1)
    rb = rankdata(b.reshape(len(b), -1), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=1) / den, np.nan)


def minmax(maps: np.ndarray) -> np.ndarray:
    """Each (H, W) map scaled to [0, 1] (a constant map becomes 0)."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    lo, hi = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    return ((flat - lo) / span).reshape(maps.shape)


def ssim(a: np.ndarray, b: np.ndarray, win: int = 7, data_range: float = 1.0) -> np.ndarray:
    """Mean structural similarity per pair of (N, H, W) maps (skimage's defaults)."""
    x = torch.from_numpy(np.asarray(a, np.float64))[:, None]
    y = torch.from_numpy(np.asarray(b, np.float64))[:, None]
    n = win * win
    mean = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731  (valid positions only)
    ux, uy = mean(x), mean(y)
    cov = n / (n - 1)
    vx = cov * (mean(x * x) - ux * ux)
    vy = cov * (mean(y * y) - uy * uy)
    vxy = cov * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


def similarities(trained: np.ndarray, randomised: np.ndarray) -> np.ndarray:
    """The three similarities of :data:`SIMILARITIES`, shape (N, 3).

    A constant map has no ranks: its Spearman correlation is undefined and counted as 0
    (no similarity left). Pairs with a non-finite map give NaN (left out of means)."""
    finite = (np.isfinite(trained).reshape(len(trained), -1).all(axis=1)
              & np.isfinite(randomised).reshape(len(randomised), -1).all(axis=1))
    t = np.where(finite[:, None, None], trained, 0.0)
    r = np.where(finite[:, None, None], randomised, 0.0)
    out = np.stack([
        np.nan_to_num(spearman(np.abs(t), np.abs(r)), nan=0.0),
        np.nan_to_num(spearman(t, r), nan=0.0),
        ssim(minmax(t), minmax(r)),
    ], axis=1)
    out[~finite] = np.nan
    return out


def collapse_depth(mean_similarity: np.ndarray, threshold: float = 0.5) -> int | None:
    """First depth (1-based) whose mean similarity is below ``threshold``; None if never."""
    below = np.nonzero(np.asarray(mean_similarity) < threshold)[0]
    return int(below[0]) + 1 if below.size else None
