"""The neuron-selection stage: scores, selections, overlaps and unit boxes of one shard."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from prefect.cache_policies import NO_CACHE

from attriflow.tasks import storage
from attriflow.tasks.runtime import (
    derive_seed,
    fault_point,
    get_runtime,
)
from attriflow.tasks.stages import common, load
from attriflow.tasks.stages.common import finished_record, shard_task, store_path, stored_targets
from attriflow.tasks.storage import Shard


def _unit_boxes(model: torch.nn.Module, layers: list[str], image: torch.Tensor,
                units: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """Box (y0, x0, y1, x1) of the input support of the backward signal from each selected
    unit's strongest activation on the clean image (``units``: (layer index, channel))."""
    from attriflow.explainers._hooks import capture_outputs

    boxes: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    if not units:
        return boxes
    with capture_outputs(model, layers) as acts, torch.enable_grad():
        x = image[None].detach().clone().requires_grad_(True)
        model(x)
        for li, ch in units:
            a = acts[layers[li]][0, ch]
            pos = int(torch.argmax(a))
            (g,) = torch.autograd.grad(a.flatten()[pos], x, retain_graph=True)
            ys, xs = torch.nonzero(g[0].abs().sum(0) > 0, as_tuple=True)
            if len(ys):
                boxes[(li, ch)] = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    return boxes


def expected_record(rt: Any, keys: Sequence[str]) -> int:
    """The provenance digest of a finished neurons shard of samples ``keys``: their load
    record, the stage's settings, the run seed, the layers scored and the version of the
    perturbations' draws (``analysis.neurons.NOISE_VERSION``)."""
    from attriflow.analysis.neurons import NOISE_VERSION

    return storage.digest64("neurons", load.expected_record(rt, keys), rt.config.neurons.model_dump(mode="json"),
                            rt.config.seed, [list(x) for x in rt.neuron_layers], NOISE_VERSION)


def candidates(rt: Any, view: common.ShardView) -> list[int]:
    """The neurons records that make ``view``'s shard done (see ``ShardView.key_sets``)."""
    return [expected_record(rt, keys) for keys in view.key_sets]


@shard_task(name="select-neurons", cache_policy=NO_CACHE, task_run_name="neurons-{shard.index}")
def select_neurons(config_json: str, run_dir: str, shard: Shard) -> dict[str, Any]:
    """Neuron-selection scores, selections, overlaps and unit boxes of one shard's configured samples."""
    from attriflow.analysis.neurons import overlap, select_top_k
    from attriflow.tasks.neurons import score_image

    t0 = time.perf_counter()
    rt = get_runtime(config_json)
    started = time.perf_counter()  # the task's own work (the runtime is built once per worker)
    path = store_path(run_dir)
    nc = rt.config.neurons
    view = common.shard_view(rt, path, shard)
    finished_record(path, "load", shard.index, None, f"neurons shard {shard.index}", load.candidates(rt, view))
    expected = candidates(rt, view)
    if common.accepted(storage.get_record(path, "neurons", shard.index), expected):
        return common.receipt("neurons", shard, True, t0)
    batch = rt.source.load_at(view.positions)
    inputs = rt.model.normalize(torch.from_numpy(batch.images)).to(rt.device)
    targets = stored_targets(path, rt, view)
    layers = [n for n, _ in rt.neuron_layers]
    offsets = np.cumsum([0] + [c for _, c in rt.neuron_layers])
    n, u = len(inputs), int(offsets[-1])
    corr = np.full((n, u), np.nan, np.float32)
    prec = np.full((n, u), np.nan, np.float32)
    sel_c = np.zeros((n, u), bool)
    sel_p = np.zeros((n, u), bool)
    ov_code = np.full((n, len(layers)), np.nan, np.float32)
    ov_jac = np.full((n, len(layers)), np.nan, np.float32)
    boxes = np.full((n, u, 4), -1, np.int64)
    tot_code = np.full(n, np.nan, np.float32)
    tot_jac = np.full(n, np.nan, np.float32)
    for i, sample_id in enumerate(rt.source.sample_ids[p] for p in view.positions):
        gen = torch.Generator().manual_seed(derive_seed(rt.config.seed, sample_id, "neurons"))
        scores = score_image(rt.module, layers, inputs[i], int(targets[i]), copies=nc.copies,
                             noise=nc.noise, mode=nc.mode, min_activation=nc.min_activation,
                             batch_size=nc.batch_size, generator=gen)
        chosen: list[tuple[int, int]] = []
        for li, name in enumerate(layers):
            lo, hi = offsets[li], offsets[li + 1]
            corr[i, lo:hi] = scores.correlation[name]
            prec[i, lo:hi] = scores.precision[name]
            sel_c[i, lo:hi] = select_top_k(scores.correlation[name], nc.top_k)
            sel_p[i, lo:hi] = select_top_k(scores.precision[name], nc.top_k)
            ov_code[i, li], ov_jac[i, li] = overlap(sel_c[i, lo:hi], sel_p[i, lo:hi])
            chosen += [(li, int(c)) for c in np.nonzero(sel_c[i, lo:hi] | sel_p[i, lo:hi])[0]]
        tot_code[i], tot_jac[i] = overlap(sel_c[i], sel_p[i])  # all layers' units together
        if shard.start + view.rows[i] < nc.box_samples:  # the first stored samples
            for (li, ch), box in _unit_boxes(rt.module, layers, inputs[i], chosen).items():
                boxes[i, offsets[li] + ch] = box
    region = {"sample": slice(shard.start, shard.stop)}
    storage.write_region(path, {
        "neuron_correlation": (("sample", "unit"), corr),
        "neuron_precision": (("sample", "unit"), prec),
        "selected_correlation": (("sample", "unit"), sel_c),
        "selected_precision": (("sample", "unit"), sel_p),
        "overlap_code": (("sample", "layer"), ov_code),
        "overlap_jaccard": (("sample", "layer"), ov_jac),
        "overlap_code_total": (("sample",), tot_code),
        "overlap_jaccard_total": (("sample",), tot_jac),
        "unit_box": (("sample", "unit", "corner"), boxes),
    }, region, rows=view.rows_array())
    common.write_seconds(path, "neurons", started, shard.index)
    fault_point("neurons.after_write")
    storage.set_record(path, "neurons", shard.index, expected[-1])
    return common.receipt("neurons", shard, False, t0)
