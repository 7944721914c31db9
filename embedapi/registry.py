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
    quantizer: Quantizer | None = None  # embedding models: the fixed int8/uint8 step (quantize.py)


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
        if loaded is None:
            if self.state == "failed":
                raise ModelNotReady(f"The model {name!r} could not be loaded in this worker; the server log says "
                                    "why (the operator must fix the configuration and restart)")
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
            log.exception("loading models failed; this worker will answer 503")

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
            from . import backend  # torch is imported only once models are really loaded

            self.device = backend.pick_device(device or self.settings.device)
            in_effect = backend.set_threads(threads or self.settings.torch_threads)
            # Batching off (the seeds' design, for comparison): one pass at a time across all models.
            lanes = (self.settings.parallel_batches or backend.default_lanes(self.device, in_effect)
                     if self.settings.batching else 1)
            self._slots = DeviceSlots(lanes, in_effect if self.device == "cpu" else 0, self.settings.bulk_lanes,
                                      self.settings.busy_wait_ms)
            for entry in self.entries.values():
                self.models[entry.spec.id] = self._load_one(backend, entry.spec, self.device)
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"  # for the log, never a client
            raise
        else:
            self.state = "ready"
        finally:
            self._settled.set()

    def _load_one(self, backend: Any, spec: ModelSpec, device: str) -> LoadedModel:
        started = time.monotonic()
        log.info("loading %s model %s from %s on %s", spec.kind, spec.id, spec.source, device)
        model = backend.load(spec, device)
        dtype = backend.pick_dtype(spec.dtype, device)
        runner = backend.TorchRunner(model, device, dtype, spec.kind, trace=self.settings.trace)
        encoder = TextEncoder(model.tokenizer, runner.max_seq_length)
        s = self.settings
        engine = Engine(spec.id, runner, max_batch_tokens=s.max_batch_tokens or runner.default_batch_tokens,
                        max_batch_size=s.max_batch_size, batch_wait_ms=s.batch_wait_ms,
                        max_queue_tokens=s.max_queue_tokens, batching=s.batching, observer=self.observer,
                        slots=self._slots, set_threads=backend.use_threads)
        dims, quantizer = None, None
        if spec.kind == "embedding":
            warm = encoder.single(encoder.ids([_WARMUP_TEXT])[0])
            dims = int(engine.submit([warm]).wait(600).shape[1])
            quantizer = Quantizer.measure(lambda texts: engine.submit([encoder.single(i) for i in encoder.ids(texts)])
                                          .wait(600), resolve_prompts(spec.id, spec.prompts)[1].values())
        else:
            q, d = encoder.ids([_WARMUP_TEXT, _WARMUP_TEXT])
            engine.submit([encoder.pair(q, d)]).wait(600)
        seconds = time.monotonic() - started
        log.info("loaded %s in %.1fs (dtype %s, max_seq_length %d, %s)", spec.id, seconds,
                 backend.dtype_name(dtype), encoder.max_seq_length, "traced" if runner.traced else "eager")
        if self.observer is not None:
            self.observer.model_loaded(spec.id, spec.kind, device, seconds)
        return LoadedModel(spec, encoder, engine, dims, device, backend.dtype_name(dtype), seconds,
                           backend.activation(model), quantizer)

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
            })
        return out
