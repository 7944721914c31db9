"""Gunicorn settings for embedapi: `gunicorn -c gunicorn.conf.py wsgi:app`.

The master may preload the app (cheap: the factory loads no model) but never initialises CUDA
or holds weights: each worker loads its models in `post_fork`, on its own device slot.
"""

import glob
import os
import shutil
import subprocess
import tempfile

# The master does not load models; post_fork starts loading in each worker.
os.environ.setdefault("EMBEDAPI_LOAD_MODELS", "off")

# Prometheus multiprocess mode: prometheus_client picks file-backed values when this variable is set
# at its import, so it is set here, before the app (preloaded in the master) imports it. Every
# worker writes its metrics there and a scrape of any worker sums them all. Default: a fresh
# private directory, removed when the master exits.
# (The ownership mark survives a SIGHUP, which re-reads this file with the variable already set.)
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="embedapi-metrics-")
    os.environ["EMBEDAPI_OWNS_METRICS_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def _gpu_count() -> int:
    """GPUs visible, asked of CUDA_VISIBLE_DEVICES / nvidia-smi so the master never initialises CUDA."""
    device = os.environ.get("EMBEDAPI_DEVICE", "auto").lower()
    if device == "cpu" or device == "mps":
        return 0
    if device.startswith("cuda:"):
        return 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


_gpus = _gpu_count()
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


def pre_fork(server, worker):
    """In the master: give the new worker the lowest device slot no live worker holds."""
    used = {getattr(w, "embedapi_slot", None) for w in server.WORKERS.values()}
    worker.embedapi_slot = next(i for i in range(len(used) + 1) if i not in used)


def post_fork(server, worker):
    """In the worker: pick its device and thread count, then load the models (in the background)."""
    device = os.environ.get("EMBEDAPI_DEVICE", "auto")
    if _gpus and device in ("auto", "cuda"):
        device = f"cuda:{worker.embedapi_slot % _gpus}"
    threads = int(os.environ.get("EMBEDAPI_TORCH_THREADS") or 0) or max(1, _cores // server.cfg.workers)
    app = worker.app.wsgi()
    app.extensions["embedapi"].registry.start_loading(device, threads)
    server.log.info("worker %s (slot %s): loading models on %s with %d torch threads",
                    worker.pid, worker.embedapi_slot, device, threads)


def child_exit(server, worker):
    """In the master, when a worker has exited: its device slot is free again (WORKERS no longer
    lists it); its live gauges (queue depth, models loaded) leave the metrics, its counters stay."""
    from prometheus_client import multiprocess  # the environment variable is set by now

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    """Finish queued work before the worker process ends (graceful shutdown)."""
    try:
        app = worker.app.wsgi()
        app.extensions["embedapi"].registry.shutdown(drain=True)
    except Exception:  # never block a worker's exit
        server.log.exception("draining the engines failed")
