"""Gunicorn settings for embedapi: `gunicorn -c gunicorn.conf.py wsgi:app`.

The master may preload the app (cheap: the factory loads no model) but never initialises CUDA
or holds weights: each worker loads its models in `post_fork`, on its own device slot.
"""

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter

from embedapi.config import normalize_device  # torch-free: the master never imports torch

# The master never loads models, whatever the environment says (a preloaded app would otherwise load torch
# and weights before the fork); post_fork loads them in each worker, in the background.
_LOAD_MODELS_IGNORED = os.environ.get("EMBEDAPI_LOAD_MODELS", "off").strip().lower() not in ("", "off")
os.environ["EMBEDAPI_LOAD_MODELS"] = "off"

# Prometheus multiprocess mode: prometheus_client picks file-backed values when this variable is set
# at its import, so it is set here, before the app (preloaded in the master) imports it. Every
# worker writes its metrics there and a scrape of any worker sums them all. Default: a fresh
# private directory, removed when the master exits.
# (The ownership mark survives a SIGHUP, which re-reads this file with the variable already set.)
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="embedapi-metrics-")
    os.environ["EMBEDAPI_OWNS_METRICS_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def _gpu_ids() -> list[str]:
    """The GPUs the workers share, as CUDA_VISIBLE_DEVICES entries, found without initialising CUDA in the
    master: EMBEDAPI_DEVICE=cuda:N picks one, cpu/mps none; else CUDA_VISIBLE_DEVICES's entries, else
    nvidia-smi's GPU UUIDs (unambiguous whatever CUDA_DEVICE_ORDER says)."""
    device = normalize_device(os.environ.get("EMBEDAPI_DEVICE", "auto"))
    if device in ("cpu", "mps"):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        ids = ids[: ids.index("-1")] if "-1" in ids else ids  # CUDA ignores the entries after -1
    elif not shutil.which("nvidia-smi"):
        ids = []
    else:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        lines = [line for line in out.splitlines() if line.startswith("GPU ")]
        ids = [line.rsplit("(UUID: ", 1)[1].rstrip(")").strip() if "(UUID: " in line else str(i)
               for i, line in enumerate(lines)]
    if device.startswith("cuda:"):
        index = int(device.split(":")[1])
        if index >= len(ids) and ids:
            raise RuntimeError(f"EMBEDAPI_DEVICE={device}, but only {len(ids)} GPUs are visible")
        return ids[index: index + 1] if ids else [str(index)]
    return ids


def _gpu_count() -> int:
    return len(_gpu_ids())


_gpu_list = _gpu_ids()
_gpus = len(_gpu_list)
_cores = os.cpu_count() or 1

bind = f"{os.environ.get('EMBEDAPI_HOST', '0.0.0.0')}:{os.environ.get('APP_PORT', '8000')}"
# One worker per GPU; on CPU one worker whose request threads feed one batching engine per model.
workers = int(os.environ.get("EMBEDAPI_WORKERS") or max(_gpus, 1))
# gthread with read deadlines: a request head is collected by the worker's main loop, not a request thread,
# and heads and bodies that come too slowly get a 408 (embedapi/gunicorn_worker.py, docs/security.md).
worker_class = "embedapi.gunicorn_worker.DeadlineThreadWorker"
threads = int(os.environ.get("EMBEDAPI_THREADS") or 64)
# Model loading happens in a background thread of the worker, so the worker heartbeats meanwhile;
# the timeout only has to cover a long forward pass holding the worker's request threads.
timeout = int(os.environ.get("EMBEDAPI_WORKER_TIMEOUT") or 300)
# Graceful shutdown. SIGTERM to the master: listeners close, each worker stops accepting, finishes every
# request it has accepted (and worker_exit drains the engines), then exits; a worker still busy after
# graceful_timeout seconds is killed. Give the container runtime more than this (compose: 75 s).
graceful_timeout = int(os.environ.get("EMBEDAPI_GRACEFUL_TIMEOUT") or 60)
keepalive = 75  # longer than common load balancers' idle timeouts
preload_app = os.environ.get("EMBEDAPI_PRELOAD", "true").lower() in ("1", "true", "yes")
accesslog = None  # embedapi logs one line per request itself
loglevel = os.environ.get("EMBEDAPI_LOG_LEVEL", "info").lower()


def on_starting(server):
    """In the master, once: drop metric files a previous run left in PROMETHEUS_MULTIPROC_DIR (their
    pids are gone, and counters would otherwise start from the old totals)."""
    stale = glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db"))
    for path in stale:
        os.remove(path)
    server.log.info("metrics: multiprocess directory %s (%d stale files removed)",
                    os.environ["PROMETHEUS_MULTIPROC_DIR"], len(stale))


def on_exit(server):
    """In the master, at the very end: remove the metrics directory if this config created it."""
    if os.environ.get("EMBEDAPI_OWNS_METRICS_DIR") == os.environ["PROMETHEUS_MULTIPROC_DIR"]:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


EXIT_WINDOW_S = 600  # worker exits on a GPU within this window lengthen a failing worker's back-off


def _backoff(recent_exits: int) -> float:
    """Seconds a worker that cannot serve waits before exiting: 1, 2, 4 ... up to 30 (and well inside the
    master's heartbeat timeout), so a GPU or configuration that keeps failing is not a tight restart loop."""
    return float(min(2 ** recent_exits, 30, max(1, timeout // 3)))


def pre_fork(server, worker):
    """In the master: give the new worker the GPU with the fewest live workers (old ones of a reload
    included), and the back-off it waits before exiting should it fail (longer after recent exits there)."""
    live = list(server.WORKERS.values())
    used = {getattr(w, "embedapi_slot", None) for w in live}
    worker.embedapi_slot = next(i for i in range(len(used) + 1) if i not in used)  # a name in logs
    worker.embedapi_gpu = None
    if _gpus:
        per_gpu = Counter(getattr(w, "embedapi_gpu", None) for w in live)
        worker.embedapi_gpu = min(range(_gpus), key=lambda g: (per_gpu[g], g))
    now = time.monotonic()
    exits = getattr(server, "embedapi_exits", {})
    recent = [t for t in exits.get(worker.embedapi_gpu, []) if now - t < EXIT_WINDOW_S]
    worker.embedapi_backoff = _backoff(len(recent))


def _retire(server, worker, reason: str) -> None:
    """The registry's exit hook, in the worker: stop accepting now (SIGTERM: Gunicorn's graceful exit),
    wait the back-off in worker_exit, then exit so the master starts a replacement."""
    worker.embedapi_exit_delay = worker.embedapi_backoff
    server.log.error("worker %s cannot serve (%s); exiting in %.0fs so that Gunicorn starts a replacement",
                     worker.pid, reason, worker.embedapi_backoff)
    os.kill(os.getpid(), signal.SIGTERM)


def post_fork(server, worker):
    """In the worker, before torch is imported: restrict it to its GPU (CUDA_VISIBLE_DEVICES, so no CUDA
    context ever opens on another one), pick its thread count, then load the models in the background."""
    device = normalize_device(os.environ.get("EMBEDAPI_DEVICE", "auto"))
    where = device
    if worker.embedapi_gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = _gpu_list[worker.embedapi_gpu]
        if device != "auto":
            device = "cuda:0"  # the only device this process sees; auto also resolves to it when CUDA works
        where = f"GPU {_gpu_list[worker.embedapi_gpu]} ({device}, CUDA_VISIBLE_DEVICES set)"
    threads = int(os.environ.get("EMBEDAPI_TORCH_THREADS") or 0) or max(1, _cores // server.cfg.workers)
    registry = worker.app.wsgi().extensions["embedapi"].registry
    registry.exit_hook = lambda reason: _retire(server, worker, reason)
    registry.start_loading(device, threads)
    server.log.info("worker %s (slot %s): loading models on %s with %d torch threads%s", worker.pid,
                    worker.embedapi_slot, where, threads,
                    "; EMBEDAPI_LOAD_MODELS is ignored under Gunicorn (each worker loads)" if _LOAD_MODELS_IGNORED
                    else "")


def child_exit(server, worker):
    """In the master, when a worker has exited: its GPU and slot are free again (WORKERS no longer lists it),
    the exit is remembered for that GPU's back-off; its live gauges (queue depth, models loaded) leave the
    metrics, its counters stay."""
    from prometheus_client import multiprocess  # the environment variable is set by now

    if not hasattr(server, "embedapi_exits"):
        server.embedapi_exits = {}
    server.embedapi_exits.setdefault(getattr(worker, "embedapi_gpu", None), []).append(time.monotonic())
    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    """Finish queued work before the worker process ends (graceful shutdown); a worker that could not serve
    then waits its back-off (it accepts nothing meanwhile) before the master may replace it."""
    try:
        app = worker.app.wsgi()
        app.extensions["embedapi"].registry.shutdown(drain=True)
    except Exception:  # never block a worker's exit
        server.log.exception("draining the engines failed")
    time.sleep(getattr(worker, "embedapi_exit_delay", 0))
