"""Test-only Gunicorn config: the repository's gunicorn.conf.py plus injectable faults in each worker.

    gunicorn -c tests/faults/gunicorn_faults.conf.py wsgi:app

Every setting and hook of the real config applies unchanged; `post_fork` additionally starts a thread
that waits for this worker's models and wraps each engine's runner (the real forward pass still runs):

- a batch holding a text that contains ``FAULT_RAISE`` raises instead of computing;
- a batch holding a text that contains ``FAULT_CUDA`` raises the error a broken CUDA context gives
  (``torch.AcceleratorError``); the wrapper sits inside the backend's GuardedRunner, as a real one would;
- a batch holding a text that contains ``FAULT_SLOW`` holds the engine before computing: until the file
  ``EMBEDAPI_FAULT_RELEASE_FILE`` exists when that is set (a test releases it when it has seen what it
  wanted), at most ``EMBEDAPI_FAULT_SLOW_SECONDS`` (default 3; the bound when waiting for the file).

Each wrapped batch is logged as ``FAULTS batch pid=<pid> model=<id> outcome=<ok|raise|slow> texts=<json>``
(the decoded texts, so a test can tell which requests shared a batch), and ``FAULTS armed pid=<pid>``
once the wrappers are in place. Nothing of this is ever loaded by the product.
"""

import json
import logging
import os
import threading
import time
from pathlib import Path

_REAL = Path(__file__).resolve().parents[2] / "gunicorn.conf.py"
exec(compile(_REAL.read_text(encoding="utf-8"), str(_REAL), "exec"))  # noqa: S102 - the real settings and hooks

_real_post_fork = post_fork  # noqa: F821 - defined by the exec above
_log = logging.getLogger("embedapi.faults")

RAISE_MARK = "FAULT_RAISE"
SLOW_MARK = "FAULT_SLOW"
CUDA_MARK = "FAULT_CUDA"


class FaultyRunner:
    """Wraps a real runner: decodes each batch, logs it, then raises / sleeps / delegates."""

    def __init__(self, real, model_id, tokenizer, slow_seconds, release_file):
        self.real = real
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.slow_seconds = slow_seconds
        self.release_file = release_file

    def __getattr__(self, name):  # anything else the engine may read (max_seq_length, ...)
        return getattr(self.real, name)

    def run(self, batch):
        texts = [self.tokenizer.decode(list(seq), skip_special_tokens=True) for seq in batch]
        joined = "\n".join(texts)
        outcome = ("raise" if RAISE_MARK in joined else "cuda" if CUDA_MARK in joined
                   else "slow" if SLOW_MARK in joined else "ok")
        _log.warning("FAULTS batch pid=%d model=%s outcome=%s texts=%s", os.getpid(), self.model_id, outcome,
                     json.dumps(texts, ensure_ascii=True))
        if outcome == "raise":
            raise RuntimeError("injected fault: forward pass failed (/secret/path/model.safetensors)")
        if outcome == "cuda":
            import torch

            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered (injected fault)")
        if outcome == "slow":
            until = time.monotonic() + self.slow_seconds
            while time.monotonic() < until and not (self.release_file and os.path.exists(self.release_file)):
                time.sleep(0.02)
            _log.warning("FAULTS released pid=%d model=%s", os.getpid(), self.model_id)
        return self.real.run(batch)


def _arm(registry, slow_seconds, release_file):
    deadline = time.monotonic() + 600
    while not registry.ready and time.monotonic() < deadline:
        if registry.state == "failed":
            return
        time.sleep(0.05)
    for model_id, loaded in registry.models.items():
        guard = loaded.engine.runner  # the backend's GuardedRunner: the fault goes inside it, as a GPU's would
        real = guard.inner
        tokenizer = getattr(getattr(real, "model", None), "tokenizer", None) or loaded.encoder._tokenizer
        guard.inner = FaultyRunner(real, model_id, tokenizer, slow_seconds, release_file)
    _log.warning("FAULTS armed pid=%d", os.getpid())


def post_fork(server, worker):  # noqa: F811 - wraps the real hook
    _real_post_fork(server, worker)
    registry = worker.app.wsgi().extensions["embedapi"].registry
    slow_seconds = float(os.environ.get("EMBEDAPI_FAULT_SLOW_SECONDS") or 3)
    release_file = os.environ.get("EMBEDAPI_FAULT_RELEASE_FILE") or None
    threading.Thread(target=_arm, args=(registry, slow_seconds, release_file), name="faults", daemon=True).start()
