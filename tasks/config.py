"""Run configuration, validated with pydantic before any work starts.

Every model forbids unknown keys, so a typo fails with the field's dotted path
(``explain.shard_size``) instead of being ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """An invalid configuration; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Which images to explain."""

    kind: Literal["embedded", "imagefolder", "voc"] = "embedded"
    split: Literal["train", "test"] = "test"
    n_samples: int | None = Field(256, ge=1)
    image_size: int = Field(64, ge=16, le=2048)
    seed: int = Field(0, ge=0)
    root: str | None = None
    annotations: str | None = None
    classes: list[str] | None = None
    max_pixels: int = Field(89_478_485, ge=1)  # larger files are skipped as "huge" (Pillow's bomb limit)

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        if self.kind != "embedded" and not self.root:
            raise ValueError(f"data.root is required for data.kind={self.kind!r}")
        return self


class ModelConfig(_Strict):
    """Which classifier to explain."""

    arch: str = "reference"
    weights: str | None = None
    random_init: bool = False
    num_classes: int | None = Field(None, ge=1)
    init_seed: int = Field(0, ge=0)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _weights_or_random(self) -> ModelConfig:
        if self.weights and self.random_init:
            raise ValueError("model: give either weights or random_init: true, not both")
        if self.arch != "reference" and not self.weights and not self.random_init:
            raise ValueError(
                "model.weights: a torchvision architecture needs a local weights file "
                "(attriflow never downloads); set model.random_init: true for random weights"
            )
        return self


class ExplainerEntry(_Strict):
    """One explainer of the run: a registered method, its parameters and a store label."""

    method: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        from explainers import REGISTRY

        if value not in REGISTRY:
            raise ValueError(f"unknown explainer {value!r}; registered: {', '.join(sorted(REGISTRY))}")
        return value

    @model_validator(mode="after")
    def _params_valid(self) -> ExplainerEntry:
        from explainers import get_explainer, validate_params

        validate_params(get_explainer(self.method), self.params)
        return self

    @property
    def name(self) -> str:
        """The ``explainer`` coordinate in the store."""
        return self.label or self.method


def _default_explainers() -> list[ExplainerEntry]:
    """One explainer of each family that fits the 5-minute default run on 2 CPU cores."""
    return [
        ExplainerEntry(method="saliency"),
        ExplainerEntry(method="lrp_composite"),
        ExplainerEntry(method="grad_cam"),
        ExplainerEntry(method="occlusion", params={"window": 16, "stride": 8}),
    ]


class ExplainConfig(_Strict):
    """The explain stage. ``precision``: ``bf16`` / ``fp16`` run the explainers under
    ``torch.autocast`` (maps are stored as float32); ``channels_last`` converts the model
    and inputs to the channels-last memory format. Both are part of each shard's provenance
    and of the manifest. ``batch_size``: model evaluations per pass; ``auto`` (default)
    sizes it from the model's activation footprint (16 for ResNet-50 at 224x224, 256 for
    the reference CNN); results do not depend on it."""

    explainers: list[ExplainerEntry] = Field(default_factory=_default_explainers, min_length=1)
    target: Literal["prediction", "label"] = "prediction"
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"must be a positive integer or 'auto', got {value!r}")

    @field_validator("explainers")
    @classmethod
    def _unique(cls, value: list[ExplainerEntry]) -> list[ExplainerEntry]:
        names = [e.name for e in value]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"explainer labels must be unique; repeated: {', '.join(dup)} (set 'label')")
        return value


class EvaluateConfig(_Strict):
    """The evaluate stage: deletion and insertion (RISE protocol) and, where the data has
    ground truth, the pointing game (tolerance: None = 15 px scaled from 224 px to the
    image size) and the energy-based pointing game on the boxes."""

    steps: int = Field(32, ge=1, le=4096)
    batch_size: int = Field(256, ge=1)
    blur_sigma: float = Field(5.0, gt=0)
    blur_kernel: int = Field(11, ge=1)
    pointing_tolerance: float | None = Field(None, ge=0)
    drop_top_fraction: float = Field(0.15, gt=0.0, le=1.0)


class NeuronsConfig(_Strict):
    """The neuron-selection stage (input resampling, seed-neuron-selection.md)."""

    enabled: bool = True
    copies: int = Field(50, ge=3, le=100_000)
    noise: float = Field(0.1, ge=0.0)
    mode: Literal["growing", "constant", "masking"] = "growing"
    top_k: int = Field(5, ge=1)
    min_activation: float = Field(0.1, ge=0.0)
    layers: list[str] | None = None
    batch_size: int = Field(64, ge=1)
    box_samples: int = Field(8, ge=0)


class SanityConfig(_Strict):
    """The sanity check: cascading model-parameter randomisation (top layer down) on the
    first ``samples`` samples; ``granularity`` picks the unit re-initialised per depth
    (``block``: top-level child modules; ``layer``: every layer with parameters)."""

    enabled: bool = True
    samples: int = Field(16, ge=2)
    granularity: Literal["block", "layer"] = "block"
    threshold: float = Field(0.5, gt=0.0, lt=1.0)


class ReportConfig(_Strict):
    """The report: ``grid_samples`` images in the map grid (kept as 8-bit previews in the
    store), ``bootstrap`` resamples for the 95 % intervals (seeded by the run seed)."""

    grid_samples: int = Field(6, ge=1, le=64)
    bootstrap: int = Field(1000, ge=100, le=100_000)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)


class RunnerConfig(_Strict):
    """Where the shard tasks run and how failures are retried. Execution only: it is left
    out of the config hash and the manifest, so it cannot change results or provenance.

    ``local``: a thread pool in the flow's process (``threads`` at a time). ``dask``:
    Prefect's Dask task runner, on a new ``LocalCluster`` of ``workers`` processes
    (``threads`` each) or, with ``address``, on an existing scheduler.
    """

    kind: Literal["local", "dask"] = "local"
    workers: int = Field(2, ge=1, le=1024)
    threads: int = Field(1, ge=1, le=256)
    address: str | None = None
    retries: int = Field(1, ge=0, le=20)
    retry_delay_seconds: float = Field(0.0, ge=0.0, le=3600.0)

    @model_validator(mode="after")
    def _address_needs_dask(self) -> RunnerConfig:
        if self.address and self.kind != "dask":
            raise ValueError("runner.address: a scheduler address needs kind: dask")
        return self


#: Where and how a run executes, not what it computes: left out of the hash and manifest.
EXECUTION_ONLY = {"runner", "store"}


class RunConfig(_Strict):
    """A whole run: ``attriflow run CONFIG.yaml``."""

    name: str = "default"
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    shard_size: int = Field(64, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    neurons: NeuronsConfig = Field(default_factory=NeuronsConfig)
    sanity: SanityConfig = Field(default_factory=SanityConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    store: str | None = None  # fsspec URL of the store (default: RUN_DIR/store.zarr); not provenance

    @model_validator(mode="after")
    def _memory_store_is_local(self) -> RunConfig:
        if self.store and self.store.startswith("memory://") and self.runner.kind == "dask":
            raise ValueError("store: a memory:// store lives in one process; Dask workers cannot share it "
                             "(use runner.kind: local, or a file or object-store URL)")
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON of the resolved config (without ``runner``, ``store``)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        """Resolved config as sorted, compact JSON, without the execution-only fields."""
        return json.dumps(self.model_dump(mode="json", exclude=EXECUTION_ONLY), sort_keys=True, separators=(",", ":"))


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per bad field, each naming its dotted path."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def parse_config(raw: Any, source: str = "<config>") -> RunConfig:
    """Validate a mapping (from YAML) into a :class:`RunConfig`.

    Parameters
    ----------
    raw : Any
        The parsed document (None means all defaults).
    source : str
        Name used in error messages.

    Returns
    -------
    RunConfig
        The validated config.

    Raises
    ------
    ConfigError
        Naming every bad field.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    except ValueError as err:  # raised outside pydantic's wrapping
        raise ConfigError(f"invalid config {source}: {err}") from None


def load_config(path: str | Path | None) -> RunConfig:
    """Read and validate a YAML config file (safe loader); None gives the embedded default.

    Parameters
    ----------
    path : str, Path or None
        The YAML file.

    Returns
    -------
    RunConfig
        The validated config.

    Raises
    ------
    ConfigError
        If the file is missing, is not YAML, or a field is invalid.
    """
    if path is None:
        return RunConfig()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {str(p)!r}: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config {str(p)!r} is not valid YAML: {err}") from None
    return parse_config(raw, repr(str(p)))
