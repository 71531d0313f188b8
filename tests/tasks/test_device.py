"""Device choice: CUDA when present, one GPU per Dask worker. CUDA itself is mocked only at
the device-choice boundary (``torch.cuda.is_available`` / ``device_count``) and the worker
number at ``worker_slot``."""

from __future__ import annotations

import pytest
import torch

from attriflow.tasks import runtime


@pytest.fixture
def gpus(monkeypatch):
    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


def test_each_worker_gets_its_own_gpu(gpus, monkeypatch) -> None:
    gpus(4)
    chosen = []
    for slot in range(6):
        monkeypatch.setattr(runtime, "worker_slot", lambda s=slot: s)
        chosen.append(runtime.pick_device("auto"))
    assert chosen == [torch.device("cuda", i % 4) for i in range(6)]


def test_outside_a_worker_or_with_one_visible_gpu_it_is_cuda_0(gpus, monkeypatch) -> None:
    gpus(2)
    monkeypatch.setattr(runtime, "worker_slot", lambda: None)
    assert runtime.pick_device("cuda") == torch.device("cuda", 0)
    gpus(1)  # dask-cuda style: each worker sees only its own GPU
    monkeypatch.setattr(runtime, "worker_slot", lambda: 3)
    assert runtime.pick_device("auto") == torch.device("cuda", 0)


def test_cpu_without_gpus_and_a_clear_error_when_cuda_is_demanded(gpus) -> None:
    gpus(0)
    assert runtime.pick_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="'cuda' requested"):
        runtime.pick_device("cuda")


def test_worker_slot_reads_the_dask_worker_name() -> None:
    from distributed import Client, LocalCluster

    assert runtime.worker_slot() is None  # not in a worker
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        workers = list(client.scheduler_info()["workers"])
        slots = [client.submit(runtime.worker_slot, pure=False, workers=[w]).result() for w in workers]
    assert sorted(slots) == [0, 1]
