"""attriflow: Prefect pipelines that explain image-classification CNNs.

The repository's folders (``explainers/``, ``tasks/``, ``flows/``, ``analysis/``, ``data/``)
are installed as subpackages of this one namespace (``attriflow.explainers`` ...), so a
``data.py`` or ``tasks/`` of the user's own never shadows them. The public Python API,
imported lazily (``import attriflow`` loads neither torch nor Prefect)::

    import attriflow

    ds = attriflow.run("configs/default.yaml", run_dir="runs/default")  # the CLI's run, as an xarray Dataset
    ds = attriflow.open_run("runs/default")                            # a finished run's store
    model = attriflow.load_model("reference")                          # a LoadedModel (module, normalize)
    split = attriflow.embedded_images("test", 0, 8)                    # images, labels, masks, boxes
    explainer = attriflow.get_explainer("grad_cam")(model.module)
    maps = explainer.attribute(model.normalize(torch.from_numpy(split.images)), torch.from_numpy(split.labels))

Names: :func:`run`, :func:`open_run`, :func:`load_model`, :func:`load_config`,
:func:`parse_config`, :func:`get_explainer`, :func:`list_explainers`, :class:`Family`,
:func:`embedded_images`, ``__version__``.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

# Run from a checkout (its root first on the path: ``python -m`` in the repository, a
# notebook there), this folder holds only this file: the subpackages are the checkout's
# sibling folders. Installed (wheel or editable), they are found as usual.
_root = Path(__file__).resolve().parents[1]
if not (Path(__file__).parent / "tasks").is_dir() and (_root / "tasks" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821 - a package's __path__

#: public name -> (module, attribute), imported on first use
_LAZY = {
    "get_explainer": ("attriflow.explainers.registry", "get_explainer"),
    "list_explainers": ("attriflow.explainers.registry", "list_explainers"),
    "Family": ("attriflow.explainers.base", "Family"),
    "load_config": ("attriflow.tasks.config", "load_config"),
    "parse_config": ("attriflow.tasks.config", "parse_config"),
    "embedded_images": ("attriflow.data.embedded", "make_split"),
}

__all__ = ["run", "open_run", "load_model", *_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("attriflow")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attriflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def open_run(run_dir: str | Path, include_inactive: bool = False) -> Any:
    """The store of run directory ``run_dir`` as an ``xarray.Dataset`` (lazy, dask-backed),
    restricted to the run's current config: its explainer entries and samples
    (``include_inactive``: also the entries of earlier configs, labelled ``name@digest``).

    Raises ``FileNotFoundError`` naming the directory when it holds no store."""
    from attriflow.tasks import storage
    from attriflow.tasks.stages.common import store_path

    path = store_path(str(Path(run_dir)))
    if not storage.exists(path):
        raise FileNotFoundError(f"run_dir: {str(run_dir)!r} holds no attriflow store (store.zarr)")
    return storage.open_current(path, include_inactive=include_inactive)


def load_model(arch: str = "reference", **model: Any) -> Any:
    """A classifier as the pipeline loads it (``attriflow.tasks.models.LoadedModel``:
    ``.module`` in eval mode, ``.normalize(images)`` for float images in [0, 1], (N, 3, H, W)).

    ``arch`` and the keyword arguments are the config's ``model:`` fields (``weights``,
    ``factory``, ``program``, ``classes`` ...); nothing is downloaded. Raises the config's
    ``ConfigError`` for an invalid field and ``ModelLoadError`` naming the file or module."""
    from attriflow.tasks.config import ModelConfig
    from attriflow.tasks.models import build_model

    return build_model(ModelConfig(arch=arch, **model))


def run(config: str | Path | None = None, run_dir: str | Path | None = None) -> Any:
    """Run (or resume, or answer from the finished marker) a pipeline exactly as
    ``attriflow run CONFIG --run-dir RUN_DIR`` does, printing the same lines; returns
    :func:`open_run` of the run directory. ``config`` None: the embedded default.

    Raises ``RuntimeError`` with the command's exit code when the run did not finish."""
    from attriflow.flows.cli import main

    argv = ["run"] + ([str(config)] if config is not None else [])
    if run_dir is not None:
        argv += ["--run-dir", str(run_dir)]
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"attriflow run {' '.join(argv[1:])} exited with {code} (its message is above)")
    if run_dir is None:
        from attriflow.tasks.config import load_config

        run_dir = Path("runs") / load_config(config).name
    return open_run(run_dir)
