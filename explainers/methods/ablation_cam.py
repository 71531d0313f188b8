"""Ablation-CAM (Desai & Ramaswamy 2020), with the layers before the target layer run once."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

from attriflow.explainers._cam import CAMExplainer, CAMParams
from attriflow.explainers._hooks import capture_outputs
from attriflow.explainers._numerics import LOW_PRECISION, LowPrecisionError, as_working, working_dtype
from attriflow.explainers._scores import target_scores
from attriflow.explainers._suffix import LayerSuffix, SuffixUnavailable, expand_values
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


class AblationCAMParams(CAMParams):
    """Parameters of :class:`AblationCAM`."""


@register
class AblationCAM(CAMExplainer):
    """Channel weights from the drop of the target score when each channel is ablated:
    ``w_k = (y - y_k) / y``, map ``ReLU(sum_k w_k A_k)``.

    The ablated channel is set to 0 when the image's activations have minimum 0 (after a
    ReLU), else to ``min - 1e7`` (pytorch-grad-cam's rule for signed activations). Unlike
    pytorch-grad-cam, which re-runs the whole network for every batch of ablations, the
    network is cut after the target layer (``torch.fx``): the layers before it run once per
    image and each ablation runs only the layers after it, ``batch_size`` ablations per
    call. Models that ``torch.fx`` cannot trace fall back to whole-network passes (same
    maps, slower).

    In float16 (``model.half()`` or autocast) ``min - 1e7`` is not representable: the
    dtype's lowest finite value is used, scores and weights are computed in float32, and
    when an ablation still overflows in the layers after the target layer (scores not
    finite) :class:`explainers._numerics.LowPrecisionError` is raised rather than a NaN map.

    Raises
    ------
    LowPrecisionError
        In float16 / bfloat16, when the ablated scores are not finite.

    References
    ----------
    S. Desai, H. G. Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional
    Network via Gradient-free Localization", WACV 2020.
    """

    spec = ExplainerSpec(
        name="ablation_cam",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.CAM,
        access=("activations", "forward"),
        batches_evaluations=True,
        summary="activations weighted by the score drop when each channel is ablated",
        references=("desai2020",),
    )
    Params = AblationCAMParams
    uses_gradients = False

    @classmethod
    def pass_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": "1 + channels(layer) passes of the layers after it", "backward": 0}

    def _suffix(self, name: str) -> LayerSuffix | None:
        cache: dict[str, Any] = self.__dict__.setdefault("_suffixes", {})
        if name not in cache:
            try:
                cache[name] = LayerSuffix(self.model, name)
            except SuffixUnavailable:
                cache[name] = None
        return cache[name]

    def layer_map(self, inputs: Tensor, targets: Tensor) -> Tensor:  # noqa: D102
        cam = self.reduce(self.weighted(inputs, targets, None, None))
        return cam.clamp_min(0) if self.p.relu else cam

    def weighted(self, inputs: Tensor, targets: Tensor, acts: Tensor | None = None,
                 grads: Tensor | None = None) -> Tensor:
        """``w_k A_k`` (N, C, h, w) with the ablation weights ``w_k``.

        ``acts`` and ``grads`` are not used: the layer's activations are computed here, on
        the cut network, whose prefix values the ablations reuse.
        """
        name = self.layer_name(inputs)
        suffix = self._suffix(name)
        with torch.no_grad():
            if suffix is not None:
                values = suffix.prefix(inputs)
                acts = values[suffix.layer_index]
                logits = suffix.suffix(values)
            else:
                with capture_outputs(self.model, [name]) as captured:
                    logits = self.model(inputs)
                acts = captured[name]
                values = []
            y = target_scores(logits, targets, self.p.score)
            n, c = acts.shape[:2]
            work = working_dtype(y.dtype)  # float32 scores and weights for float16 models
            y = y.to(work)
            ablated = torch.empty((n, c), dtype=work, device=y.device)
            step = max(1, self.batch_size)
            lowest = torch.finfo(acts.dtype).min  # min - 1e7 is -inf in float16: use its lowest
            for i in range(n):
                value = 0.0 if acts[i].min() == 0 else max(float(acts[i].min()) - 1e7, lowest)
                for s in range(0, c, step):
                    k = torch.arange(s, min(s + step, c), device=acts.device)
                    batch = acts[i : i + 1].repeat(len(k), 1, 1, 1)
                    batch[torch.arange(len(k)), k] = value
                    if suffix is not None:
                        cut = expand_values(values, i, len(k))
                        cut[suffix.layer_index] = batch
                        out = suffix.suffix(cut)
                    else:
                        out = self._replaced(name, inputs[i : i + 1].expand(len(k), -1, -1, -1), batch)
                    ablated[i, s : s + len(k)] = target_scores(out, targets[i].expand(len(k)), self.p.score)
            if acts.dtype in LOW_PRECISION and not torch.isfinite(ablated).all():
                raise LowPrecisionError(
                    f"ablation_cam: ablating a channel of layer {name!r} (set to min - 1e7, clipped "
                    f"to {lowest:g}) overflows {acts.dtype} in the layers after it, so the ablated "
                    "scores are not finite; explain this layer in float32 (fp16 is not supported "
                    "here) or pick a layer whose activations are non-negative (after a ReLU)")
            weights = (y[:, None] - ablated) / y[:, None]
            self.last_forward_passes = torch.full((n,), 1 + c, dtype=torch.int64)
            return weights[:, :, None, None].to(work) * as_working(acts)

    def _replaced(self, name: str, inputs: Tensor, output: Tensor) -> Tensor:
        """Whole-network fallback: the layer's output replaced by ``output``."""
        module = dict(self.model.named_modules())[name]
        handle = module.register_forward_hook(lambda m, i, o: output)
        try:
            return self.model(inputs)
        finally:
            handle.remove()
