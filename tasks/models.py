"""Loaded classifiers: the model a config names, its input metadata and output checks.

Where the module comes from (the shipped reference CNN, torchvision, timm, the user's code,
an exported program) is :mod:`tasks.model_sources`. Nothing downloads: architectures are
built without pretrained weights and state dicts are read from local files with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attriflow.data import REFERENCE_RECORD, REFERENCE_WEIGHTS
from attriflow.data.embedded import MEAN, STD, make_split
from attriflow.data.reference_cnn import ReferenceCNN
from attriflow.tasks.classes import ClassNamesError, class_names
from attriflow.tasks.config import ModelConfig, OutputConfig
from attriflow.tasks.model_sources import (
    DYNAMIC_EXPORT_HINT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ExportedProgramModule,
    ModelLoadError,
    factory_source,
    local_dependencies,
    program_source,
    reference_source,
    state_dict_digest,
    timm_source,
    torchvision_source,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ExportedProgramModule",
    "LoadedModel",
    "ModelLoadError",
    "SelectOutput",
    "build_model",
    "cached_model",
    "check_model_output",
    "describe_output",
    "state_dict_digest",
]


@dataclass(frozen=True)
class LoadedModel:
    """A classifier in eval mode with the normalisation its inputs need.

    Parameters
    ----------
    module : nn.Module
        The network, parameters frozen (``requires_grad=False``), (N, 3, H, W) -> (N, K).
    mean, std : tuple of 3 float
        Per-channel input normalisation (:meth:`normalize`).
    digest : str
        sha256 of the weights' tensors; for ``model.factory`` also of the factory's source and
        kwargs; for ``model.program`` of the program file.
    description : str
        One line for logs and the manifest.
    classes : tuple of str or None
        ``model.classes`` resolved: the name of each output.
    input_size : tuple of int or None
        (H, W) the model was trained at: timm's ``pretrained_cfg``, torchvision's 224x224.
    crop_pct : float or None
        Centre-crop fraction of the training-time preprocessing (timm; torchvision 0.875).
    interpolation : str or None
        Resize interpolation of that preprocessing (``bilinear``, ``bicubic``...).
    opaque : str or None
        For exported programs: why layers cannot be hooked (a sentence).
    """

    module: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    digest: str
    description: str
    classes: tuple[str, ...] | None = None
    input_size: tuple[int, int] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    opaque: str | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1], shape (N, 3, H, W), to model inputs."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device)[:, None, None]
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device)[:, None, None]
        return (images - mean) / std


# ---------------------------------------------------------------- output structure
def describe_output(out: object, depth: int = 0) -> str:
    """A model output's structure for messages, for example
    ``tuple(Tensor(2, 10) float32, dict(aux=Tensor(2, 5) float32))``.

    Parameters
    ----------
    out : object
        What the forward returned.
    depth : int
        Nesting level (deeper levels are elided).

    Returns
    -------
    str
        The description.
    """
    if isinstance(out, Tensor):
        return f"Tensor({', '.join(str(s) for s in out.shape)}) {str(out.dtype).removeprefix('torch.')}"
    if depth >= 3:
        return f"{type(out).__name__}(...)"
    if isinstance(out, (tuple, list)):
        items = [describe_output(o, depth + 1) for o in out[:8]] + (["..."] if len(out) > 8 else [])
        return f"{type(out).__name__}({', '.join(items)})"
    if isinstance(out, Mapping):
        keys = list(out)[:8]
        items = [f"{k if isinstance(k, str) and k.isidentifier() else repr(k)}="
                 f"{describe_output(out[k], depth + 1)}" for k in keys] + (["..."] if len(out) > 8 else [])
        return f"{type(out).__name__}({', '.join(items)})"
    fields = {k: v for k, v in vars(out).items() if not k.startswith("_")} if hasattr(out, "__dict__") else {}
    if fields:
        inner = ", ".join(f"{k}={describe_output(v, depth + 1)}" for k, v in fields.items())
        return f"{type(out).__name__}({inner})"
    return type(out).__name__


def _is_logits(out: object, batch: int) -> bool:
    return (isinstance(out, Tensor) and out.ndim == 2 and out.shape[0] == batch and out.shape[1] >= 1
            and out.is_floating_point())


def _settings_for_logits(out: object, batch: int) -> list[str]:
    """The ``model.output`` settings that select a (batch, K) floating tensor of ``out``."""
    if isinstance(out, (tuple, list)):
        return [f"{{index: {i}}}" for i, o in enumerate(out) if _is_logits(o, batch)]
    if isinstance(out, Mapping):
        return [f"{{key: {k}}}" for k, o in out.items() if isinstance(k, str) and _is_logits(o, batch)]
    if hasattr(out, "__dict__"):
        return [f"{{attribute: {k}}}" for k, o in vars(out).items()
                if not k.startswith("_") and _is_logits(o, batch)]
    return []


def _suggest(out: object, batch: int) -> str:
    found = _settings_for_logits(out, batch)
    if not found:
        return ("none of its parts is a (N, K) floating tensor; wrap the model so that forward returns the "
                "class scores")
    return f"set model.output: {' or '.join(found)} to select the class scores"


class SelectOutput:
    """A root forward hook that returns one part of the model's output: ``index`` of a tuple
    or list, ``key`` of a mapping, or ``attribute`` of an object (``model.output``).

    A module-level class (not a closure), so ``copy.deepcopy`` and pickle keep it with the
    model. Raises :class:`ModelLoadError` (naming ``model.output`` and showing the output's
    structure) when the part does not exist.

    Parameters
    ----------
    index : int or None
        Position in a tuple or list.
    key : str or None
        Key of a dict (or other mapping).
    attribute : str or None
        Attribute name (``logits`` for Hugging Face outputs).
    """

    def __init__(self, index: int | None = None, key: str | None = None,
                 attribute: str | None = None) -> None:
        self.index, self.key, self.attribute = index, key, attribute

    def __repr__(self) -> str:
        return f"SelectOutput({self.setting()})"

    def setting(self) -> str:
        """The config setting, ``{index: 0}``."""
        if self.index is not None:
            return f"{{index: {self.index}}}"
        return f"{{key: {self.key}}}" if self.key is not None else f"{{attribute: {self.attribute}}}"

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Return the selected part of ``output``."""
        try:
            if self.index is not None:
                if isinstance(output, (tuple, list)):
                    return output[self.index]
            elif self.key is not None:
                if isinstance(output, Mapping):
                    return output[self.key]
            elif not isinstance(output, (Tensor, tuple, list)) or hasattr(type(output), "_fields"):
                return getattr(output, self.attribute)  # type: ignore[arg-type]
        except (IndexError, KeyError, AttributeError):
            pass
        batch = args[0].shape[0] if args and isinstance(args[0], Tensor) else -1
        raise ModelLoadError(f"model.output: {self.setting()} does not fit the model's output "
                             f"{describe_output(output)}; {_suggest(output, batch)}")


