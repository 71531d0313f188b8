"""Loading classifiers: the shipped reference CNN and torchvision models from local weights.

Nothing here downloads. A torchvision architecture is built with ``weights=None`` and its
state dict is read from the path the user gives, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data import REFERENCE_RECORD, REFERENCE_WEIGHTS
from data.embedded import MEAN, STD, make_split
from data.reference_cnn import ReferenceCNN
from tasks.config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelLoadError(ValueError):
    """A model that cannot be built or loaded; the message says what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A classifier in eval mode with the normalisation its inputs need."""

    module: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    digest: str  # sha256 of the weights' tensors (or of the file when one is given)
    description: str

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1], shape (N, 3, H, W), to model inputs."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device)[:, None, None]
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device)[:, None, None]
        return (images - mean) / std


def state_dict_digest(module: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of a module's state dict."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(
            f"weights file {str(path)!r} not found. attriflow never downloads weights: put the "
            "file there (for example a torchvision checkpoint saved with "
            "torch.save(model.state_dict(), path)) or change model.weights in the config"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle needing arbitrary code, or a corrupt file
        text = str(err)
        why = next((ln.split("error:", 1)[1].strip() for ln in text.splitlines() if "Unpickler error:" in ln),
                   text.splitlines()[0] if text else type(err).__name__)
        why = why.split(" Please use")[0]
        raise ModelLoadError(
            f"cannot load {str(path)!r} safely with torch.load(weights_only=True) ({why}). "
            "If you trust the file, convert it once to a plain state dict: "
            "torch.save(torch.load(path, weights_only=False).state_dict(), 'weights.pth')"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{str(path)!r} does not hold a state dict")
    return obj


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and tuple(own[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:10])}")
        if mismatched:
            parts.append(f"shape mismatches (file vs model): {', '.join(mismatched[:10])}")
        raise ModelLoadError(f"weights {str(path)!r} do not match the architecture; " + "; ".join(parts))
    module.load_state_dict(state)


def build_model(cfg: ModelConfig) -> LoadedModel:
    """Build and load the model a config describes (no download, ever).

    Parameters
    ----------
    cfg : ModelConfig
        ``arch`` is ``"reference"`` or a torchvision classification model name.

    Returns
    -------
    LoadedModel
        The model in eval mode with its normalisation and weight digest.

    Raises
    ------
    ModelLoadError
        If the architecture is unknown or the weights are missing or do not match.
    """
    if cfg.arch == "reference":
        torch.manual_seed(cfg.init_seed)
        module: nn.Module = ReferenceCNN(num_classes=cfg.num_classes or 10)
        path = None if cfg.random_init else Path(cfg.weights) if cfg.weights else REFERENCE_WEIGHTS
        mean, std = MEAN, STD
    else:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if cfg.arch not in names:
            raise ModelLoadError(
                f"model.arch: unknown architecture {cfg.arch!r}; use 'reference' or one of "
                f"torchvision's: {', '.join(sorted(names))}"
            )
        kwargs: dict[str, Any] = {"weights": None}
        if cfg.num_classes:
            kwargs["num_classes"] = cfg.num_classes
        torch.manual_seed(cfg.init_seed)
        module = torchvision.models.get_model(cfg.arch, **kwargs)
        path = Path(cfg.weights) if cfg.weights else None
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if cfg.mean is not None:
        mean = cfg.mean
    if cfg.std is not None:
        std = cfg.std
    if path is not None:
        _load_into(module, _read_state_dict(path), path)
        desc = f"{cfg.arch} from {path}"
    else:
        desc = f"{cfg.arch} randomly initialised (seed {cfg.init_seed})"
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return LoadedModel(module, tuple(mean), tuple(std), state_dict_digest(module), desc)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=4)
def cached_model(cfg_json: str) -> LoadedModel:
    """Per-process cache of :func:`build_model`, keyed by the model config's JSON."""
    return build_model(ModelConfig.model_validate_json(cfg_json))


# ---------------------------------------------------------------- reference training
TRAIN_CONFIG: dict[str, Any] = {
    "seed": 0,
    "dataset_seed": 0,
    "image_size": 64,
    "n_train": 6000,
    "epochs": 8,
    "batch_size": 64,
    "optimizer": "AdamW",
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "schedule": "one-cycle",
}


def evaluate_accuracy(model: LoadedModel, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on images in [0, 1], shape (N, 3, H, W)."""
    correct = 0
    with torch.inference_mode():
        for s in range(0, len(images), 256):
            x = model.normalize(torch.from_numpy(images[s : s + 256]))
            correct += int((model.module(x).argmax(1).numpy() == labels[s : s + 256]).sum())
    return correct / len(images)


def train_reference(
    out_weights: Path = REFERENCE_WEIGHTS,
    out_record: Path = REFERENCE_RECORD,
    *,
    overrides: dict[str, Any] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train the reference CNN deterministically on the embedded dataset.

    Parameters
    ----------
    out_weights, out_record : Path
        Where to write the state dict and the JSON training record.
    overrides : dict or None
        Changes to :data:`TRAIN_CONFIG` (tests use a tiny run).
    log : callable
        Progress printer.

    Returns
    -------
    dict
        The training record (config, seed, accuracy, digest, time).
    """
    cfg = {**TRAIN_CONFIG, **(overrides or {})}
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, out_weights, out_record, log)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(cfg: dict[str, Any], out_weights: Path, out_record: Path, log: Any) -> dict[str, Any]:
    torch.manual_seed(cfg["seed"])
    t0 = time.perf_counter()
    train = make_split("train", 0, cfg["n_train"], seed=cfg["dataset_seed"], image_size=cfg["image_size"])
    test = make_split("test", seed=cfg["dataset_seed"], image_size=cfg["image_size"])
    model = ReferenceCNN()
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    x_all = (torch.from_numpy(train.images) - mean) / std
    y_all = torch.from_numpy(train.labels)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = -(-len(x_all) // cfg["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg["lr"], total_steps=cfg["epochs"] * steps_per_epoch
    )
    gen = torch.Generator().manual_seed(cfg["seed"])
    for epoch in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for s in range(0, len(perm), cfg["batch_size"]):
            idx = perm[s : s + cfg["batch_size"]]
            loss = nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log(f"epoch {epoch + 1}/{cfg['epochs']}: loss {total / len(perm):.4f}")
    model.eval()
    loaded = LoadedModel(model, MEAN, STD, state_dict_digest(model), "reference")
    acc = evaluate_accuracy(loaded, test.images, test.labels)
    record = {
        "architecture": "ReferenceCNN",
        "classes": 10,
        "test_accuracy": acc,
        "n_test": len(test.labels),
        "train_config": cfg,
        "weights_sha256": loaded.digest,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out_weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_weights)
    out_record.write_text(json.dumps(record, indent=2) + "\n")
    log(f"test accuracy {acc:.4f}; weights -> {out_weights}")
    return record
