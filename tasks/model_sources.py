"""Where a classifier comes from: the reference CNN, torchvision, timm, the user's own code
(``model.factory``) or a saved ``torch.export`` program (``model.program``).

Each source builds an ``nn.Module`` with the metadata :class:`tasks.models.LoadedModel`
carries (normalisation, training resolution, digest). Nothing here downloads: torchvision
and timm architectures are built without pretrained weights and state dicts are read from
the local file the user gives.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attriflow.data import REFERENCE_WEIGHTS
from attriflow.data.embedded import MEAN, STD
from attriflow.data.reference_cnn import ReferenceCNN
from attriflow.tasks.config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: torchvision's classification presets (``ImageClassification``): 224 px crops of
#: images resized to 256 px, bilinear.
TORCHVISION_INPUT = {"input_size": (224, 224), "crop_pct": 0.875, "interpolation": "bilinear"}

#: How to export a program that accepts any batch size (checked with torch 2.14).
DYNAMIC_EXPORT_HINT = (
    "export it with a dynamic batch dimension and an example batch of at least 2: "
    "torch.export.save(torch.export.export(model.eval(), (torch.rand(2, 3, H, W),), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2')"
)


class ModelLoadError(ValueError):
    """A model that cannot be built or loaded; the message names the config field and says
    what to do."""


@dataclass(frozen=True)
class Source:
    """A built module and what its source says about its inputs (see :class:`LoadedModel`)."""

    module: nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    digest: str
    description: str
    input_size: tuple[int, int] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    opaque: str | None = None


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


def _unpickler_reason(text: str) -> str:
    """The reason in a ``torch.load(weights_only=True)`` error: the text after its
    "Unpickler error:" (on that line or the next non-empty one), else its first line."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Unpickler error:" in line:
            rest = [line.split("error:", 1)[1].strip(), *(ln.strip() for ln in lines[i + 1:])]
            return next((r for r in rest if r), "").split(" Please use")[0]
    return lines[0] if lines else ""


def _last_line(err: BaseException) -> str:
    """``"ZeroDivisionError: division by zero"``: the last line Python prints for ``err``."""
    return traceback.format_exception_only(type(err), err)[-1].strip()


# ---------------------------------------------------------------- weights
#: Entries of a training checkpoint that hold the weights, in order of preference.
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: ``torch.load(weights_only=True)``, or safetensors for a
    ``.safetensors`` file (timm's Hugging Face checkpoints). A training checkpoint (a dict
    whose weights are under ``state_dict``, ``model``, ``model_state_dict`` or
    ``state_dict_ema``, as torchvision's and timm's training scripts save them) is unwrapped,
    and the ``module.`` prefix of a DataParallel / DDP model is removed.

    Parameters
    ----------
    path : Path
        The file (``model.weights``).

    Returns
    -------
    dict of str to Tensor
        The state dict, on the CPU.

    Raises
    ------
    ModelLoadError
        If the file is missing, needs arbitrary code to unpickle, or holds no state dict.
    """
    if not path.is_file():
        raise ModelLoadError(
            f"model.weights: file {str(path)!r} not found; attriflow never downloads weights: put the "
            "file there (for example a checkpoint saved with torch.save(model.state_dict(), path)) "
            "or change model.weights in the config"
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelLoadError(f"model.weights: {str(path)!r} is a safetensors file and needs the "
                                 "safetensors package: pip install safetensors") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # a corrupt or truncated file
            raise ModelLoadError(f"model.weights: cannot read {str(path)!r} ({_last_line(err)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle needing arbitrary code, or a corrupt file
        why = _unpickler_reason(str(err)) or type(err).__name__
        if "Unsupported global" not in why:  # not a pickle of classes: not a checkpoint at all
            raise ModelLoadError(
                f"model.weights: {str(path)!r} is not a readable PyTorch checkpoint ({why}); save one with "
                "torch.save(model.state_dict(), path)") from None
        raise ModelLoadError(
            f"model.weights: cannot load {str(path)!r} safely with torch.load(weights_only=True) ({why}). "
            "If you trust the file, convert it once to a plain state dict: "
            "torch.save(torch.load(path, weights_only=False).state_dict(), 'weights.pth')"
        ) from None
    for key in CHECKPOINT_KEYS:  # a training checkpoint: the weights are one of its entries
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and \
                not any(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[key]
            break
    if isinstance(obj, dict) and any(isinstance(k, str) and k.startswith("module.") for k in obj) and \
            all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}  # saved from DataParallel / DDP
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{str(path)!r} does not hold a state dict")
    return obj


def load_state_dict_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``module.load_state_dict(state)`` after checking that keys and shapes all match.

    Parameters
    ----------
    module : nn.Module
        The freshly built network.
    state : dict of str to Tensor
        The state dict read from ``path``.
    path : Path
        Its file, for messages.

    Raises
    ------
    ModelLoadError
        Naming the missing, unexpected and mismatched keys (10 of each at most).
    """
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
        hint = ""
        heads = [k for k in state if k in own and isinstance(state[k], torch.Tensor) and state[k].dim() >= 1
                 and tuple(own[k].shape) != tuple(state[k].shape) and state[k].shape[1:] == own[k].shape[1:]]
        if heads and not missing and not unexpected:  # only the classifier's output count differs
            hint = (f"; the file's classifier has {int(state[heads[-1]].shape[0])} outputs: set model.num_classes: "
                    f"{int(state[heads[-1]].shape[0])} (a factory: pass it in model.kwargs)")
        raise ModelLoadError(f"weights {str(path)!r} do not match the architecture; " + "; ".join(parts) + hint)
    module.load_state_dict(state)


