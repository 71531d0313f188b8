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
    # NaN and infinity are refused: no setting means them, and JSON (the form configs travel
    # in to the tasks) has no spelling for them
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Size = Annotated[int, Field(ge=16, le=4096)]


def _size_pair(value: Any) -> Any:
    """``224`` or ``[224, 320]`` (height, width) -> a (height, width) pair."""
    if isinstance(value, bool):
        raise ValueError(f"must be an integer or [height, width], got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return tuple(value)
    return value


class PreprocessConfig(_Strict):
    """How a decoded image becomes a model input (torchvision's classification presets).

    ``resize``: the shorter side is scaled to this many pixels (aspect ratio kept), then
    the centre ``crop`` (an int or ``[height, width]``) is cut out. ``resize: null`` squashes
    the image to ``crop`` (aspect ratio not kept). ``crop: null`` takes ``data.image_size``,
    else the model's input size. ``interpolation`` and ``antialias`` are torchvision's.
    """

    resize: Annotated[int, Field(ge=1, le=16384)] | None = None
    crop: tuple[Size, Size] | None = None
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    antialias: bool = True

    @field_validator("crop", mode="before")
    @classmethod
    def _crop(cls, value: Any) -> Any:
        return None if value is None else _size_pair(value)


class DataConfig(_Strict):
    """Which images to explain and how they are prepared.

    ``kind``: ``embedded`` (the shipped dataset), ``imagefolder`` (``root/<class>/<image>``),
    ``voc`` (``root/<images>`` and VOC XML files in ``annotations``, default
    ``root/Annotations``), ``manifest`` (a CSV or JSON-lines file ``path`` with columns
    ``path, label`` and optional ``x0, y0, x1, y1`` boxes) or ``coco`` (images in ``root``,
    COCO ``instances_*.json`` in ``annotations``).
    ``image_size``: the explained images' size, an int or ``[height, width]``; null takes
    ``preprocess.crop``, else the model's input size (timm, torchvision: 224), else 64.
    ``preprocess``: ``auto`` (file datasets: resize the shorter side to ``size / 0.875``
    (timm: ``size / crop_pct``) and crop the centre, the model's interpolation; the reference
    CNN: ``squash``), ``squash`` (resize to the size, aspect ratio not kept) or a
    :class:`PreprocessConfig`.
    ``classes``: the dataset's name of each model output, in output order (a list or a file
    with one name a line); null: the model's ``classes`` matched by name, else the sorted
    names found in the data.
    """

    kind: Literal["embedded", "imagefolder", "voc", "manifest", "coco"] = "embedded"
    split: Literal["train", "test"] = "test"
    n_samples: int | None = Field(256, ge=1)
    image_size: tuple[Size, Size] | None = None
    preprocess: Literal["auto", "squash"] | PreprocessConfig = "auto"
    seed: int = Field(0, ge=0)
    root: str | None = None
    path: str | None = None
    images: str | None = None
    annotations: str | None = None
    classes: list[str] | str | None = None
    max_pixels: int = Field(89_478_485, ge=1)  # larger files are skipped as "huge" (Pillow's bomb limit)

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> Any:
        return None if value is None else _size_pair(value)

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        if self.kind == "manifest":
            if not self.path:
                raise ValueError("data.path: a manifest dataset needs the CSV or JSON-lines file")
        elif self.kind == "coco":
            if not self.root or not self.annotations:
                raise ValueError("data.root and data.annotations (the instances_*.json file) are required "
                                 "for data.kind='coco'")
        elif self.kind != "embedded" and not self.root:
            raise ValueError(f"data.root is required for data.kind={self.kind!r}")
        if self.kind == "embedded" and (self.path or self.images or self.annotations):
            raise ValueError("data.path, data.images and data.annotations are for file datasets, "
                             "not data.kind='embedded'")
        crop = self.preprocess.crop if isinstance(self.preprocess, PreprocessConfig) else None
        if crop is not None and self.image_size is not None and crop != self.image_size:
            raise ValueError(f"data.preprocess.crop {list(crop)} and data.image_size {list(self.image_size)} "
                             "differ; give one of them")
        return self


class OutputConfig(_Strict):
    """Which part of a model's output is the logits: ``index`` of a tuple or list, ``key``
    of a dict, or ``attribute`` of an object (``logits`` for Hugging Face outputs)."""

    index: int | None = None
    key: str | None = None
    attribute: str | None = None

    @model_validator(mode="after")
    def _one(self) -> OutputConfig:
        given = [k for k in ("index", "key", "attribute") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("model.output: give exactly one of index, key, attribute")
        return self


class ModelConfig(_Strict):
    """Which classifier to explain; exactly one source:

    ``arch``: ``reference`` (the shipped CNN), a torchvision classification model name, or
    ``timm:<name>`` (needs timm installed); ``factory``: ``"pkg.module:callable"`` or
    ``"path/to/file.py:callable"`` returning an ``nn.Module`` (called with ``kwargs``);
    ``program``: a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``).
    ``weights``: a local state dict (never downloaded). ``output`` selects the logits of a
    model whose forward returns a tuple, dict or object. ``classes``: the name of each output
    (a list, a file with one name a line, or ``imagenet``).
    """

    arch: str = "reference"
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    program: str | None = None
    weights: str | None = None
    random_init: bool = False
    num_classes: int | None = Field(None, ge=1)
    init_seed: int = Field(0, ge=0)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    output: OutputConfig | None = None
    classes: list[str] | str | None = None

    @model_validator(mode="after")
    def _weights_or_random(self) -> ModelConfig:
        if self.factory and self.program:
            raise ValueError("model: give either factory or program, not both")
        if (self.factory or self.program) and self.arch != "reference":
            raise ValueError("model.arch: not used with model.factory or model.program; remove it")
        if self.program and (self.weights or self.random_init or self.kwargs or self.num_classes):
            raise ValueError("model.program: an exported program carries its own weights; "
                             "remove model.weights, random_init, kwargs and num_classes")
        if self.kwargs and not self.factory:
            raise ValueError("model.kwargs: only for model.factory")
        if self.factory and self.num_classes:
            raise ValueError("model.num_classes: not used with model.factory; pass it to your callable "
                             "in model.kwargs")
        if self.factory and ":" not in self.factory:
            raise ValueError(f"model.factory: expected 'pkg.module:callable' or 'file.py:callable', "
                             f"got {self.factory!r}")
        if self.weights and self.random_init:
            raise ValueError("model: give either weights or random_init: true, not both")
        if self.arch != "reference" and not self.arch.startswith("timm:") and not (self.factory or self.program):
            import difflib

            import torchvision  # a torchvision name: the unknown one is said before its missing weights

            names = torchvision.models.list_models(module=torchvision.models)
            if self.arch not in names:
                close = difflib.get_close_matches(self.arch, names, n=5, cutoff=0.6)
                raise ValueError(f"model.arch: unknown architecture {self.arch!r}; use 'reference', "
                                 f"'timm:<name>' or a torchvision model name"
                                 + (f" (did you mean {', '.join(map(repr, close))}?)" if close else
                                    " (torchvision.models.list_models() lists them)"))
        if self.arch != "reference" and not self.weights and not self.random_init:
            raise ValueError(
                "model.weights: a torchvision or timm architecture needs a local weights file "
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
        from attriflow.explainers import REGISTRY

        if value not in REGISTRY:
            raise ValueError(f"unknown explainer {value!r}; registered: {', '.join(sorted(REGISTRY))}")
        return value

    @field_validator("label")
    @classmethod
    def _no_at(cls, value: str | None) -> str | None:
        if value is not None and "@" in value:
            raise ValueError(f"label {value!r}: '@' is reserved for the store's entries (name@digest)")
        return value

    @model_validator(mode="after")
    def _params_valid(self) -> ExplainerEntry:
        from attriflow.explainers import get_explainer, validate_params

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
    store), ``bootstrap`` resamples for the 95 % intervals (seeded by the run seed);
    ``include_inactive``: also show the store's entries the config no longer uses (dropped
    explainers, earlier parameter settings), labelled ``name@digest``; ``svg``: write
    every figure as SVG next to its PNG (off by default: it doubles the figures' cost;
    ``attriflow report RUN_DIR --svg`` writes them for a finished run)."""

    grid_samples: int = Field(6, ge=1, le=64)
    include_inactive: bool = False
    svg: bool = False  # every figure also as SVG (vector, for papers); PNG always
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


class StoreConfig(_Strict):
    """Where the run store lives and how its maps are encoded.

    ``url``: an fsspec URL (default ``RUN_DIR/store.zarr``; ``store: URL`` is short for
    ``store: {url: URL}``). ``attribution_dtype``: the precision maps are stored in:
    ``float32`` (default, exact), ``float16`` (2 bytes per value; values above 65504 cannot
    be stored and maps whose largest value is below 6.1e-5 lose precision: both are
    flagged or warned about, naming this setting) or ``bfloat16`` (float32's range with 8
    mantissa bits, about 3 significant digits; kept in float32 arrays whose low 16 bits are
    zero, which the shuffling codecs store in about 2 bytes per value). The metrics score
    the stored maps. ``codec``: the lossless compressor of the maps (``zstd``: Zarr's
    default; ``blosc-zstd`` / ``blosc-lz4``: Blosc with byte shuffle; ``none``). Both are
    fixed for a store's life and recorded in its provenance; ``benchmarks/SCALE.md``
    measures bytes per map and throughput of each.
    """

    url: str | None = None
    attribution_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    codec: Literal["zstd", "blosc-zstd", "blosc-lz4", "none"] = "zstd"


#: Where and how a run executes, not what it computes: left out of the hash and manifest
#: (the store's encoding is provenance of the store itself: its ``fixed`` layout attrs).
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
    store: StoreConfig = Field(default_factory=StoreConfig)

    @field_validator("store", mode="before")
    @classmethod
    def _store_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) or value is None else value

    @model_validator(mode="after")
    def _memory_store_is_local(self) -> RunConfig:
        if self.store.url and self.store.url.startswith("memory://") and self.runner.kind == "dask":
            raise ValueError("store.url: a memory:// store lives in one process; Dask workers cannot share it "
                             "(use runner.kind: local, or a file or object-store URL)")
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON of the resolved config (without ``runner``, ``store``)."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def canonical_json(self) -> str:
        """Resolved config as sorted, compact JSON, without the execution-only fields."""
        return json.dumps(self.model_dump(mode="json", exclude=EXECUTION_ONLY), sort_keys=True, separators=(",", ":"))


def format_validation_error(err: ValidationError, source: str) -> str:
    """``invalid config SOURCE: FIELD: what is wrong``: one line for one bad field, else one
    line per bad field after the first, each naming its dotted path."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        if loc and msg.startswith((f"{loc}.", f"{loc}:")):  # a model validator's message names its field
            lines.append(msg)
        else:
            lines.append(f"{loc or '(top level)'}: {msg}")
    if len(lines) == 1:
        return f"invalid config {source}: {lines[0]}"
    return "\n  ".join([f"invalid config {source}:", *lines])


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
