"""gunicorn.conf.py's process model, with stand-in server and worker objects (nothing is started).

The CUDA facts are injected: visible devices through CUDA_VISIBLE_DEVICES or a stand-in `nvidia-smi` on
PATH. pre_fork (in the master) gives each new worker the GPU with the fewest live workers; a worker that
exits leaves `server.WORKERS` (Gunicorn pops it before child_exit). post_fork (in the worker, before torch
is imported) sets CUDA_VISIBLE_DEVICES to that one GPU and starts loading.
"""

from __future__ import annotations

import os
import runpy
import signal
from pathlib import Path
from types import SimpleNamespace

# prometheus_client picks its value class once, at import: import it before a test here sets
# PROMETHEUS_MULTIPROC_DIR (child_exit imports it), so later tests in this process keep in-memory metrics.
import prometheus_client  # noqa: F401
import pytest

CONF = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"
PINNED = ("EMBEDAPI_DEVICE", "EMBEDAPI_TORCH_THREADS", "EMBEDAPI_WORKERS", "CUDA_VISIBLE_DEVICES",
          "EMBEDAPI_OWNS_METRICS_DIR", "EMBEDAPI_LOAD_MODELS", "EMBEDAPI_WORKER_TIMEOUT")


@pytest.fixture
def load_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Execute gunicorn.conf.py as Gunicorn does, with GPUs faked through CUDA_VISIBLE_DEVICES.
    Every variable the file or its hooks set is pinned first, so nothing leaks into this test process."""
    def load(gpus: int | str | None, **env: str) -> dict:
        for name in PINNED:
            monkeypatch.setenv(name, "pinned")  # recorded, so the teardown restores even what hooks set
            monkeypatch.delenv(name)
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
        if isinstance(gpus, int):
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(gpus)) or "-1")
        elif isinstance(gpus, str):
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return runpy.run_path(str(CONF))
    return load


class FakeRegistry:
    exit_hook = None

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str | None]] = []

    def start_loading(self, device: str, threads: int) -> None:
        self.calls.append((device, threads, os.environ.get("CUDA_VISIBLE_DEVICES")))


class FakeWorker:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.registry = FakeRegistry()
        flask_app = SimpleNamespace(extensions={"embedapi": SimpleNamespace(registry=self.registry)})
        self.app = SimpleNamespace(wsgi=lambda: flask_app)

    @property
    def device(self) -> str:
        return self.registry.calls[0][0]

    @property
    def visible(self) -> str | None:
        return self.registry.calls[0][2]


class FakeServer:
    def __init__(self, workers: int) -> None:
        self.WORKERS: dict[int, FakeWorker] = {}
        self.cfg = SimpleNamespace(workers=workers)
        self.logged: list[str] = []
        self.log = SimpleNamespace(info=self._log, error=self._log, exception=self._log)

    def _log(self, msg: str, *args: object, **kwargs: object) -> None:
        self.logged.append(msg % args)

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

    def per_gpu(self) -> list[str | None]:
        return sorted(w.visible or "-" for w in self.WORKERS.values())


def test_each_worker_gets_the_gpu_with_the_fewest_live_workers_through_a_reload_and_deaths(load_conf):
    conf = load_conf(gpus="GPU-aaa,GPU-bbb", EMBEDAPI_DEVICE="auto")
    assert conf["workers"] == 2  # one worker per GPU by default
    server = FakeServer(workers=2)
    a, b = server.spawn(conf, 101), server.spawn(conf, 102)
    # Each worker sees only its own GPU (set before torch is imported) and resolves auto there.
    assert (a.visible, b.visible) == ("GPU-aaa", "GPU-bbb") and a.device == b.device == "auto"

    # SIGHUP: Gunicorn starts the new generation while the old one still lives, then stops the old one.
    c, d = server.spawn(conf, 103), server.spawn(conf, 104)
    assert (c.visible, d.visible) == ("GPU-aaa", "GPU-bbb")
    server.reap(conf, 101)
    server.reap(conf, 102)
    assert server.per_gpu() == ["GPU-aaa", "GPU-bbb"]

    # A worker dies: its replacement goes to the GPU left without one (the lowest free slot number would
    # have put it beside its sibling on GPU-aaa: slots 0 and 1 were free, the live ones held 2 and 3).
    server.reap(conf, 104)
    e = server.spawn(conf, 105)
    assert e.visible == "GPU-bbb" and server.per_gpu() == ["GPU-aaa", "GPU-bbb"]
    server.reap(conf, 103)
    assert server.spawn(conf, 106).visible == "GPU-aaa"
    assert server.per_gpu() == ["GPU-aaa", "GPU-bbb"]


def test_more_workers_than_gpus_share_them_evenly(load_conf):
    conf = load_conf(gpus=2, EMBEDAPI_DEVICE="cuda", EMBEDAPI_WORKERS="3")
    server = FakeServer(workers=3)
    workers = [server.spawn(conf, pid) for pid in (1, 2, 3)]
    assert [w.visible for w in workers] == ["0", "1", "0"]
    assert {w.device for w in workers} == {"cuda:0"}  # the one device each process sees
    server.reap(conf, 2)
    assert server.spawn(conf, 4).visible == "1"


def test_device_spellings_are_normalised_once(load_conf):
    conf = load_conf(gpus=2, EMBEDAPI_DEVICE=" CUDA ")
    assert conf["workers"] == 2  # upper case counts as a GPU setting here too
    assert FakeServer(2).spawn(conf, 1).device == "cuda:0"
    with pytest.raises(Exception, match="EMBEDAPI_DEVICE must be auto, cpu, cuda, cuda:N or mps"):
        load_conf(gpus=2, EMBEDAPI_DEVICE="gpu")


def test_an_explicit_gpu_is_the_one_made_visible(load_conf):
    conf = load_conf(gpus="3,5", EMBEDAPI_DEVICE="cuda:1")
    assert conf["workers"] == 1
    worker = FakeServer(1).spawn(conf, 1)
    assert (worker.visible, worker.device) == ("5", "cuda:0")
    with pytest.raises(RuntimeError, match="only 2 GPUs are visible"):
        load_conf(gpus="3,5", EMBEDAPI_DEVICE="cuda:2")


def test_gpus_are_found_by_uuid_with_nvidia_smi_when_nothing_says_otherwise(load_conf, monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncat <<'EOF'\nGPU 0: NVIDIA H200 (UUID: GPU-11111111-aaaa)\n"
                   "  MIG 1g.18gb     Device  0: (UUID: MIG-22222222-bbbb)\n"
                   "GPU 1: NVIDIA H200 (UUID: GPU-33333333-cccc)\nEOF\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    conf = load_conf(gpus=None)
    assert conf["_gpu_list"] == ["GPU-11111111-aaaa", "GPU-33333333-cccc"] and conf["workers"] == 2
    server = FakeServer(2)
    assert [server.spawn(conf, pid).visible for pid in (1, 2)] == ["GPU-11111111-aaaa", "GPU-33333333-cccc"]


def test_cpu_workers_split_the_cores_and_see_no_gpu_setting(load_conf):
    conf = load_conf(gpus=0)
    assert conf["workers"] == 1 and conf["worker_class"] == "embedapi.gunicorn_worker.DeadlineThreadWorker"
    cores = conf["_cores"]
    server = FakeServer(workers=2)
    a, b = server.spawn(conf, 7), server.spawn(conf, 8)
    assert (a.embedapi_slot, b.embedapi_slot) == (0, 1)
    assert a.registry.calls == [("auto", max(1, cores // 2), "-1")]  # no GPU: nothing changed


def test_explicit_device_and_threads_win(load_conf):
    conf = load_conf(gpus=2, EMBEDAPI_DEVICE="cpu", EMBEDAPI_TORCH_THREADS="3")
    assert conf["workers"] == 1  # EMBEDAPI_DEVICE=cpu: GPUs are not counted
    assert FakeServer(workers=1).spawn(conf, 9).registry.calls == [("cpu", 3, "0,1")]


@pytest.mark.parametrize("value", ["sync", "background", "off"])
def test_the_master_never_loads_models_whatever_the_environment_says(load_conf, value):
    load_conf(gpus=0, EMBEDAPI_LOAD_MODELS=value)
    assert os.environ["EMBEDAPI_LOAD_MODELS"] == "off"  # what the preloaded app in the master reads


def test_a_worker_that_cannot_serve_exits_after_a_back_off_that_grows_with_recent_exits(load_conf, monkeypatch):
    conf = load_conf(gpus=2)
    server = FakeServer(workers=2)
    first = server.spawn(conf, 1)
    server.spawn(conf, 2)
    assert first.embedapi_backoff == 1
    killed: list[tuple[int, int]] = []
    slept: list[float] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(conf["time"], "sleep", slept.append)
    first.registry.exit_hook("models failed to load (ConfigError: ...)")  # what the registry calls
    assert killed == [(os.getpid(), signal.SIGTERM)]  # Gunicorn's graceful exit: it stops accepting
    conf["worker_exit"](server, first)
    assert slept == [1]  # then waits its back-off before the master may replace it
    assert any("cannot serve" in line and "models failed to load" in line for line in server.logged)

    backoffs = []
    for pid in range(3, 10):  # the worker on GPU 0 keeps failing: each replacement waits longer
        server.reap(conf, min(p for p, w in server.WORKERS.items() if w.visible == "0"))
        backoffs.append(server.spawn(conf, pid).embedapi_backoff)
    assert backoffs == [2, 4, 8, 16, 30, 30, 30]
    server.reap(conf, 2)  # the other GPU's record is its own: one exit there
    replacement = server.spawn(conf, 10)
    assert replacement.visible == "1" and replacement.embedapi_backoff == 2