def _weights(cfg: ModelConfig, module: nn.Module, default: Path | None = None) -> str:
    """Load ``model.weights`` (else ``default``) into ``module``; returns the description's tail."""
    path = Path(cfg.weights) if cfg.weights else None if cfg.random_init else default
    if path is None:
        return f"randomly initialised (seed {cfg.init_seed})"
    load_state_dict_into(module, read_state_dict(path), path)
    return f"from {path}"


# ---------------------------------------------------------------- reference, torchvision, timm
def reference_source(cfg: ModelConfig) -> Source:
    """The shipped reference CNN (64x64 embedded images; no preprocessing metadata)."""
    torch.manual_seed(cfg.init_seed)
    module = ReferenceCNN(num_classes=cfg.num_classes or 10)
    desc = _weights(cfg, module, REFERENCE_WEIGHTS)
    return Source(module, MEAN, STD, state_dict_digest(module), f"reference {desc}")


def torchvision_source(cfg: ModelConfig) -> Source:
    """A torchvision classification model, ``weights=None``, then ``model.weights``."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if cfg.arch not in names:
        raise ModelLoadError(
            f"model.arch: unknown architecture {cfg.arch!r}; use 'reference', 'timm:<name>' or one of "
            f"torchvision's: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {"weights": None}
    if cfg.num_classes:
        kwargs["num_classes"] = cfg.num_classes
    torch.manual_seed(cfg.init_seed)
    module = torchvision.models.get_model(cfg.arch, **kwargs)
    desc = _weights(cfg, module)
    return Source(module, IMAGENET_MEAN, IMAGENET_STD, state_dict_digest(module), f"{cfg.arch} {desc}",
                  **TORCHVISION_INPUT)


def timm_source(cfg: ModelConfig) -> Source:
    """A timm model ``timm:<name>`` (a ``name.tag`` selects the tag's preprocessing), built
    with ``pretrained=False``; normalisation, input size, crop fraction and interpolation
    come from its ``pretrained_cfg``."""
    name = cfg.arch.removeprefix("timm:")
    try:
        import timm
        import timm.data
    except ImportError:
        raise ModelLoadError(f"model.arch: {cfg.arch!r} needs timm: pip install 'attriflow[timm]'") from None
    if not timm.is_model(name):
        arch, _, tag = name.partition(".")
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(repr(f'timm:{c}') for c in close)}?" if close else \
            "timm.list_models('*pattern*') lists the names"
        raise ModelLoadError(f"model.arch: timm has no model {arch!r}; {hint}")
    kwargs: dict[str, Any] = {"pretrained": False}
    if cfg.num_classes:
        kwargs["num_classes"] = cfg.num_classes
    torch.manual_seed(cfg.init_seed)
    try:
        module = timm.create_model(name, **kwargs)
    except Exception as err:  # an unknown pretrained tag, kwargs the model rejects
        raise ModelLoadError(f"model.arch: timm cannot build {name!r} ({_last_line(err)})") from None
    data = timm.data.resolve_model_data_config(module)
    desc = _weights(cfg, module)
    size = tuple(int(s) for s in data["input_size"][-2:])
    return Source(module, tuple(data["mean"]), tuple(data["std"]),  # type: ignore[arg-type]
                  state_dict_digest(module), f"{cfg.arch} {desc}", input_size=size,  # type: ignore[arg-type]
                  crop_pct=float(data["crop_pct"]), interpolation=str(data["interpolation"]))


# ---------------------------------------------------------------- factory
def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


#: Per factory file (resolved path): the modules its import brought in from its own folder
#: tree (the researcher's helpers), so that editing one of them changes the model's digest
#: and re-imports it, in a new process or in this one.
_LOCAL_DEPENDENCIES: dict[str, dict[str, Path]] = {}


def _dependency_bytes(deps: dict[str, Path]) -> bytes:
    out = b""
    for name in sorted(deps):
        try:
            out += name.encode() + b"\0" + deps[name].read_bytes() + b"\0"
        except OSError:
            out += name.encode() + b"\0missing\0"
    return out


def _new_local_modules(before: set[str], folder: Path) -> dict[str, Path]:
    """Modules imported since ``before`` whose file lies in ``folder``'s tree."""
    found = {}
    for name in set(sys.modules) - before:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file and not name.startswith("attriflow_factory_"):
            p = Path(file).resolve()
            if folder in p.parents:
                found[name] = p
    return found


def _import_file(path: Path, field: str) -> tuple[Any, bytes]:
    """Import ``path`` as a module named after its path, its contents and the contents of
    the local modules it imported last time (its helpers in the same folder tree): an
    edited file or helper runs again under a new name (the helpers are re-imported), an
    unchanged one is imported once. Its folder is on ``sys.path`` while it runs, as with
    ``python path``. Returns the module and the bytes of the file and its helpers."""
    if not path.is_file():
        raise ModelLoadError(f"{field}: file {str(path)!r} not found (relative paths are read from the "
                             f"current directory, {Path.cwd()})")
    resolved = path.resolve()
    known = _LOCAL_DEPENDENCIES.get(str(resolved), {})
    source = path.read_bytes() + _dependency_bytes(known)
    tag = hashlib.sha256(str(resolved).encode() + b"\0" + source).hexdigest()[:16]
    name = f"attriflow_factory_{path.stem if path.stem.isidentifier() else 'file'}_{tag}"
    if name in sys.modules:
        return sys.modules[name], source
    for dep in known:  # stale helpers: import them again from their edited files
        sys.modules.pop(dep, None)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"{field}: cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    sys.modules[name] = module  # dataclasses, pickle and deepcopy look classes up here
    folder = str(resolved.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ModelLoadError(f"{field}: importing {str(path)!r} failed{_where(err, path)}: "
                             f"{_last_line(err)}; fix the file (it must import without errors)") from err
    finally:
        sys.path.remove(folder)
    deps = {**{k: v for k, v in known.items() if k in sys.modules}, **_new_local_modules(before, resolved.parent)}
    if deps != known:
        _LOCAL_DEPENDENCIES[str(resolved)] = deps
        source = path.read_bytes() + _dependency_bytes(deps)
    return module, source


def local_dependencies(path: str | Path) -> tuple[Path, ...]:
    """The researcher's helper files a factory file imported (see :func:`_import_file`)."""
    return tuple(sorted(_LOCAL_DEPENDENCIES.get(str(Path(path).resolve()), {}).values()))


def _where(err: BaseException, path: Path) -> str:
    """`` (line N)`` of the innermost traceback frame in ``path``, or ``""``."""
    line = None
    for frame in traceback.extract_tb(err.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno
    return f" (line {line})" if line else ""


def _source_bytes(obj: Any) -> bytes:
    """The bytes of the source file defining ``obj`` (module or callable); its qualified name
    when there is none (a C extension)."""
    try:
        file = inspect.getsourcefile(obj)
    except TypeError:
        file = None
    if file and Path(file).is_file():
        return Path(file).read_bytes()
    return getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj))).encode()


