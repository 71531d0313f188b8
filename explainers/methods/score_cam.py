"""Score-CAM (Wang et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor

from attriflow.explainers._batching import iter_jobs
from attriflow.explainers._cam import CAMExplainer, CAMParams
from attriflow.explainers._numerics import minmax_scale, working_dtype
from attriflow.explainers._scores import ScoreKind, target_scores
from attriflow.explainers.base import ExplainerSpec, Family
from attriflow.explainers.registry import register


class ScoreCAMParams(CAMParams):
    """Parameters of :class:`ScoreCAM`."""

    score: ScoreKind = "prob"
    channel_softmax: bool = False
    align_corners: bool = False


@register
class ScoreCAM(CAMExplainer):
    """Activation maps weighted by the target score of the input masked by each map.

    Each channel's activation is upsampled to the input size (bilinear), min-max scaled to
    [0, 1] (``+1e-8``) and multiplied into the input; the target's softmax probability on
    that masked input is the channel's weight (the authors' code). pytorch-grad-cam's
    variant is ``score="logit", channel_softmax=True, align_corners=True``. Masked inputs
    are built ``batch_size`` at a time, across images, never all at once.

    For float16 / bfloat16 activations (``model.half()``, autocast) the scaling, scores and
    weighted sum run in float32 (:func:`explainers._numerics.minmax_scale`): in float16 the
    ``1e-8`` rounds to 0 and a constant channel gave 0 / 0 = NaN masks; it now gives an
    all-zero mask, as in float32.

    References
    ----------
    H. Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
    Networks", CVPR-W 2020.
    """

    spec = ExplainerSpec(
        name="score_cam",
        version=2,  # issue #13: in-place / functional activations, refusals, 16-bit guards
        family=Family.CAM,
        access=("activations", "forward"),
        batches_evaluations=True,
        summary="activations weighted by the score of the input masked by each map",
        references=("wang2020",),
    )
    Params = ScoreCAMParams
    uses_gradients = False

    @classmethod
    def pass_cost(cls, params: BaseModel) -> dict[str, int | str]:  # noqa: D102
        return {"forward": "1 + channels(layer)", "backward": 0}

    def weighted(self, inputs: Tensor, targets: Tensor, acts: Tensor, grads: Tensor | None) -> Tensor:
        """``w_k A_k`` (N, C, h, w), ``w_k`` the score of the input masked by channel k."""
        n, c = acts.shape[:2]
        work = working_dtype(acts.dtype)  # float32 for float16 / bfloat16 activations
        scores = torch.empty((n, c), dtype=work, device=acts.device)
        with torch.no_grad():
            for img, ch in iter_jobs(n, c, self.batch_size, acts.device):
                up = F.interpolate(acts[img, ch][:, None], size=inputs.shape[-2:], mode="bilinear",
                                   align_corners=self.p.align_corners)
                masks = minmax_scale(up, 1e-8).to(inputs.dtype)  # a constant channel gives 0, not NaN
                scores[img, ch] = target_scores(self.model(inputs[img] * masks), targets[img],
                                                self.p.score).to(work)
        self.last_forward_passes = torch.full((n,), 1 + c, dtype=torch.int64)
        weights = torch.softmax(scores, dim=1) if self.p.channel_softmax else scores
        return weights[:, :, None, None] * acts.to(work)
