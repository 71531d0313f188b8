"""Per-process state shared by the tasks of one run: dataset, model, explainers, device.

Tasks receive only the config JSON and the run directory; this module rebuilds the heavy
objects once per worker process (``functools.lru_cache``) instead of pickling them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import os
import signal
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attriflow.analysis.metrics.sanity import randomisation_units
from attriflow.explainers import Explainer, LayerNotFoundError, UnsupportedModelError, get_explainer
from attriflow.explainers._batching import auto_batch_size
from attriflow.explainers._hooks import capture_outputs
from attriflow.tasks.config import RunConfig
from attriflow.tasks.datasets import DatasetSource, data_files_stamp, open_source, resolve_preprocess
from attriflow.tasks.models import LoadedModel, cached_model, check_model_output, model_files_stamp
from attriflow.tasks.neurons import check_layers, conv_activation_layers


def worker_slot() -> int | None:
    """This process's number among the run's Dask workers (a ``LocalCluster`` names its
    workers 0..N-1; ``dask worker --name K`` sets it), or None outside a numbered worker."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker
        return None
    if isinstance(name, int):
        return name
    return int(name) if isinstance(name, str) and name.isdigit() else None


def pick_device(requested: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    GPU pinning: where several GPUs are visible, the Dask worker numbered K uses GPU
    ``K mod count``, so N workers on an N-GPU machine each get their own device. (Workers
    started with one GPU visible each, as dask-cuda does, all see ``cuda:0``: their own.)
    Outside a numbered worker the first GPU is used.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError("device: 'cuda' requested but torch.cuda.is_available() is False")
        slot, count = worker_slot(), torch.cuda.device_count()
        return torch.device("cuda", slot % count if slot is not None and count > 1 else 0)
    return torch.device(requested)


@dataclass(frozen=True)
class Runtime:
    """Heavy objects of a run, built once per process."""

    config: RunConfig
    source: DatasetSource
    model: LoadedModel
    device: torch.device
    explainers: dict[str, Explainer]
    neuron_layers: tuple[tuple[str, int], ...]  # (layer, channels) of the neuron stage
    sanity_units: tuple[tuple[str, tuple[str, ...]], ...]  # top-down randomisation units

    @property
    def module(self) -> torch.nn.Module:
        """The model on the run's device."""
        return self.model.module

    def example(self) -> torch.Tensor:
        """A zero input of the dataset's size, shape (1, 3, H, W), on the run's device."""
        return torch.zeros((1, 3, *self.source.size), device=self.device)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Name of each model output: ``model.classes``, else the dataset's classes."""
        return self.model.classes or self.source.classes

    @property
    def explain_batch(self) -> int | None:
        """``explain.batch_size`` for ``Explainer.attribute`` (None: automatic)."""
        size = self.config.explain.batch_size
        return None if size == "auto" else int(size)

    def batch_size(self) -> int:
        """Images per forward pass of plain predictions: the configured size, or the
        automatic one for the run's input size."""
        if self.explain_batch is not None:
            return self.explain_batch
        return auto_batch_size(self.module, self.example())

    def precision(self) -> contextlib.AbstractContextManager[object]:
        """The explain stage's numeric context: ``torch.autocast`` for bf16 / fp16."""
        p = self.config.explain.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def prepare_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """Inputs in the configured memory format."""
        if self.config.explain.channels_last:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def build_explainer(self, name: str, module: torch.nn.Module) -> Explainer:
        """The run's explainer ``name`` (same method and parameters) bound to ``module``
        (used by the sanity check for the randomised copies of the model)."""
        entry = next(e for e in self.config.explain.explainers if e.name == name)
        return _make_explainer(entry.method, entry.params, module, self.model, self.example(), name)


def _make_explainer(method: str, params: dict, module: torch.nn.Module, loaded: LoadedModel,
                    example: torch.Tensor, name: str | None = None) -> Explainer:
    try:
        exp = get_explainer(method)(module, **params)
        exp.normalization = (tuple(loaded.mean), tuple(loaded.std))
        try:
            exp.check(example)  # a model the method cannot explain is refused before any work
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"explain.explainers[{name or method}]: {err}") from None
        exp.resolve(example)  # automatic layers are fixed once and recorded with the params
    except LayerNotFoundError as err:  # a configured layer the model does not have
        field = _layer_field(params, err.layer)
        raise LayerNotFoundError(f"explain.explainers[{name or method}].params.{field}: {err}",
                                 err.layer) from None
    return exp


def _layer_field(params: dict, layer: str | None) -> str:
    """The parameter that names ``layer`` (``layer``, ``classifier_layer``, ``layers[1]``, ...)."""
    for key, value in params.items():
        if value == layer:
            return key
        if isinstance(value, (list, tuple)) and layer in value:
            return f"{key}[{list(value).index(layer)}]"
    return "layer"


class ModelDataMismatchError(ValueError):
    """The dataset's classes or settings do not fit the model; the message names the fields."""


