"""SISE, semantic input sampling for explanation (Sattarzadeh et al. 2021)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from attriflow.explainers._hooks import capture_outputs, default_cam_layer, get_layer, trace
from attriflow.explainers._numerics import guard, minmax_scale, working_dtype
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers.base import Explainer, ExplainerSpec, Family
from attriflow.explainers.registry import register


def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold on a 256-bin histogram, as ``skimage.filters.threshold_otsu``."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if np.all(flat == flat[0]):
        return float(flat[0])
    counts, edges = np.histogram(flat, bins=nbins, range=(flat.min(), flat.max()))
    centers = (edges[:-1] + edges[1:]) / 2
    keep = counts > 0  # skimage trims empty bins at both ends
    start, end = np.argmax(keep), keep.size - np.argmax(keep[::-1])
    counts, centers = counts[start:end].astype(np.float32), centers[start:end]
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * centers) / w1
    m2 = (np.cumsum((counts * centers)[::-1]) / w2[::-1])[::-1]
    var = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centers[int(np.argmax(var))])


def fuse(maps: list[Tensor], soft: bool = False, temperature: float = 100.0, tau: float = 1.5) -> Tensor:
    """Cascaded block-wise fusion, shallow to deep: ``E <- (E + V_l) * B(V_l)``.

    ``B`` is the hard Otsu region ``1[V > t]`` (paper) or, with ``soft``, the course code's
    ``sigmoid(temperature * (V - t'))`` where ``t' = tau * t`` when fewer than 10 % of the
    pixels exceed ``tau * t`` and ``t`` otherwise.

    Parameters
    ----------
    maps : list of Tensor, each shape (N, H, W)
        Visualization maps from the shallowest to the deepest layer.
    soft, temperature, tau : bool, float, float
        The soft variant and its constants.

    Returns
    -------
    Tensor, shape (N, H, W)
        The fused explanation.
    """
    fused = maps[0]
    for v in maps[1:]:
        gates = []
        for i in range(len(v)):
            vi = v[i].detach().cpu().numpy()
            t = otsu_threshold(vi)
            if soft:
                if (vi > tau * t).mean() < 0.1:
                    t = tau * t
                gates.append(torch.sigmoid(temperature * (v[i] - t)))
            else:
                gates.append((v[i] > t).to(v.dtype))
        fused = (fused + v) * torch.stack(gates)
    return fused


def _minmax(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-item min-max scaling, in float32 for 16-bit inputs (see ``minmax_scale``)."""
    return minmax_scale(x, eps)


_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def block_layers(model: nn.Module, example: Tensor, point: Literal["input", "output"] = "input") -> list[str]:
    """One layer per convolutional block: the module producing the input (or the output) of
    every spatial down-sampling operation, in forward order.

    A down-sampling operation is a leaf module whose spatial output is smaller than its
    spatial input: a pool (the global average pool included) or a strided convolution that
    reads a tensor made outside its own block (ResNet's first block convolution or
    shortcut, not ResNet-50's strided conv2, whose input is internal to the block), so the
    last convolutional output is the input of the global pool (ResNet, the reference CNN)
    or of the last max-pool (VGG). When several modules produce the same tensor, the
    outermost one (``layer1`` rather than ``layer1.1.relu``) names it. The model's own input
    (a strided stem convolution) is skipped.

    Parameters
    ----------
    model : nn.Module
        The classifier.
    example : Tensor, shape (1, C, H, W)
        Input for one traced forward pass.
    point : {"input", "output"}
        Inputs of the down-sampling ops (the paper) or their outputs (the course code's VGG
        branch).

    Returns
    -------
    list of str
        Module names.
    """
    calls = trace(model, example)
    producer: dict[int, str] = {}
    for c in calls:  # later (outer) modules overwrite inner ones: the outermost name wins
        if c.output is not None:
            producer[id(c.output)] = c.name
    events = [(c.name, id(c.input), id(c.output), tuple(c.input.shape), tuple(c.output.shape))
              for c in calls if c.input is not None and c.output is not None]
    modules = dict(model.named_modules())
    layers: list[str] = []
    for name, in_id, out_id, in_shape, out_shape in events:
        module = modules[name]
        if len(in_shape) != 4 or len(out_shape) != 4 or any(True for _ in module.children()):
            continue  # operations only: containers are not down-sampling operations
        if in_shape[2] * in_shape[3] <= out_shape[2] * out_shape[3]:
            continue
        tensor_id = in_id if point == "input" else out_id
        if tensor_id not in producer:  # the model's input
            continue
        owner = producer[tensor_id]
        parent = name.rpartition(".")[0]
        if not isinstance(module, _POOLS) and parent and owner.startswith(parent + "."):
            continue  # a strided convolution inside a block (ResNet-50's conv2) is no block boundary
        if owner not in layers:
            layers.append(owner)
    # plus the last convolutional output when no down-sampling module reads it (a functional
    # global pool, as in MobileNet) and it is not itself a pool's output (VGG's last pool)
    last = default_cam_layer(model, example)
    pooled = {out_id for name, _, out_id, i, o in events
              if isinstance(modules[name], _POOLS) and len(i) == 4 and len(o) == 4}
    last_out = next((out_id for name, _, out_id, _, _ in reversed(events) if name == last), None)
    if last not in layers and producer.get(last_out) not in layers and last_out not in pooled:
        layers.append(last)
    return layers


class SISEParams(BaseModel):
    """Parameters of :class:`SISE`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layers: list[str] | None = Field(None, min_length=1, description="None: every block's output")
    layer_point: Literal["input", "output"] = "input"
    mu: float = Field(0.0, ge=0.0, le=1.0)
    gradient_score: ScoreKind = "logit"
    mask_score: ScoreKind = "prob"
    fusion: Literal["hard", "soft"] = "hard"
    temperature: float = Field(100.0, gt=0.0)
    tau: float = Field(1.5, gt=0.0)


@register
class SISE(Explainer):
    """Block-wise attribution-based input sampling (seed-sise.md, sections 2 and 7).

    1. Layers: one per convolutional block, found by :func:`block_layers` (inputs of the
       down-sampling operations; ``layers`` overrides, ``layer_point="output"`` takes the
       pools' outputs as the course code's VGG branch does).
    2. One forward and one backward of the target logit to all layers at once; channel ``k``
       is kept when the spatial sum of its gradient exceeds ``mu`` times the largest (mu = 0
       keeps the positive-gradient maps).
    3. Each kept map is upsampled bilinearly to the input, min-max scaled to [0, 1]
       (``+1e-6``) and multiplied into the normalised input (hidden pixels take the mean
       colour, as RISE/TorchRay); its score is the target's softmax probability.
       ``V_l = sum_m s_m m / (sum m + 1e-6)``, min-max scaled. Masked inputs of all
       images and layers are packed into forward passes of ``batch_size``.
    4. Cascaded fusion with hard Otsu thresholds (paper; ``fusion="soft"`` is the course
       code's sigmoid variant with ``temperature`` and ``tau``).

    The number of forward passes per image (kept maps) is recorded in ``last_forward_passes``.
    For float16 / bfloat16 models or autocast, the scalings, guards and sums run in float32
    (masks are cast to the model's dtype only to be applied), so constant maps give zeros,
    not NaN.

    References
    ----------
    S. Sattarzadeh et al., "Explaining Convolutional Neural Networks through Attribution-
    Based Input Sampling and Block-Wise Feature Aggregation", AAAI 2021.
    """

    spec = ExplainerSpec(
        name="sise",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.CAM,
        access=("gradients", "activations", "forward"),
        batches_evaluations=True,
        summary="block-wise feature maps scored by input sampling, fused with Otsu gates "
                "(hybrid: CAM maps, perturbation scoring)",
        references=("sattarzadeh2021",),
    )
    Params = SISEParams

    def __init__(self, model: nn.Module, **params: Any) -> None:
        super().__init__(model, **params)
        for name in self.p.layers or []:
            get_layer(model, name)

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": "1 + kept maps (positive-gradient channels of the block layers)", "backward": 1}

    def resolve(self, example: Tensor) -> None:
        """Fix the automatically chosen layers (recorded in ``params()``)."""
        if self.p.layers is None:
            self.resolved["layers"] = block_layers(self.model, example[:1], self.p.layer_point)

    def layer_names(self, example: Tensor) -> list[str]:
        """The block layers used for this model and input size."""
        if self.p.layers:
            return list(self.p.layers)
        if "layers" not in self.resolved:
            self.resolve(example)
        return list(self.resolved["layers"])

    def visualization_maps(self, inputs: Tensor, targets: Tensor) -> list[Tensor]:
        """``V_l`` of every block layer, each (N, H, W) min-max scaled, shallow to deep."""
        names = self.layer_names(inputs)
        with capture_outputs(self.model, names) as acts, torch.enable_grad():
            for p in self.model.parameters():
                p.requires_grad_(False)
            x = inputs.detach().clone().requires_grad_(True)
            scores = target_scores(self.model(x), targets, self.p.gradient_score)
            feats = [acts[n] for n in names]
            grads = torch.autograd.grad(scores.sum(), feats)
        n = len(inputs)
        jobs: list[tuple[int, int, int]] = []  # (image, layer, channel)
        for li, g in enumerate(grads):
            alpha = g.sum(dim=(2, 3))
            keep = alpha > self.p.mu * alpha.amax(dim=1, keepdim=True)
            for img, ch in keep.nonzero().tolist():
                jobs.append((img, li, ch))
        self.last_forward_passes = torch.bincount(
            torch.tensor([j[0] for j in jobs], dtype=torch.int64), minlength=n) + 1
        size = inputs.shape[-2:]
        work = working_dtype(inputs.dtype)  # float32 sums and guards for float16 inputs
        sums = [torch.zeros((n, *size), dtype=work, device=inputs.device) for _ in names]
        with torch.inference_mode():
            for s in range(0, len(jobs), self.batch_size):
                batch = jobs[s : s + self.batch_size]
                img = torch.tensor([j[0] for j in batch], device=inputs.device)
                parts = []  # jobs are grouped by layer: upsample each layer's maps together
                for li in sorted({j[1] for j in batch}):
                    sel = [(i, ch) for i, lj, ch in batch if lj == li]
                    maps = feats[li].detach()[[i for i, _ in sel], [ch for _, ch in sel]]
                    parts.append(F.interpolate(maps[:, None], size=size, mode="bilinear",
                                               align_corners=False)[:, 0])
                masks = _minmax(torch.cat(parts)).to(work)
                score = target_scores(self.model(inputs[img] * masks[:, None].to(inputs.dtype)),
                                      targets[img], self.p.mask_score).to(work)
                weighted = score.view(-1, 1, 1) * masks / (masks.sum(dim=(1, 2), keepdim=True)
                                                          + guard(1e-6, work))
                for li in range(len(names)):
                    sel = torch.tensor([j[1] == li for j in batch], device=inputs.device)
                    if sel.any():
                        sums[li].index_add_(0, img[sel], weighted[sel])
        return [_minmax(v) for v in sums]

    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        maps = self.visualization_maps(inputs, targets)
        return fuse(maps, soft=self.p.fusion == "soft", temperature=self.p.temperature, tau=self.p.tau)
