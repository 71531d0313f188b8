"""The explainer interface: one batched ``attribute`` for every method.

A method module writes only its own maths in ``_attribute``; everything else
(eval mode, chunking by ``batch_size``, seeding, dtype and shape checks, hook
cleanup and the guarantee that the model is left as it was) lives here, once.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal, final

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from attriflow.explainers._batching import auto_batch_size
from attriflow.explainers._typing import JSONValue

#: Evaluations per pass before ``attribute`` has chosen one (see ``auto_batch_size``).
DEFAULT_EVAL_BATCH = 64


class Family(str, Enum):
    """Taxonomy group of an explainer (working taxonomy of seed-taxonomy.md, section 4).

    The value is what the run store's ``family(explainer)`` coordinate and the report use.
    """

    GRADIENT = "gradient"
    RELEVANCE = "relevance"
    CAM = "cam"
    PERTURBATION = "perturbation"
    OPTIMISATION = "optimisation"
    SHAPLEY = "shapley"
    BASELINE = "baseline"

    def __str__(self) -> str:
        return self.value


#: Taxonomy path of each family: ``access / implementation``.
TAXONOMY: dict[Family, str] = {
    Family.GRADIENT: "white-box / gradient back-propagation",
    Family.RELEVANCE: "white-box / relevance decomposition",
    Family.CAM: "white-box / activation-cam",
    Family.PERTURBATION: "black-box / perturbation",
    Family.OPTIMISATION: "black-box / mask optimisation",
    Family.SHAPLEY: "black-box / surrogate and Shapley",
    Family.BASELINE: "no model / sanity baseline",
}

#: What a method reads from the model; a sanity baseline (family ``baseline``) reads none.
Access = Literal["gradients", "activations", "forward"]


@dataclass(frozen=True)
class ExplainerSpec:
    """Static description of an explainer, the single source of its taxonomy placement.

    Parameters
    ----------
    name : str
        Registry key, module name and default ``explainer`` coordinate in the store.
    family : Family
        Taxonomy group.
    access : tuple of str
        What the method needs from the model: ``"gradients"``, ``"activations"``, ``"forward"``
        (empty for a sanity baseline, whose map does not depend on the model).
    stochastic : bool
        True when the method draws random numbers (it then receives per-sample generators).
    batches_evaluations : bool
        True for methods that make many model evaluations per image (sampling, paths,
        perturbations): they receive all images of the call and pack their evaluations of
        several images into forward passes of ``batch_size`` themselves.
    version : int
        Bump when the numerics change; part of every provenance digest.
    summary : str
        One line for the catalogue.
    references : tuple of str
        Bibliography keys.
    needs_internals : bool
        True when the method reaches inside the model (hooks on layers, activations,
        per-module rules). False for methods that use only the model's forward pass and
        gradients with respect to the input, so they also work on an exported program
        (``torch.export``), whose layers cannot be hooked.
    """

    name: str
    family: Family
    access: tuple[Access, ...] = ("gradients",)
    stochastic: bool = False
    batches_evaluations: bool = False
    version: int = 1
    summary: str = ""
    references: tuple[str, ...] = field(default_factory=tuple)
    needs_internals: bool = True

    @property
    def taxonomy(self) -> str:
        """Full taxonomy path, for example ``white-box / activation-cam / grad_cam``."""
        return f"{TAXONOMY[self.family]} / {self.name}"


class NoParams(BaseModel):
    """Parameter model of an explainer that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ExplainerParamError(ValueError):
    """Raised when an explainer receives an unknown or invalid parameter."""


