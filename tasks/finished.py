"""The finished-run marker: how a rerun of a finished run answers without loading anything.

A finished ``attriflow run`` (every shard of every stage done, the report written) leaves
``RUN_DIR/finished.json``. It holds a digest of the *raw* config (the YAML as parsed, so
comments and key order do not matter), the working directory, the run directory and the
devices, a stamp of attriflow's own code and of the installed packages, and
``(path, mtime_ns, size)`` of every input the config names: the model's weights or program,
files named anywhere in the config (class lists, manifests), and every file and folder
under the dataset's roots and under any folder the config names. A later ``attriflow run``
with the same config first checks this marker (stdlib and YAML only: no torch, no Prefect,
no server) and, when every stamp still holds, says the run is finished in well under a
second; any difference, or any doubt, falls through to the full check (build the runtime,
plan from the store's records).

The marker is conservative by construction:

- the stamps of config, code and inputs are taken before the run reads any input, and the
  marker is written only if they still hold when the run (or a full check) found nothing
  left to compute;
- a model built by ``model.factory`` gets no marker (its code may read files no config
  names, such as a checkpoint next to it), nor does a dataset listing a file outside the
  stamped files and roots, nor a store at a URL;
- :func:`tasks.storage.run_lock` removes it whenever a process takes the run directory,
  i.e. before anything can change the store (a run, ``gc``, ``migrate``, a new selection);
- the store's metadata and record chunks, and the report, are stamped too, so a store
  edited by hand or a report rewritten is checked in full; a copied run directory too;
- attriflow's code stamp covers every source file of its packages and the site-packages
  folders (installing or upgrading any package changes their listing), so a new version
  of an explainer is never answered from an old marker.

This module must stay free of heavy imports: it runs before anything else is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MARKER = "finished.json"
#: Bump when what the marker holds changes meaning.
MARKER_VERSION = 2
_PACKAGES = ("analysis", "attriflow", "data", "explainers", "flows", "tasks")

Stamp = list[tuple[str, int, int]]


def _stat(paths: Iterable[str | Path]) -> Stamp:
    out: Stamp = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(p), -1, -1))
    return out


def code_stamp() -> str:
    """Digest of attriflow's source files (path, mtime, size) and of the folders the
    interpreter imports installed packages from (their mtime changes when a package is
    installed, upgraded or removed)."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(str(p) for pkg in _PACKAGES for p in (root / pkg).rglob("*")
                   if p.suffix in (".py", ".pt", ".json") and "__pycache__" not in p.parts)
    sites = sorted({p for p in sys.path if p.endswith(("site-packages", "dist-packages"))})
    h = hashlib.sha256(json.dumps([MARKER_VERSION, sys.version, _stat(files), _stat(sites)]).encode())
    return h.hexdigest()


def _devices() -> list[Any]:
    """What ``device: auto`` would resolve against, without importing torch: the host, the
    GPUs the driver lists and the ones this process may see (a run's load record holds the
    device type, so another device means recomputing)."""
    import glob
    import socket

    return [socket.gethostname(), sorted(glob.glob("/dev/nvidia[0-9]*")),
            os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("HIP_VISIBLE_DEVICES")]


def config_key(raw: Any, config_path: str | None, run_dir: Path) -> str:
    """Digest of a raw config (the parsed YAML; None for the embedded default), the working
    directory that relative paths in it are read from, the run directory and the devices.

    Raises
    ------
    TypeError, ValueError
        For a config JSON cannot hold (the caller then takes the full check).
    """
    text = json.dumps([MARKER_VERSION, raw, config_path is None, os.getcwd(), str(run_dir.resolve()), _devices()],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_raw(config_path: str | None) -> Any:
    """The config file parsed with YAML's safe loader, None for the embedded default;
    raises ``OSError`` / ``yaml.YAMLError`` (the caller then takes the full path, which
    reports them properly)."""
    if config_path is None:
        return None
    import yaml

    return yaml.safe_load(Path(config_path).read_text())


def default_run_dir(raw: Any) -> Path:
    """``runs/<name>`` as :class:`tasks.config.RunConfig` names it (``default`` when unset)."""
    name = raw.get("name", "default") if isinstance(raw, dict) else "default"
    return Path("runs") / str(name)


def _store_files(store: Path) -> list[Path]:
    """The store metadata a finished run's answer depends on."""
    files = [store / "zarr.json"]
    for record in sorted(store.glob("record_*")):
        files += [record / "zarr.json", *sorted(p for p in (record / "c").rglob("*") if p.is_file())]
    return files


def data_files(roots: Iterable[str | Path], exclude: str | Path | None = None) -> list[str]:
    """Every file and folder under the dataset's roots (folders and single files), less the
    ``exclude`` subtree (the run directory: its own files change with every command)."""
    skip = os.path.abspath(exclude) if exclude else None
    out: list[str] = []
    for value in roots:
        top = Path(value)
        out.append(str(top))
        if top.is_dir():
            out += sorted(str(p) for p in top.rglob("*")
                          if skip is None or not (os.path.abspath(p) + os.sep).startswith(skip + os.sep))
    return out


def inputs_of(cfg: Any, raw: Any) -> tuple[list[str], list[str]]:
    """``(files, roots)`` a run of ``cfg`` reads, known from the config alone, so that they
    are stamped before the runtime reads any of them: the model's files
    (:func:`tasks.models.model_files_stamp`: weights, program, a factory file's folder of
    modules), any string of the raw config that names an existing file (class lists,
    manifests), and the dataset's roots and any folder the config names, whose whole listing
    is stamped (an image added, removed or overwritten is seen).

    Raises
    ------
    ValueError
        For a model built by a factory (``model.factory``): its code may open files the config
        does not name (a checkpoint next to it), which no stamp can see; such runs get no
        marker and are always checked in full.
    """
    from attriflow.tasks.models import model_files_stamp

    if cfg.model.factory:
        raise ValueError(f"model.factory {cfg.model.factory!r}: the files its code reads cannot be stamped")
    d = cfg.data
    roots = {str(v) for v in (d.root, d.path, d.images, d.annotations) if v}

    def strings(x: Any) -> Iterable[str]:
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)

    files = {p for p, _, _ in model_files_stamp(cfg.model)}
    named = {s for s in strings(raw) if s and len(s) < 4096 and os.path.exists(s)}
    files |= {s for s in named if os.path.isfile(s)}
    roots |= {s for s in named if os.path.isdir(s) and os.path.abspath(s) != os.sep}
    return sorted(files), sorted(roots)


