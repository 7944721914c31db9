"""The configured models of this process: lookup by id or alias, loading, warm-up, readiness."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from .config import ModelSpec, Settings
from .engine import BatchObserver, DeviceSlots, Engine
from .errors import ClientGone, InvalidRequest, ModelNotFound, ModelNotReady
from .prompts import resolve_prompts
from .quantize import Quantizer
from .tokenization import TextEncoder

log = logging.getLogger(__name__)

_WARMUP_TEXT = "名古屋大学で開発された日本語の埋め込みモデルです。"


@dataclass
class LoadedModel:
    """A model ready to serve: its tokenizer view, its engine and what clients may ask about it."""

    spec: ModelSpec
    encoder: TextEncoder
    engine: Engine
    dimensions: int | None
    device: str
    dtype: str
    load_seconds: float
    activation: Callable[[np.ndarray], np.ndarray]
    attention: str = "unknown"
    quantizer: Quantizer | None = None  # embedding models: the fixed int8/uint8 step (quantize.py)
    backend: str = "torch"  # what runs the forward pass: "torch" | "openvino" (backends/)


@dataclass(frozen=True)
class Entry:
    """A configured model before (and after) loading: spec plus its resolved prompts."""

    spec: ModelSpec
    preset: str
    prefixes: dict[str, str]


class Observer(BatchObserver, Protocol):
    """What the registry reports (metrics): the engine's batch events plus each model's load."""

    def model_loaded(self, model: str, kind: str, device: str, seconds: float) -> None: ...


class Registry:
    """Holds this process's models. Nothing is ever loaded for a name that is not configured."""

    def __init__(self, settings: Settings, observer: Observer | None = None) -> None:
        self.settings = settings
        self.observer = observer
        self.entries: dict[str, Entry] = {}
        self._names: dict[str, str] = {}
        for spec in settings.models:
            preset, prefixes = resolve_prompts(spec.id, spec.prompts)
            self.entries[spec.id] = Entry(spec, preset, prefixes)
            for name in (spec.id, *spec.aliases):
                self._names[name] = spec.id
        self.models: dict[str, LoadedModel] = {}
        self.state = "idle"  # idle | loading | ready | failed
        self.error: str | None = None
        self.device: str | None = None
        self._lock = threading.Lock()
        self._settled = threading.Event()  # set once loading has ended, ready or failed
        self._slots: DeviceSlots | None = None
        self._threads, self._streams = 0, 1  # the worker's threads, and the passes that may run at once
        # Called (with the reason) when this process can no longer serve: its models failed to load, or its
        # CUDA context broke. Gunicorn's post_fork sets it to make the worker exit (with a back-off) so the
        # master starts a replacement; without it the process stays and answers 503.
        self.exit_hook: Callable[[str], None] | None = None
        self.broken = False  # a CUDA error broke this process's context: nothing it loaded can serve

    # -- lookup ------------------------------------------------------------------------
    def entry(self, name: str) -> Entry:
        try:
            return self.entries[self._names[name]]
        except KeyError:
            known = ", ".join(sorted(self._names)) or "none"
            raise ModelNotFound(f"The model {name!r} does not exist on this server; configured models: {known}",
                                param="model") from None

    def get(self, name: str, kind: str, wait: float = 0.0,
            gone: Callable[[], bool] | None = None) -> tuple[Entry, LoadedModel]:
        """404 for an unknown name, 400 for the wrong kind, 503 until this worker has loaded it.

        While this worker is still loading, wait up to `wait` seconds for it (a worker Gunicorn has just
        started is handed connections at once); ClientGone if `gone()` turns true meanwhile.
        """
        entry = self.entry(name)
        if entry.spec.kind != kind:
            route = "/v1/embeddings" if entry.spec.kind == "embedding" else "/v1/rerank"
            raise InvalidRequest(f"The model {name!r} is a {entry.spec.kind} model; send it to {route}",
                                 param="model")
        deadline = time.monotonic() + wait
        while entry.spec.id not in self.models and self.state == "loading" and time.monotonic() < deadline:
            if gone is not None and gone():
                raise ClientGone()
            self._settled.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        loaded = self.models.get(entry.spec.id)
        if loaded is None or self.broken:
            if self.state == "failed":
                raise ModelNotReady(f"The model {name!r} is not available in this worker (its models failed to load "
                                    "or its GPU failed; the server log says why); retry, another worker may serve it",
                                    headers={"Retry-After": "5"})
            raise ModelNotReady(f"The model {name!r} is not loaded in this worker yet; retry shortly",
                                headers={"Retry-After": "5"})
        return entry, loaded

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # -- loading -----------------------------------------------------------------------
    def _claim(self) -> bool:
        """Move idle → loading; False if loading was already started (or done) by someone else."""
        with self._lock:
            if self.state != "idle":
                return False
            self.state = "loading"
            return True

    def start_loading(self, device: str | None = None, threads: int = 0) -> threading.Thread | None:
        """Load every configured model in a background thread (the worker answers /ready 503 meanwhile)."""
        if not self._claim():
            return None
        thread = threading.Thread(target=self._load_logged, args=(device, threads), name="model-loader",
                                  daemon=True)
        thread.start()
        return thread

    def _load_logged(self, device: str | None, threads: int) -> None:
        try:
            self._load(device, threads)
        except Exception:
            log.exception("loading models failed; this worker answers 503%s",
                          "" if self.exit_hook is None else " and exits, so that Gunicorn starts a replacement")
            self._exit(f"models failed to load ({self.error})")

    def _exit(self, reason: str) -> None:
        if self.exit_hook is not None:
            self.exit_hook(reason)

    def _fatal(self, exc: BaseException) -> None:
        """The runner's on_fatal: a non-OOM CUDA error left this process's CUDA context unusable."""
        with self._lock:
            first, self.broken = not self.broken, True
            self.state, self.error = "failed", f"CUDA context broken: {type(exc).__name__}: {exc}"
        if first:
            log.critical("%s; every forward pass on this device will fail, this worker stops serving%s",
                         self.error, "" if self.exit_hook is None else " and exits so Gunicorn replaces it")
            self._exit(self.error)

    def load_all(self, device: str | None = None, threads: int = 0) -> None:
        """Load and warm every configured model on `device` (default: EMBEDAPI_DEVICE) with `threads`
        torch threads (default: EMBEDAPI_TORCH_THREADS, else torch's own choice); if another thread is
        already loading, wait for it."""
        if self._claim():
            self._load(device, threads)
            return
        self._settled.wait()
        if self.state == "failed":
            raise RuntimeError(f"loading models failed: {self.error}")

    def _load(self, device: str | None, threads: int) -> None:
        try:
            from . import backends  # torch (and OpenVINO) are imported only once models are really loaded
            from .backends import pytorch as backend

            self.device = backend.pick_device(device or self.settings.device)
            log.info("%s", backend.runtime_summary(self.device))
            in_effect = backend.set_threads(threads or self.settings.torch_threads)
            # Batching off (the seeds' design, for comparison): one pass at a time across all models.
            lanes = (self.settings.parallel_batches or backend.default_lanes(self.device, in_effect)
                     if self.settings.batching else 1)
            # A spare pass for queries beside bulk work: on CPU (a pass there can take seconds); on GPUs
            # bulk batches are short and the spare is off unless EMBEDAPI_QUERY_LANES asks for it.
            # Batching off (one request per pass) has no bulk work to run beside: no spare.
            spare = self.settings.query_lanes if self.settings.query_lanes >= 0 else int(self.device == "cpu")
            self._slots = DeviceSlots(lanes, in_effect if self.device == "cpu" else 0,
                                      spare if self.settings.batching else 0, self.settings.busy_wait_ms)
            self._threads, self._streams = in_effect, lanes + (spare if self.settings.batching else 0)
            for entry in self.entries.values():
                self.models[entry.spec.id] = self._load_one(backends, backend, entry.spec, self.device)
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"  # for the log, never a client
            raise
        else:
            self.state = "ready"
        finally:
            self._settled.set()

    def _load_one(self, backends: Any, backend: Any, spec: ModelSpec, device: str) -> LoadedModel:
        started = time.monotonic()
        log.info("loading %s model %s from %s on %s", spec.kind, spec.id, spec.source, device)
        loaded = backends.load_runner(spec, device, spec.backend or self.settings.backend, trace=self.settings.trace,
                                      prepack=self.settings.prepack, threads=self._threads, streams=self._streams,
                                      cache_root=self.settings.conversion_cache_root,
                                      openvino_max_tokens=self.settings.openvino_max_tokens)
        model, runner, dtype, attention = loaded.model, loaded.runner, loaded.dtype, loaded.attention
        encoder = TextEncoder(model.tokenizer, runner.max_seq_length)
        s = self.settings
        budget = s.max_batch_tokens or runner.default_batch_tokens
        sample = (encoder.single(encoder.ids([_WARMUP_TEXT])[0]) if spec.kind == "embedding"
                  else encoder.pair(*encoder.ids([_WARMUP_TEXT, _WARMUP_TEXT])))
        if backend.warms_worst_shapes(device):
            backend.warm_up(runner, sample, backend.warm_shapes(budget, s.max_batch_size, encoder.max_seq_length),
                            spec.id, budget)
        guarded = backend.GuardedRunner(runner, on_fatal=self._fatal, budget=budget)
        engine = Engine(spec.id, guarded, max_batch_tokens=budget,
                        max_batch_size=s.max_batch_size, batch_wait_ms=s.batch_wait_ms,
                        max_queue_tokens=s.max_queue_tokens, batching=s.batching, observer=self.observer,
                        slots=self._slots, set_threads=backend.use_threads)
        rows = engine.submit([sample]).wait(600)  # the real path once, which also tells the dimensions
        dims = int(rows.shape[1]) if spec.kind == "embedding" else None
        quantizer = None if spec.kind != "embedding" else Quantizer.measure(
            lambda texts: engine.submit([encoder.single(i) for i in encoder.ids(texts)]).wait(600),
            resolve_prompts(spec.id, spec.prompts)[1].values())
        seconds = time.monotonic() - started
        how = (f"traced ({'whole model' if getattr(runner, 'traced_whole', False) else 'transformer only'})"
               if runner.traced else "eager")
        if getattr(runner, "prepacked", 0):
            how += f", {runner.prepacked} linear weights prepacked"
        if loaded.backend == "openvino":
            long = runner.long
            after = ("pooling traced, " if runner.tail_traced else "pooling eager, ") if runner.tail \
                else ""
            how = f"conversion cache {runner.cache}, {after}" + (
                f"batches over {runner.max_tokens} tokens on torch {'traced' if long.traced else 'eager'}"
                + (" (float32 weights, bfloat16 autocast)" if getattr(long, "autocast", None) is not None else "")
                if long is not None else "every batch on OpenVINO")
        log.info("loaded %s in %.1fs (backend %s, dtype %s, attention %s, max_seq_length %d, batch budget %d tokens, "
                 "%s)", spec.id, seconds, loaded.backend, backend.dtype_name(dtype), attention, encoder.max_seq_length,
                 budget, how)
        if self.observer is not None:
            self.observer.model_loaded(spec.id, spec.kind, device, seconds)
        return LoadedModel(spec, encoder, engine, dims, device, backend.dtype_name(dtype), seconds,
                           backend.activation(model), attention, quantizer, loaded.backend)

    def shutdown(self, drain: bool = True) -> None:
        """Stop every engine; with `drain`, queued work is finished first."""
        for model in self.models.values():
            model.engine.stop(drain=drain)

    # -- description -------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """What /v1/models tells a client about each configured model."""
        out = []
        for entry in self.entries.values():
            spec, loaded = entry.spec, self.models.get(entry.spec.id)
            out.append({
                "id": spec.id, "object": "model", "created": 0, "owned_by": "embedapi",
                "kind": spec.kind,
                "dimensions": loaded.dimensions if loaded else None,
                "matryoshka_dimensions": list(spec.matryoshka_dimensions),
                "max_tokens": loaded.encoder.max_seq_length if loaded else spec.max_seq_length,
                "prompt_preset": entry.preset if spec.kind == "embedding" else None,
                "prompts": entry.prefixes if spec.kind == "embedding" else None,
                "aliases": list(spec.aliases),
                "ready": loaded is not None,
                "device": loaded.device if loaded else None,
                "dtype": loaded.dtype if loaded else None,
                "backend": loaded.backend if loaded else None,
                "attention": loaded.attention if loaded else None,
            })
        return out
