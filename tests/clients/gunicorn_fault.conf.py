"""Test-only Gunicorn config: the repository's gunicorn.conf.py plus one injected fault.

`gunicorn -c tests/clients/gunicorn_fault.conf.py wsgi:app` runs with every setting and hook of
the real config. The only change: in each worker, after a model has been really loaded and warmed
(at full speed), its engine's runner is wrapped so that every forward pass first sleeps
EMBEDAPI_TEST_FORWARD_DELAY seconds and then delegates to the real runner. The vectors are the real
model's; only the time a batch holds the engine changes, so a tiny EMBEDAPI_MAX_QUEUE_TOKENS makes
the queue overflow (429) on demand.
"""

import os
import runpy
import time
from pathlib import Path

_base = runpy.run_path(str(Path(__file__).resolve().parents[2] / "gunicorn.conf.py"))
globals().update({name: value for name, value in _base.items() if not name.startswith("_")})
_base_post_fork = _base["post_fork"]


class _SlowRunner:
    """Sleeps, then runs the real forward pass."""

    def __init__(self, inner, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    def run(self, batch):
        time.sleep(self.delay)
        return self.inner.run(batch)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def post_fork(server, worker):
    delay = float(os.environ.get("EMBEDAPI_TEST_FORWARD_DELAY") or 0)
    registry = worker.app.wsgi().extensions["embedapi"].registry
    load_one = registry._load_one

    def load_one_then_slow_down(*args, **kwargs):
        loaded = load_one(*args, **kwargs)  # real loading and warm-up
        loaded.engine.runner = _SlowRunner(loaded.engine.runner, delay)
        return loaded

    registry._load_one = load_one_then_slow_down
    _base_post_fork(server, worker)