def planning_errors() -> tuple[type[Exception], ...]:
    """The errors :func:`get_runtime` raises for a config that cannot run (each message
    names the field, the file or the module); the CLI reports them without a traceback."""
    from attriflow.explainers import ExplainerParamError, LayerNotFoundError
    from attriflow.tasks.classes import ClassNamesError
    from attriflow.tasks.datasets import DatasetError
    from attriflow.tasks.models import ModelLoadError

    return (ModelLoadError, DatasetError, LayerNotFoundError, ExplainerParamError, UnsupportedModelError,
            ClassNamesError, ModelDataMismatchError, DeviceUnavailableError)


class DeviceUnavailableError(RuntimeError):
    """``device: cuda`` on a machine without CUDA."""


def _refuse_opaque(cfg: RunConfig, loaded: LoadedModel) -> None:
    """Stages that hook layers cannot run on an exported program: say so before any work."""
    if not loaded.opaque:
        return
    stages = [f for f, on in (("neurons.enabled", cfg.neurons.enabled), ("sanity.enabled", cfg.sanity.enabled)) if on]
    if stages:
        raise UnsupportedModelError(
            f"{' and '.join(stages)}: {loaded.opaque} The neuron selection reads layer activations and the "
            "sanity check re-initialises layers; set " + " and ".join(f"{f}: false" for f in stages))


def _check_classes(cfg: RunConfig, source: DatasetSource, loaded: LoadedModel, n_outputs: int) -> None:
    """The dataset's labels index the model's outputs: their class lists must agree in length."""
    if cfg.data.kind == "embedded" or len(source.classes) == n_outputs:
        return
    found = ", ".join(source.classes[:8]) + (", ..." if len(source.classes) > 8 else "")
    raise ModelDataMismatchError(
        f"data.classes: the dataset has {len(source.classes)} classes ({found}) but the model has "
        f"{n_outputs} outputs, so its labels cannot be matched to outputs by position. Give model.classes "
        "(a list, a file, or 'imagenet') to match them by name, or data.classes with the dataset's name "
        "of every output in output order")


def get_runtime(config_json: str) -> Runtime:
    """Build (or reuse) the runtime of a config; raises the loaders' clear errors. Reused
    while the config, the model's files (:func:`tasks.models.model_files_stamp`) and the
    dataset's folders and files (:func:`tasks.datasets.data_files_stamp`) are unchanged, so
    a model file edited or images added between two runs of one process are seen."""
    cfg = RunConfig.model_validate_json(config_json)
    return _runtime(config_json, model_files_stamp(cfg.model) + data_files_stamp(cfg.data))


@functools.lru_cache(maxsize=2)
def _runtime(config_json: str, stamp: tuple[tuple[str, int, int], ...]) -> Runtime:
    cfg = RunConfig.model_validate_json(config_json)
    loaded = cached_model(cfg.model.model_dump_json())
    m = cfg.model
    preprocess = resolve_preprocess(
        cfg.data, input_size=loaded.input_size, crop_pct=loaded.crop_pct, interpolation=loaded.interpolation,
        squash_default=m.arch == "reference" and not m.factory and not m.program)
    device = pick_device(cfg.device)
    loaded.module.to(device)
    if cfg.explain.channels_last:  # a private copy: the cached model stays as loaded
        loaded = dataclasses.replace(loaded, module=copy.deepcopy(loaded.module).to(memory_format=torch.channels_last))
    example = torch.zeros((1, 3, *preprocess.size), device=device)
    n_outputs = check_model_output(loaded, example)  # the model first: its errors come before the data's
    refusals, explainers = [], {}
    try:
        _refuse_opaque(cfg, loaded)
    except UnsupportedModelError as err:
        refusals.append(str(err))
    for entry in cfg.explain.explainers:
        try:
            explainers[entry.name] = _make_explainer(entry.method, entry.params, loaded.module, loaded, example,
                                                     entry.name)
        except UnsupportedModelError as err:
            refusals.append(str(err))
    if refusals:  # every refusal at once, not one per attempt
        raise UnsupportedModelError("\n".join(refusals))
    source = open_source(cfg.data, preprocess, loaded.classes)
    _check_classes(cfg, source, loaded, n_outputs)
    layers: tuple[tuple[str, int], ...] = ()
    if cfg.neurons.enabled:
        names = cfg.neurons.layers
        if names:
            check_layers(loaded.module, names)
        else:
            names = conv_activation_layers(loaded.module, example)
        with capture_outputs(loaded.module, names) as acts, torch.no_grad():
            loaded.module(example)
        layers = tuple((n, int(acts[n].shape[1])) for n in names)
    units: tuple[tuple[str, tuple[str, ...]], ...] = ()
    if cfg.sanity.enabled:
        units = tuple((u, tuple(ms)) for u, ms in randomisation_units(loaded.module, cfg.sanity.granularity))
    return Runtime(cfg, source, loaded, device, explainers, layers, units)


