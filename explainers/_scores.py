"""Which output scalar an explainer explains (grad-cam's "target" idea, kept separate)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from attriflow.explainers.base import UnsupportedModelError

ScoreKind = Literal["logit", "log_prob", "prob"]


def target_scores(logits: Tensor, targets: Tensor, kind: ScoreKind) -> Tensor:
    """Scalar per image for the target class.

    Parameters
    ----------
    logits : Tensor, shape (N, K)
        Model outputs.
    targets : Tensor, shape (N,)
        Class indices.
    kind : {"logit", "log_prob", "prob"}
        The raw logit, the log-softmax or the softmax probability.

    Returns
    -------
    Tensor, shape (N,)
        The selected scores.

    Raises
    ------
    UnsupportedModelError
        For ``prob`` / ``log_prob`` of a model with one output (a constant).
    """
    if kind != "logit" and logits.shape[1] == 1:
        raise UnsupportedModelError(
            f"score {kind!r}: the model has a single output, whose softmax is 1 for every input; "
            "explain score 'logit' (params.score) for a one-logit model")
    if kind == "log_prob":
        logits = torch.log_softmax(logits, dim=1)
    elif kind == "prob":
        logits = torch.softmax(logits, dim=1)
    return logits.gather(1, targets[:, None])[:, 0]
