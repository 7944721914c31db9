"""gunicorn.conf.py's device slots, with stand-in server and worker objects (nothing is started).

pre_fork (in the master) gives each new worker the lowest slot no live worker holds; a worker
that exits leaves `server.WORKERS` (Gunicorn pops it before child_exit), so its slot is free for
its replacement. post_fork (in the worker) maps slot → cuda:N and starts loading on that device.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

CONF = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"


@pytest.fixture
def load_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Execute gunicorn.conf.py as Gunicorn does, with GPUs faked through CUDA_VISIBLE_DEVICES.
    Every variable the file sets is pinned first, so nothing leaks into this test process."""
    def load(gpus: int | None, **env: str) -> dict:
        return _load(monkeypatch, tmp_path, gpus, **env)
    return load


def _load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gpus: int | None, **env: str) -> dict:
    for name in ("EMBEDAPI_DEVICE", "EMBEDAPI_TORCH_THREADS", "EMBEDAPI_WORKERS", "CUDA_VISIBLE_DEVICES",
                 "EMBEDAPI_OWNS_METRICS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMBEDAPI_LOAD_MODELS", "off")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    if gpus is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(gpus)) or "-1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(CONF))


class FakeRegistry:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def start_loading(self, device: str, threads: int) -> None:
        self.calls.append((device, threads))


class FakeWorker:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.registry = FakeRegistry()
        flask_app = SimpleNamespace(extensions={"embedapi": SimpleNamespace(registry=self.registry)})
        self.app = SimpleNamespace(wsgi=lambda: flask_app)


class FakeServer:
    def __init__(self, workers: int) -> None:
        self.WORKERS: dict[int, FakeWorker] = {}
        self.cfg = SimpleNamespace(workers=workers)
        self.log = SimpleNamespace(info=lambda *a, **k: None, exception=lambda *a, **k: None)

    def spawn(self, conf: dict, pid: int) -> FakeWorker:
        """What Gunicorn's arbiter does: pre_fork, then the worker joins WORKERS, then post_fork runs in it."""
        worker = FakeWorker(pid)
        conf["pre_fork"](self, worker)
        self.WORKERS[pid] = worker
        conf["post_fork"](self, worker)
        return worker

    def reap(self, conf: dict, pid: int) -> None:
        worker = self.WORKERS.pop(pid)
        conf["child_exit"](self, worker)


def test_slots_are_the_lowest_free_and_map_to_one_gpu_each(load_conf):
    conf = load_conf(gpus=4, EMBEDAPI_DEVICE="auto")
    assert conf["workers"] == 4  # one worker per GPU by default
    server = FakeServer(workers=4)
    workers = [server.spawn(conf, pid) for pid in (101, 102, 103, 104)]
    assert [w.embedapi_slot for w in workers] == [0, 1, 2, 3]
    assert [w.registry.calls[0][0] for w in workers] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]

    server.reap(conf, 102)  # the worker on cuda:1 dies ...
    server.reap(conf, 104)
    again = server.spawn(conf, 105)  # ... its replacement takes the lowest free slot, and that GPU
    assert again.embedapi_slot == 1 and again.registry.calls == [("cuda:1", again.registry.calls[0][1])]
    last = server.spawn(conf, 106)
    assert last.embedapi_slot == 3 and last.registry.calls[0][0] == "cuda:3"
    assert sorted(w.embedapi_slot for w in server.WORKERS.values()) == [0, 1, 2, 3]


def test_more_workers_than_gpus_share_them_round_robin(load_conf):
    conf = load_conf(gpus=2, EMBEDAPI_DEVICE="cuda", EMBEDAPI_WORKERS="3")
    server = FakeServer(workers=3)
    devices = [server.spawn(conf, pid).registry.calls[0][0] for pid in (1, 2, 3)]
    assert devices == ["cuda:0", "cuda:1", "cuda:0"]


def test_cpu_workers_split_the_cores_between_torch_threads(load_conf):
    conf = load_conf(gpus=0)
    assert conf["workers"] == 1 and conf["worker_class"] == "embedapi.gunicorn_worker.DeadlineThreadWorker"
    cores = conf["_cores"]
    server = FakeServer(workers=2)
    a, b = server.spawn(conf, 7), server.spawn(conf, 8)
    assert (a.embedapi_slot, b.embedapi_slot) == (0, 1)
    assert a.registry.calls == [("auto", max(1, cores // 2))]  # no GPU: the device stays as configured


def test_explicit_device_and_threads_win(load_conf):
    conf = load_conf(gpus=2, EMBEDAPI_DEVICE="cpu", EMBEDAPI_TORCH_THREADS="3")
    assert conf["workers"] == 1  # EMBEDAPI_DEVICE=cpu: GPUs are not counted
    server = FakeServer(workers=1)
    assert server.spawn(conf, 9).registry.calls == [("cpu", 3)]