def derive_seed(run_seed: int, sample_id: int, method: str) -> int:
    """Seed of one random draw, from (run seed, sample id, method) only."""
    blob = f"{run_seed}:{sample_id}:{method}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & (2**63 - 1)


def array_digest(*arrays: np.ndarray | None) -> str:
    """sha256 over arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


PACKAGES = ("attriflow", "torch", "torchvision", "numpy", "xarray", "zarr", "prefect", "pydantic")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape results."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@functools.cache
def git_commit() -> str:
    """Commit of the attriflow checkout, or ``unknown`` outside a git work tree."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Fault injection for crash tests: ``ATTRIFLOW_FAULT=<name>:<n>`` SIGKILLs this
    process the n-th time it reaches point ``name`` (for example ``explain.after_write:2``).
    """
    spec = os.environ.get("ATTRIFLOW_FAULT")
    if not spec:
        return
    point, _, count = spec.rpartition(":")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] >= int(count):
        os.kill(os.getpid(), signal.SIGKILL)


class InjectedFault(RuntimeError):
    """Raised by :func:`fault_raise` (tests of the retry policy and of failing shards): a
    transient error, retried."""


class InjectedInputError(ValueError):
    """Raised by :func:`fault_raise` with ``:deterministic``: an error that a retry repeats."""


#: Exceptions that a retry of the same task on the same inputs raises again: wrong
#: parameters, shapes, names, refusals (the explainers' and the store's errors derive from
#: ``ValueError`` or ``KeyError``).
DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, AttributeError, NotImplementedError, ArithmeticError, AssertionError,
    ImportError)
#: Exceptions that may pass on a retry, wherever they sit in an exception's chain: I/O (a
#: network file system, a remote store; zarr's "not found" errors are ``FileNotFoundError``
#: too), memory, the device's memory.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, MemoryError, torch.OutOfMemoryError)


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (``__cause__``,
    ``__context__``, also where ``from None`` hides them from the traceback)."""
    out: list[BaseException] = []
    while exc is not None and not any(exc is seen for seen in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def is_deterministic(exc: BaseException | None) -> bool:
    """Whether a retry would raise ``exc`` again: an exception of
    :data:`DETERMINISTIC_ERRORS` (itself or one it was raised from) with no
    :data:`TRANSIENT_ERRORS` anywhere in its chain (a ``ValueError`` wrapping an ``OSError``
    may pass on a retry). Unknown exceptions (``RuntimeError``, a lost worker) and None count
    as transient."""
    chain = _chain(exc)
    if any(isinstance(e, TRANSIENT_ERRORS) for e in chain):
        return False
    return any(isinstance(e, DETERMINISTIC_ERRORS) for e in chain)


def failure_of(state: Any) -> BaseException | None:
    """The exception a failed Prefect state holds, or None where it cannot be read."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        out = state.result(raise_on_failure=False, retry_result_failure=False, _sync=True)
    except Exception:  # noqa: BLE001 - an unreadable result: treated as transient
        return None
    return out if isinstance(out, BaseException) else None


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed shard task unless its error is
    deterministic (:func:`is_deterministic`): a retry would only repeat it, cost the task's
    time again, and delay the message naming what to fix. The error is then logged with its
    traceback (Prefect logs it only once the retries are spent)."""
    exc = failure_of(state)
    if not is_deterministic(exc):
        return True
    try:
        from prefect import get_run_logger

        get_run_logger().error(f"not retried: {type(exc).__name__} is an error a retry would repeat",
                               exc_info=(type(exc), exc, exc.__traceback__))
    except Exception:  # noqa: BLE001 - no run logger: the final message still names the error
        pass
    return False


def fault_raise(run_dir: str | Path, label: str) -> None:
    """Fault injection for retry tests: ``ATTRIFLOW_RAISE=<label>:<times>[:deterministic]``
    makes the task ``label`` (its task-run name, e.g. ``explain-grad_cam-1``) raise the first
    ``times`` times it runs (``always``: every time): :class:`InjectedFault` (transient), or
    :class:`InjectedInputError` with ``:deterministic``. Several specs are separated by commas.
    Counted in ``RUN_DIR/.faults/`` so that retries on other worker processes see the count."""
    for spec in filter(None, os.environ.get("ATTRIFLOW_RAISE", "").split(",")):
        target, _, times = spec.rpartition(":")
        kind = "transient"
        if times == "deterministic":
            kind = times
            target, _, times = target.rpartition(":")
        if target != label:
            continue
        counter = Path(run_dir) / ".faults" / label
        counter.parent.mkdir(parents=True, exist_ok=True)
        with counter.open("ab") as f:
            f.write(b".")
        if times == "always" or counter.stat().st_size <= int(times):
            error = InjectedInputError if kind == "deterministic" else InjectedFault
            raise error(f"injected fault in {label} (ATTRIFLOW_RAISE={spec})")
