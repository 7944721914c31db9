"""Prometheus metrics: requests, batches, queue, tokens, model loading (docs/operations.md lists them).

Under Gunicorn, `gunicorn.conf.py` sets PROMETHEUS_MULTIPROC_DIR before anything imports
prometheus_client, so every worker writes its values to files there and one scrape of any worker
sums them all (`render()` reads the directory). Outside Gunicorn (tests, `flask run`) each app
keeps its own in-memory registry. The engine calls `batch_done` / `queue_depth` / `request_queued` (BatchObserver),
the registry calls `model_loaded`, the access-log hook calls `request_done`.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, \
    values

# The value class prometheus_client chose at its import: file-backed when PROMETHEUS_MULTIPROC_DIR was set.
MULTIPROCESS = values.ValueClass is not values.MutexValue
CONTENT_TYPE = CONTENT_TYPE_LATEST
if MULTIPROCESS:  # `flask run` with the variable set to a directory that does not exist yet
    os.makedirs(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ["prometheus_multiproc_dir"], exist_ok=True)

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_HANDOFF_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_BATCH_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class Metrics:
    """The server's metrics, registered on their own registry (one per app, so tests stay independent).

    Every metric has labels, so a process that never serves (the Gunicorn master, which preloads the
    app) writes no value and never appears as a worker in the aggregated output.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("embedapi_requests", "HTTP requests answered, by route (URL rule), method and status.",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("embedapi_request_duration_seconds",
                                         "Time from reading the request to returning the response, by route.",
                                         ["route", "method"], buckets=_DURATION_BUCKETS, registry=r)
        self.queue_seconds = Histogram("embedapi_queue_seconds",
                                       "Per batch: time its oldest request waited in the model's queue.",
                                       ["model"], buckets=_DURATION_BUCKETS, registry=r)
        self.request_queue_seconds = Histogram(
            "embedapi_request_queue_seconds",
            "Per request: time from its arrival at the model's queue to the start of its first forward pass "
            "(queries waiting behind bulk work show here).", ["model"], buckets=_DURATION_BUCKETS, registry=r)
        self.handoff_seconds = Histogram(
            "embedapi_handoff_seconds",
            "Per request: time from its rows being computed to its response having been written to the socket "
            "(the request thread's wake-up, the JSON, the send; under Gunicorn only).", ["model"],
            buckets=_HANDOFF_BUCKETS, registry=r)
        self._handoff_series: dict[str, Any] = {}
        self.inference_seconds = Histogram("embedapi_inference_seconds", "Per batch: forward-pass time.",
                                           ["model"], buckets=_DURATION_BUCKETS, registry=r)
        self.batch_size = Histogram("embedapi_batch_size", "Sequences per forward pass.", ["model"],
                                    buckets=_BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("embedapi_batch_tokens",
                                      "Padded tokens per forward pass (longest sequence x batch size).", ["model"],
                                      buckets=_BATCH_TOKEN_BUCKETS, registry=r)
        self.tokens = Counter("embedapi_tokens", "Real (unpadded) tokens fed to the model, warm-up included.",
                              ["model"], registry=r)
        self.padding = Counter("embedapi_padding_tokens", "Padding tokens computed (padded minus real tokens).",
                               ["model"], registry=r)
        self.items = Counter("embedapi_items", "Sequences computed (inputs or query-document pairs), warm-up included.",
                             ["model"], registry=r)
        self.queue_tokens = Gauge("embedapi_queue_tokens", "Tokens waiting in the model's queue (summed over workers).",
                                  ["model"], multiprocess_mode="livesum", registry=r)
        self.load_seconds = Gauge("embedapi_model_load_seconds",
                                  "Seconds this worker took to load and warm the model (one series per worker).",
                                  ["model", "kind"], multiprocess_mode="liveall", registry=r)
        self._request_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._model_series: dict[str, tuple[Any, ...]] = {}
        self.models_loaded = Gauge("embedapi_models_loaded", "Models loaded and warmed in this worker (per worker).",
                                   ["device"], multiprocess_mode="liveall", registry=r)

    # -- HTTP ----------------------------------------------------------------------------
    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        # Label lookups cost more than the update itself; the series are few (URL rules x methods x
        # statuses), so each request's pair is looked up once and kept.
        key = (route, method, status)
        pair = self._request_series.get(key)
        if pair is None:
            pair = (self.requests.labels(route, method, str(status)), self.request_seconds.labels(route, method))
            self._request_series[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def handoff(self, model: str, seconds: float) -> None:
        series = self._handoff_series.get(model)
        if series is None:
            series = self._handoff_series[model] = self.handoff_seconds.labels(model)
        series.observe(max(0.0, seconds))

    # -- engine (BatchObserver) ------------------------------------------------------------
    def _of(self, model: str) -> tuple[Any, ...]:
        """The per-model series, looked up once per model (a label lookup costs more than the update)."""
        series = self._model_series.get(model)
        if series is None:
            series = self._model_series[model] = tuple(m.labels(model) for m in (
                self.batch_size, self.batch_tokens, self.tokens, self.padding, self.items, self.queue_seconds,
                self.inference_seconds, self.queue_tokens, self.request_queue_seconds))
        return series

    def batch_done(self, model: str, size: int, padded_tokens: int, real_tokens: int,
                   queue_seconds: float, inference_seconds: float) -> None:
        sizes, tokens_per_batch, tokens, padding, items, queue, inference = self._of(model)[:7]
        sizes.observe(size)
        tokens_per_batch.observe(padded_tokens)
        tokens.inc(real_tokens)
        padding.inc(max(0, padded_tokens - real_tokens))
        items.inc(size)
        queue.observe(max(0.0, queue_seconds))
        inference.observe(inference_seconds)

    def queue_depth(self, model: str, tokens: int) -> None:
        self._of(model)[7].set(tokens)

    def request_queued(self, model: str, seconds: float) -> None:
        self._of(model)[8].observe(max(0.0, seconds))

    # -- registry ----------------------------------------------------------------------------
    def model_loaded(self, model: str, kind: str, device: str, seconds: float) -> None:
        self.load_seconds.labels(model, kind).set(seconds)
        self.models_loaded.labels(device).inc()

    # -- exposition ----------------------------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text: all workers' files when multiprocess, else this app's registry."""
        if MULTIPROCESS:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def multiprocess_dir() -> str | None:
    """The directory the workers write to, when multiprocess mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") if MULTIPROCESS else None