def _select_output(module: nn.Module, output: OutputConfig) -> None:
    module.register_forward_hook(SelectOutput(output.index, output.key, output.attribute))


# ---------------------------------------------------------------- building
def build_model(cfg: ModelConfig) -> LoadedModel:
    """Build and load the model a config describes (no download, ever).

    Parameters
    ----------
    cfg : ModelConfig
        One source: ``arch`` (``"reference"``, a torchvision classification model or
        ``"timm:<name>"``), ``factory`` (``"pkg.module:callable"`` or ``"file.py:callable"``)
        or ``program`` (a ``torch.export`` ``.pt2`` file); ``output`` selects the logits of a
        forward returning a tuple, dict or object (a root forward hook, so layer names are
        unchanged); ``classes`` names the outputs.

    Returns
    -------
    LoadedModel
        The model in eval mode with frozen parameters, its normalisation (``model.mean`` /
        ``std`` if given, else the source's: timm's ``pretrained_cfg``, ImageNet's for
        torchvision, factories and programs, the embedded dataset's for the reference CNN),
        its input metadata and digest.

    Raises
    ------
    ModelLoadError
        The message names the field (``model.arch``, ``model.factory``, ``model.program``,
        ``model.classes``, ``model.weights``): an unknown architecture, missing timm, a file
        that is missing, fails to import or holds no module, weights that are missing or do
        not match.
    """
    if cfg.factory:
        src = factory_source(cfg)
    elif cfg.program:
        src = program_source(cfg)
    elif cfg.arch == "reference":
        src = reference_source(cfg)
    elif cfg.arch.startswith("timm:"):
        src = timm_source(cfg)
    else:
        src = torchvision_source(cfg)
    classes = None
    if cfg.classes is not None:
        try:
            classes = class_names(cfg.classes, "model.classes")
        except ClassNamesError as err:
            raise ModelLoadError(str(err)) from None
    module = src.module
    desc = src.description
    if cfg.output is not None:
        _select_output(module, cfg.output)
        desc += f", output {SelectOutput(cfg.output.index, cfg.output.key, cfg.output.attribute).setting()}"
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        module,
        tuple(cfg.mean if cfg.mean is not None else src.mean),  # type: ignore[arg-type]
        tuple(cfg.std if cfg.std is not None else src.std),  # type: ignore[arg-type]
        src.digest,
        desc,
        classes=classes,
        input_size=src.input_size,
        crop_pct=src.crop_pct,
        interpolation=src.interpolation,
        opaque=src.opaque,
    )