def covered(paths: Iterable[str | Path], files: Iterable[str], roots: Iterable[str]) -> bool:
    """Whether every one of ``paths`` (the files a dataset listed) is a stamped file or lies
    under a stamped root (a manifest may list images anywhere)."""
    names = {os.path.abspath(f) for f in files}
    tops = [os.path.abspath(r) + os.sep for r in roots]
    return all(os.path.abspath(p) in names or any((os.path.abspath(p) + os.sep).startswith(t) for t in tops)
               for p in paths)


def _inputs(files: Iterable[str], roots: Iterable[str], run_dir: str | None = None) -> Stamp:
    return _stat(sorted(set(files) | set(data_files(roots, run_dir))))


def snapshot(key: str, files: Iterable[str], roots: Iterable[str], run_dir: Path) -> dict[str, Any]:
    """The stamps of a run's config, code and inputs, taken *before* it reads them (see
    :func:`write`): ``files`` are the single files the run reads, ``roots`` the folders
    whose every file it may read (see :func:`inputs_of`); the run directory's own files
    are left out of the roots' listings."""
    files, roots = sorted(map(str, files)), sorted(map(str, roots))
    where = str(run_dir.resolve())
    return {"config": key, "code": code_stamp(), "files": files, "roots": roots, "exclude": where,
            "inputs": _inputs(files, roots, where)}


def write(run_dir: Path, before: dict[str, Any], counts: dict[str, dict[str, int]],
          source_files: Iterable[str | Path] = ()) -> bool:
    """Leave the marker of a finished run (call while holding the run directory's lock),
    unless its code or inputs changed since ``before`` (:func:`snapshot`, taken before the
    run computed: results of a config edited mid-run must not be stamped with the new one).
    ``counts`` are the shard tasks per stage (printed by the next finished rerun);
    ``source_files`` the files the dataset listed, each of which must have been stamped
    (else no marker). Returns whether the marker was written."""
    store = run_dir / "store.zarr"
    if not (store / "zarr.json").exists() or (run_dir / "store-url").exists():
        return False  # a store at a URL: always the full check
    if not covered(source_files, before["files"], before["roots"]):
        return False
    now = _inputs(before["files"], before["roots"], before["exclude"])
    if code_stamp() != before["code"] or now != before["inputs"]:
        return False
    body = {"version": MARKER_VERSION, "run_dir": str(run_dir.resolve()), **before, "store": _stat(_store_files(store)),
            "report": _stat([run_dir / "report" / "summary.md", run_dir / "report" / "index.html"]),
            "counts": counts}
    tmp = run_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(body))
    os.replace(tmp, run_dir / MARKER)
    return True


def remove(run_dir: Path) -> None:
    """Forget the marker (anything may change the run directory from now on)."""
    try:
        os.unlink(run_dir / MARKER)
    except FileNotFoundError:
        pass


def check(run_dir: Path, key: str) -> dict[str, dict[str, int]] | None:
    """The marker's per-stage counts when it says the run with config ``key`` is finished
    and every stamped file is unchanged; None otherwise (take the full check)."""
    try:
        body = json.loads((run_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("version") != MARKER_VERSION or body.get("config") != key:
        return None
    if body.get("run_dir") != str(run_dir.resolve()) or (run_dir / "store-url").exists():
        return None  # a copied run directory; a store at a URL
    try:
        now = {"inputs": [tuple(x) for x in _inputs(body["files"], body["roots"], body["exclude"])],
               "store": _stat(p for p, _, _ in body["store"]), "report": _stat(p for p, _, _ in body["report"])}
    except (KeyError, TypeError, ValueError):
        return None
    for field, stat in now.items():
        stamped = [tuple(x) for x in body[field]]
        if (field != "inputs" and not stamped) or any(m < 0 for _, m, _ in stamped) or stat != stamped:
            return None
    if body.get("code") != code_stamp():
        return None
    counts = body.get("counts")
    return counts if isinstance(counts, dict) else None