def _non_finite(value: Any, path: str = "") -> tuple[str, float] | None:
    """The first NaN or infinite float in nested parameters, with its dotted path."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(params)", value
    items: Any = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def validate_params(cls: type[Explainer], params: dict[str, Any]) -> BaseModel:
    """Validate ``params`` against ``cls.Params``; the error names the explainer and field.

    Parameters
    ----------
    cls : type of Explainer
        The explainer class.
    params : dict
        Raw parameter values (from a config file).

    Returns
    -------
    BaseModel
        The validated parameters.

    Raises
    ------
    ExplainerParamError
        If a parameter is unknown, out of range, or a NaN or infinite number.
    """
    bad = _non_finite(params)
    if bad is not None:
        raise ExplainerParamError(f"explainer {cls.spec.name!r}: {bad[0]}: must be a finite number, got "
                                  f"{bad[1]!r} (NaN and infinity mean no setting, and a run's config travels "
                                  "as JSON, which cannot hold them)")
    try:
        return cls.Params(**params)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(params)'}: {e['msg']}" for e in err.errors()
        )
        raise ExplainerParamError(f"explainer {cls.spec.name!r}: {problems}") from None


class UnsupportedModelError(ValueError):
    """The explainer's assumptions do not hold for this model or setting.

    Raised instead of returning a map that would look right and not be: activations a
    method has no rule for, layers it cannot see, outputs that are not (N, K) logits, a
    dtype whose guards underflow. The message names the explainer, the module(s) or setting
    and, where there is one, what to do instead.
    """


def describe_output(out: object) -> str:
    """A short structural description of a model output, for error messages
    (``"tuple(Tensor(1, 10), Tensor(1, 512))"``)."""
    if isinstance(out, Tensor):
        return f"Tensor{tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__}({', '.join(describe_output(o) for o in out)})"
    if isinstance(out, dict):
        return "dict(" + ", ".join(f"{k!r}: {describe_output(v)}" for k, v in out.items()) + ")"
    fields = {k: v for k, v in vars(out).items() if isinstance(v, Tensor)} if hasattr(out, "__dict__") else {}
    inner = ", ".join(f".{k}: {describe_output(v)}" for k, v in fields.items())
    return f"{type(out).__name__}({inner})"


def _bad_output(out: object, batch: int) -> str | None:
    """Why ``out`` is not the (batch, K) logits of a batch of ``batch`` inputs, or None."""
    if isinstance(out, Tensor) and out.ndim == 2 and out.shape[0] == batch and out.shape[1] >= 1:
        return None
    return (f"the model's output is {describe_output(out)}; explainers need one (N, K) tensor of "
            f"class scores for N = {batch} inputs. Wrap the model so that forward returns the "
            "logits (for example the first element of a tuple, or out['logits'])")


def check_output(model: nn.Module, example: Tensor) -> int:
    """Raise :class:`UnsupportedModelError` unless ``model(example)`` is (N, K) logits.

    Parameters
    ----------
    model : nn.Module
        The classifier (evaluated once under ``torch.no_grad``).
    example : Tensor, shape (N, C, H, W)
        An input batch.

    Returns
    -------
    int
        The number of classes K.

    Raises
    ------
    UnsupportedModelError
        The output is a tuple, dict, object or a tensor of another shape; the message
        shows its structure.
    """
    with torch.no_grad():
        out = model(example)
    problem = _bad_output(out, example.shape[0])
    if problem is not None:
        raise UnsupportedModelError(problem)
    return int(out.shape[1])


class ModelState:
    """Everything ``attribute`` promises to leave as it found it, captured on entry.

    Per module: the training flag, the buffers (objects and values), the instance
    attributes (a method's forward override, an ``inplace`` flag) and the hooks; per
    parameter: ``requires_grad`` and ``.grad``. :meth:`restore` puts back whatever
    differs, also after an exception.

    Parameters
    ----------
    model : nn.Module
        The network.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = list(model.modules())
        self.training = [m.training for m in self.modules]
        self.attrs = [{k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
                      for m in self.modules]
        self.buffers = [{k: (b, b.detach().clone()) for k, b in m._buffers.items() if b is not None}
                        for m in self.modules]
        self.hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                      for m in self.modules]
        self.params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
        self._watch: Any = None

    def watch_outputs(self) -> None:
        """Until :meth:`restore`, check every forward pass of the model (a forward hook on
        the root): an output that is not (N, K) logits raises :class:`UnsupportedModelError`."""

        def hook(_m: nn.Module, args: tuple[Any, ...], out: object) -> None:
            batch = args[0].shape[0] if args and isinstance(args[0], Tensor) else -1
            problem = _bad_output(out, batch)
            if problem is not None:
                raise UnsupportedModelError(problem)

        self._watch = self.model.register_forward_hook(hook)

    def restore(self) -> None:
        """Put the captured state back."""
        if self._watch is not None:
            self._watch.remove()
            self._watch = None
        for m, training, attrs, buffers, hooks in zip(self.modules, self.training, self.attrs,
                                                      self.buffers, self.hooks):
            m.training = training
            for k in [k for k in vars(m) if not k.startswith("_") and k != "training" and k not in attrs]:
                delattr(m, k)  # e.g. a forward override left behind
            for k, v in attrs.items():
                if getattr(m, k, None) is not v:
                    object.__setattr__(m, k, v)
            for k, (obj, values) in buffers.items():
                if m._buffers.get(k) is not obj:
                    m._buffers[k] = obj
                if not torch.equal(obj, values):
                    with torch.no_grad():
                        obj.copy_(values)
            for live, saved in zip((m._forward_hooks, m._forward_pre_hooks, m._backward_hooks), hooks):
                for key in [key for key in live if key not in saved]:
                    del live[key]
        for p, flag, grad in self.params:
            p.requires_grad_(flag)
            p.grad = grad


class Explainer(ABC):
    """Base class of every attribution method.

    Subclasses set ``spec`` and, when they take parameters, a pydantic ``Params`` model
    (``extra="forbid"``), and implement ``_attribute`` for one chunk of inputs.

    Parameters
    ----------
    model : nn.Module
        Classifier mapping (N, C, H, W) model inputs to (N, K) logits.
    **params : Any
        Method parameters, validated by ``Params``.
    """

    spec: ClassVar[ExplainerSpec]
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, model: nn.Module, **params: Any) -> None:
        self.model = model
        self.p: Any = validate_params(type(self), params)
        self.batch_size = DEFAULT_EVAL_BATCH
        #: choices made from the model (automatic layers), recorded with the parameters
        self.resolved: dict[str, JSONValue] = {}
        #: forward passes each image of the last ``attribute`` call cost, when it varies
        self.last_forward_passes: Tensor | None = None
        #: the model's input normalisation (mean, std per channel) when the caller knows it
        self.normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    # ------------------------------------------------------------------ public API
    @final
    def attribute(
        self,
        inputs: Tensor,
        targets: Tensor,
        *,
        batch_size: int | None = None,
        seeds: Tensor | None = None,
    ) -> Tensor:
        """Explain ``targets`` for ``inputs``.

        Parameters
        ----------
        inputs : Tensor, shape (N, C, H, W)
            Model inputs (already normalised the way the model expects).
        targets : Tensor, shape (N,)
            int64 class indices to explain.
        batch_size : int or None
            Model evaluations per forward (and backward) pass. Single-pass methods see
            chunks of ``batch_size`` images; multi-evaluation methods pack their
            evaluations of all images into passes of this size. None chooses it from the
            model's activation footprint (:func:`explainers._batching.auto_batch_size`: 16
            for ResNet-50 at 224x224). Results do not depend on it.
        seeds : Tensor or None, shape (N,)
            Per-sample seeds for stochastic methods (derived from run seed, sample id and
            method by the caller), so a sample's map does not depend on its batch.

        Returns
        -------
        Tensor, shape (N, H, W)
            Raw float32 attributions at input resolution (no display normalisation).
        """
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError("inputs and targets must be tensors (targets: int64 class indices, shape (N,))")
        if inputs.ndim != 4:
            raise ValueError(f"inputs must be (N, C, H, W), got shape {tuple(inputs.shape)}")
        if targets.shape != (inputs.shape[0],) or targets.dtype != torch.int64:
            raise ValueError("targets must be an int64 tensor of shape (N,)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = inputs.shape[0]
        if seeds is None:
            seeds = torch.zeros(n, dtype=torch.int64)
        state = ModelState(self.model)
        outputs: list[Tensor] = []
        passes: list[Tensor] = []
        try:
            self.model.eval()
            if n:
                self.check(inputs[:1])
                classes = self.__dict__.get("_classes")
                if classes is not None and (int(targets.min()) < 0 or int(targets.max()) >= classes):
                    raise ValueError(f"targets must be class indices in [0, {classes}), got "
                                     f"{sorted(set(targets.tolist()))[:10]}")
            state.watch_outputs()
            if batch_size is None:
                batch_size = auto_batch_size(self.model, inputs) if n else DEFAULT_EVAL_BATCH
            self.batch_size = batch_size
            step = n if self.spec.batches_evaluations else batch_size
            for start in range(0, n, max(step, 1)):
                sl = slice(start, start + step)
                gens = None
                if self.spec.stochastic:
                    gens = [torch.Generator().manual_seed(int(s)) for s in seeds[sl]]
                self.last_forward_passes = None
                out = self._attribute(inputs[sl].detach(), targets[sl].to(inputs.device), gens)
                outputs.append(out.detach().to(torch.float32))
                if self.last_forward_passes is not None:
                    passes.append(self.last_forward_passes.cpu())
        finally:
            state.restore()
        self.last_forward_passes = torch.cat(passes) if passes and len(passes) == len(outputs) else None
        result = torch.cat(outputs) if outputs else inputs.new_zeros((0, *inputs.shape[2:]))
        if result.shape != (n, *inputs.shape[2:]):
            raise RuntimeError(
                f"{self.spec.name} returned shape {tuple(result.shape)}, "
                f"expected {(n, *inputs.shape[2:])}"
            )
        return result

    def params(self) -> dict[str, JSONValue]:
        """Parameters as JSON, with the choices :meth:`resolve` made under ``resolved``
        (stored next to the attributions, part of provenance)."""
        out: dict[str, JSONValue] = json.loads(self.p.model_dump_json())
        if self.resolved:
            out["resolved"] = dict(self.resolved)
        return out

    @final
    def check(self, example: Tensor) -> None:
        """Refuse a model this explainer cannot explain faithfully, before any work.

        Refuses an opaque model (one with an ``attriflow_opaque`` attribute saying why its
        layers cannot be hooked: an exported program) when the method, or an explainer it
        wraps, needs the model's internals (``spec.needs_internals``). Then checks once per
        model, input shape and dtype that the model maps (1, C, H, W) inputs to (1, K)
        logits, and runs the method's own :meth:`refuse`. ``attribute``
        calls it; the pipeline calls it when it builds the explainer, so a refusal comes
        before the first shard.

        Parameters
        ----------
        example : Tensor, shape (1, C, H, W)
            An input like the ones explained.

        Raises
        ------
        UnsupportedModelError
            The model is opaque and the method needs its internals (the message lists the
            methods that work), the model's output is not an (N, K) tensor, or the method
            refuses the model (the message names the modules or setting).
        """
        self._refuse_opaque()
        key = (id(self.model), tuple(example.shape[1:]), example.dtype, torch.is_autocast_enabled())
        checked: set[tuple[Any, ...]] = self.__dict__.setdefault("_checked", set())
        if key in checked:
            return
        state = ModelState(self.model)
        try:
            self.model.eval()
            self.__dict__["_classes"] = check_output(self.model, example[:1])
            self.refuse(example[:1])
        finally:
            state.restore()
        checked.add(key)

    def _refuse_opaque(self) -> None:
        """Raise when the model is opaque (``attriflow_opaque``) and this method, or an
        explainer it wraps (an :class:`Explainer` attribute, SmoothGrad's base), needs the
        model's internals."""
        opaque = getattr(self.model, "attriflow_opaque", None)
        if not opaque:
            return
        parts = [self] + [v for v in vars(self).values() if isinstance(v, Explainer)]
        needing = [e.spec.name for e in parts if e.spec.needs_internals]
        if not needing:
            return
        from attriflow.explainers.registry import REGISTRY  # the registry imports this module

        working = sorted(n for n, c in REGISTRY.items() if not c.spec.needs_internals)
        who = self.spec.name if needing == [self.spec.name] else \
            f"{self.spec.name} (through {', '.join(n for n in needing if n != self.spec.name)})"
        raise UnsupportedModelError(
            f"{who} needs the model's layers (hooks, activations or per-module rules) and cannot run "
            f"on this model: {opaque} Methods that use only the forward pass and input gradients work: "
            f"{', '.join(working) or 'none registered'}")

    def refuse(self, example: Tensor) -> None:
        """Raise :class:`UnsupportedModelError` when the method's assumptions do not hold
        for this model (override; the default accepts every model).

        Parameters
        ----------
        example : Tensor, shape (1, C, H, W)
            An input like the ones explained.
        """

    def resolve(self, example: Tensor) -> None:
        """Make the model-dependent choices (automatic layers) for inputs like ``example``.

        Parameters
        ----------
        example : Tensor, shape (1, C, H, W)
            An input of the run's size.
        """

    def cost(self) -> dict[str, int | str]:
        """Forward and backward passes this explainer makes per image."""
        return type(self).estimate_cost(self.p)

    @classmethod
    def estimate_cost(cls, params: BaseModel) -> dict[str, int | str]:
        """Forward and backward passes per image for ``params`` (one of each by default);
        a string gives the formula where the count depends on the model or image size.

        Parameters
        ----------
        params : BaseModel
            Validated parameters.

        Returns
        -------
        dict of str to int or str
            ``{"forward": ..., "backward": ...}``.
        """
        return {"forward": 1, "backward": 1 if "gradients" in cls.spec.access else 0}

    def digest(self) -> str:
        """Digest of name, version and parameters (the explainer's part of provenance)."""
        blob = json.dumps(
            {"name": self.spec.name, "version": self.spec.version, "params": self.params()},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    # ------------------------------------------------------------------ for subclasses
    @abstractmethod
    def _attribute(
        self, inputs: Tensor, targets: Tensor, generators: list[torch.Generator] | None
    ) -> Tensor:
        """Attributions (N, H, W) for one chunk; the method's own maths only."""