def check_model_output(loaded: LoadedModel, example: Tensor) -> int:
    """Check that the model maps a batch of inputs to (N, K) class scores; return K.

    Runs ``loaded.module`` once under ``torch.no_grad`` on ``example`` repeated to a batch of
    2 (so a program exported with a fixed batch size is caught).

    Parameters
    ----------
    loaded : LoadedModel
        The model.
    example : Tensor, shape (1, 3, H, W)
        An input like the ones explained, on the model's device.

    Returns
    -------
    int
        The number of outputs K.

    Raises
    ------
    ModelLoadError
        The output is not a (2, K) floating tensor (the message shows its structure, e.g.
        ``tuple(Tensor(2, 10) float32, Tensor(2, 64) float32)``, and the ``model.output``
        setting that selects a (N, K) part when one exists); an exported program has a
        fixed batch size, another image size, or fails on the batch (``model.program``: how
        to export with a dynamic batch dimension); ``model.classes`` does not have K names; the forward fails.
    """
    module = loaded.module
    inputs = example[:1].expand(2, *example.shape[1:]).contiguous()
    if isinstance(module, ExportedProgramModule) and module.static_batch is not None:
        raise ModelLoadError(f"model.program: the program was exported for batches of exactly "
                             f"{module.static_batch} inputs; explainers need any batch size: "
                             f"{DYNAMIC_EXPORT_HINT}")
    if isinstance(module, ExportedProgramModule) and module.input_shape is not None:
        fixed = module.input_shape[1:]
        if len(fixed) != len(inputs.shape[1:]) or any(
                f is not None and f != s for f, s in zip(fixed, inputs.shape[1:])):
            want = tuple("any" if f is None else f for f in fixed)
            raise ModelLoadError(f"model.program: the program was exported for inputs of shape {want}, the "
                                 f"run's are {tuple(inputs.shape[1:])}; set data.image_size to the program's "
                                 "size, or export it with dynamic height and width")
    try:
        with torch.no_grad():
            out = module(inputs)
    except ModelLoadError:
        raise
    except Exception as err:
        last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        if isinstance(module, ExportedProgramModule):
            raise ModelLoadError(f"model.program: the program fails on a batch of 2 inputs of shape "
                                 f"{tuple(inputs.shape[1:])} ({type(err).__name__}: {last}). If it was "
                                 f"exported with a fixed batch or image size, {DYNAMIC_EXPORT_HINT}") from err
        raise ModelLoadError(f"model: the forward pass fails on a batch of 2 inputs of shape "
                             f"{tuple(inputs.shape[1:])} ({type(err).__name__}: {last})") from err
    if not _is_logits(out, 2):
        raise ModelLoadError(f"model.output: explainers need the forward to return one (N, K) floating "
                             f"tensor of class scores; for N = 2 inputs the model returns "
                             f"{describe_output(out)}: {_suggest(out, 2)}")
    k = int(out.shape[1])
    if loaded.classes is not None and len(loaded.classes) != k:
        raise ModelLoadError(f"model.classes: {len(loaded.classes)} names for a model with {k} outputs; give "
                             "one name per output, in output order")
    return k


def model_files_stamp(cfg: ModelConfig) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime in ns, size) of the files a model config reads (factory file, program,
    weights), so that caches keyed by the config see a file edited in the same process."""
    paths: list[str | Path | None] = [cfg.weights, cfg.program]
    if cfg.factory and cfg.factory.rpartition(":")[0].endswith(".py"):
        paths.append(cfg.factory.rpartition(":")[0])
        paths += local_dependencies(cfg.factory.rpartition(":")[0])
    stamp = []
    for p in paths:
        if p:
            try:
                st = Path(p).stat()
                stamp.append((str(p), st.st_mtime_ns, st.st_size))
            except OSError:
                stamp.append((str(p), -1, -1))
    return tuple(stamp)


@functools.lru_cache(maxsize=4)
def _cached_model(cfg_json: str, stamp: tuple[tuple[str, int, int], ...]) -> LoadedModel:
    return build_model(ModelConfig.model_validate_json(cfg_json))


def cached_model(cfg_json: str) -> LoadedModel:
    """Per-process cache of :func:`build_model`, keyed by the model config's JSON and the
    stamp of the files it reads (:func:`model_files_stamp`)."""
    return _cached_model(cfg_json, model_files_stamp(ModelConfig.model_validate_json(cfg_json)))


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