def factory_source(cfg: ModelConfig) -> Source:
    """``model.factory``: the user's callable, ``"pkg.module:name"`` or ``"file.py:name"``
    (a dotted name reaches class attributes: ``"net.py:Net.small"``), called with
    ``model.kwargs`` after seeding torch with ``model.init_seed``; then ``model.weights`` if
    given.

    The digest covers the weights, the factory's source file and the modules it imports
    from its own folder tree (its helpers), for ``pkg.module:name`` the file defining the
    callable, and the kwargs: editing the model's code changes it.
    """
    field = "model.factory"
    assert cfg.factory is not None
    if cfg.num_classes is not None:
        raise ModelLoadError("model.num_classes: not used with model.factory; pass the number of classes "
                             "to your callable in model.kwargs")
    target, _, attr = cfg.factory.rpartition(":")
    if _is_file(target):
        path = Path(target)
        module, source = _import_file(path, field)
        where = repr(str(path))
        code = [source]
    else:
        where = f"module {target!r}"
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise ModelLoadError(
                f"{field}: cannot import {where} ({_last_line(err)}); install its package, or give a "
                "file instead: 'path/to/file.py:callable'") from err
        code = [_source_bytes(module)]
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
            raise ModelLoadError(f"{field}: {where} has no attribute {attr!r}; it defines: "
                                 f"{', '.join(public[:20]) or 'no public callable'}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ModelLoadError(f"{field}: {attr!r} in {where} is a {type(fn).__name__}, not a callable")
    if not _is_file(target):
        defining = _source_bytes(fn)
        if defining not in code:
            code.append(defining)
    torch.manual_seed(cfg.init_seed)
    try:
        net = fn(**cfg.kwargs)
    except Exception as err:
        raise ModelLoadError(f"{field}: calling {attr}(**model.kwargs) from {where} failed: "
                             f"{_last_line(err)}") from err
    if not isinstance(net, nn.Module):
        raise ModelLoadError(f"{field}: {attr} from {where} returned {type(net).__module__}."
                             f"{type(net).__qualname__}, not a torch.nn.Module; it must build and return "
                             "the model")
    desc = _weights(cfg, net) if cfg.weights else f"as built (seed {cfg.init_seed})"
    h = hashlib.sha256(state_dict_digest(net).encode())
    for blob in code:
        h.update(hashlib.sha256(blob).digest())
    h.update(json.dumps(cfg.kwargs, sort_keys=True, default=repr).encode())
    return Source(net, IMAGENET_MEAN, IMAGENET_STD, h.hexdigest(), f"{cfg.factory} {desc}")


# ---------------------------------------------------------------- exported programs
class ExportedProgramModule(nn.Module):
    """An ``nn.Module`` running a ``torch.export`` program's graph.

    The graph (``ExportedProgram.module()``) refuses ``train()`` / ``eval()``, so
    :meth:`train` sets only this wrapper's flag; the program runs as it was exported
    (export in eval mode). ``attriflow_opaque`` says why explainers that hook layers cannot
    run on it (:meth:`explainers.Explainer.check` reads it).

    Parameters
    ----------
    graph : nn.Module
        The program's module, shape (N, C, H, W) -> (N, K).
    opaque : str
        Why the layers cannot be hooked (a sentence).
    input_shape : tuple of (int or None) or None
        The shape of the program's input, (N, C, H, W), an int where the program fixed the
        size and None where it is dynamic; None when unknown.
    """

    def __init__(self, graph: nn.Module, opaque: str, input_shape: tuple[int | None, ...] | None) -> None:
        super().__init__()
        self.program = graph
        self.attriflow_opaque = opaque
        self.input_shape = input_shape

    @property
    def static_batch(self) -> int | None:
        """The batch size the program was specialised to, or None for a dynamic batch."""
        return self.input_shape[0] if self.input_shape else None

    def train(self, mode: bool = True) -> ExportedProgramModule:
        """Set this wrapper's ``training`` flag only (the graph runs as exported).

        Parameters
        ----------
        mode : bool
            The flag.

        Returns
        -------
        ExportedProgramModule
            self.
        """
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> Any:
        """Run the graph."""
        return self.program(x)


def _input_shape(graph: nn.Module) -> tuple[int | None, ...] | None:
    """The first input's shape as the program fixed it (None for a symbolic size)."""
    fx_graph = getattr(graph, "graph", None)
    for node in fx_graph.nodes if fx_graph is not None else ():
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                return tuple(int(s) if isinstance(s, int) else None for s in val.shape)
    return None


def program_source(cfg: ModelConfig) -> Source:
    """``model.program``: a ``torch.export.save`` file (``.pt2``), run as saved.

    The digest is the file's sha256; ``input_size`` is the program's (H, W) when it was
    exported with a fixed image size. ``torch.export.load`` unpickles parts of the file:
    load only programs you trust.
    """
    assert cfg.program is not None
    path = Path(cfg.program)
    if not path.is_file():
        raise ModelLoadError(f"model.program: file {str(path)!r} not found (relative paths are read from the "
                             f"current directory, {Path.cwd()}); save a program with "
                             "torch.export.save(torch.export.export(model.eval(), (example,)), path)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        graph = torch.export.load(path).module()
    except Exception as err:
        raise ModelLoadError(f"model.program: {str(path)!r} is not a loadable torch.export program "
                             f"({_last_line(err)}); save one with torch.export.save (torch "
                             f"{torch.__version__} reads it)") from None
    opaque = (f"model.program {str(path)!r} is an exported program: its layers are compiled into one "
              "graph, so they cannot be hooked, given propagation rules or re-initialised one by one.")
    shape = _input_shape(graph)
    module = ExportedProgramModule(graph, opaque, shape)
    size = (shape[2], shape[3]) if shape is not None and len(shape) == 4 else (None, None)
    fixed = (size[0], size[1]) if size[0] is not None and size[1] is not None else None
    return Source(module, IMAGENET_MEAN, IMAGENET_STD, digest, f"exported program {path}",
                  input_size=fixed, opaque=opaque)
