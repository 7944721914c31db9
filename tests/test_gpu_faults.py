"""GPU faults contained, without a GPU: the real runner with an injected fault inside the backend's guard.

- CUDA out of memory: the cache is released and the batch split, so the other requests succeed;
- an input that cannot fit even alone: a 503 naming EMBEDAPI_MAX_BATCH_TOKENS;
- rows that are not finite: the batch fails (500) instead of answering `null`;
- a non-OOM CUDA error (broken context), or models that fail to load: the worker exits and Gunicorn
  replaces it (live Gunicorn, which also shows the master never imports torch whatever
  EMBEDAPI_LOAD_MODELS says).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from embedapi import create_app
from embedapi.backends import pytorch as backend
from embedapi.config import ModelSpec
from embedapi.engine import Engine

from .conftest import EMBED
from .faults.server import FaultServer
from .server import call, poll as _poll

WAIT = 120


def poll(predicate, what: str, timeout: float = WAIT):
    return _poll(predicate, what, timeout)


class OOMFault:
    """Wraps the real runner: a batch of more than `max_rows` items, or holding an item longer than
    `max_len`, raises CUDA's out-of-memory error; `gate`, while set, holds each pass until released."""

    def __init__(self, real, max_rows: int = 1 << 30, max_len: int = 1 << 30) -> None:
        self.real, self.max_rows, self.max_len = real, max_rows, max_len
        self.batches: list[tuple[int, str]] = []
        self.gate: threading.Event | None = None
        self.holding = threading.Event()

    def run(self, batch):
        if self.gate is not None:
            self.holding.set()
            self.gate.wait(WAIT)
        if len(batch) > self.max_rows or max(len(s) for s in batch) > self.max_len:
            self.batches.append((len(batch), "oom"))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        self.batches.append((len(batch), "ok"))
        return self.real.run(batch)


@pytest.fixture(scope="module")
def runner(model_dirs):
    spec = ModelSpec(id="t", source=str(model_dirs["embed"]), kind="embedding")
    return backend.TorchRunner(backend.load(spec, "cpu"), "cpu", torch.float32, "embedding")


def _ids(runner, n: int, start: int = 0) -> list[list[int]]:
    tok = runner.model.tokenizer
    return [tok(f"テキスト{i}番、名古屋の温泉の話。" * (1 + i % 3))["input_ids"] for i in range(start, start + n)]


def test_an_oom_batch_is_split_and_every_row_is_what_an_unsplit_pass_gives(runner):
    released: list[int] = []
    fault = OOMFault(runner, max_rows=2)
    guard = backend.GuardedRunner(fault, release=lambda: released.append(1))
    batch = _ids(runner, 7)
    rows = guard.run(batch)
    np.testing.assert_allclose(rows, runner.run(batch), rtol=0, atol=1e-6)
    assert [n for n, outcome in fault.batches if outcome == "ok"] == [1, 2, 2, 2]  # 7 -> 3 + 4 -> 1 + 2 + 2 + 2
    assert guard.splits == 3 and len(released) == 3  # the cache is released before every retry


def test_only_an_item_that_cannot_fit_alone_fails_and_the_error_names_the_setting(runner):
    batch = _ids(runner, 4)
    longest = max(range(4), key=lambda i: len(batch[i]))
    fault = OOMFault(runner, max_len=len(batch[longest]) - 1)
    guard = backend.GuardedRunner(fault, release=lambda: None, budget=16384)
    with pytest.raises(backend.BatchOutOfMemory) as err:
        guard.run(batch)
    exc = err.value
    assert exc.status == 503 and exc.code == "out_of_memory" and exc.headers["Retry-After"]
    assert "EMBEDAPI_MAX_BATCH_TOKENS (now 16384)" in exc.message and f"{len(batch[longest])} tokens" in exc.message
    assert exc.failed == [longest]  # the rest of the batch was computed: an engine can answer those requests
    want = runner.run(batch)
    for i in range(4):
        if i != longest:
            np.testing.assert_allclose(exc.rows[i], want[i], rtol=0, atol=1e-6)
    assert np.isnan(exc.rows[longest]).all()


def test_rows_that_are_not_finite_fail_their_batch(runner):
    class NaNRows:
        def run(self, batch):
            rows = runner.run(batch)
            rows[1, 3] = np.inf
            return rows

    with pytest.raises(backend.NonFiniteOutput, match=r"1 of 3 output rows are not finite \(rows \[1\].*bfloat16"):
        backend.GuardedRunner(NaNRows()).run(_ids(runner, 3))


def test_a_broken_cuda_context_is_reported_and_other_errors_are_not(runner):
    seen: list[BaseException] = []

    class Raising:
        def __init__(self, exc):
            self.exc = exc

        def run(self, batch):
            raise self.exc

    broken = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    for exc, fatal in ((broken, True), (RuntimeError("CUDA error: device-side assert triggered"), True),
                       (RuntimeError("shape mismatch"), False), (ValueError("bad"), False)):
        seen.clear()
        with pytest.raises(type(exc)):
            backend.GuardedRunner(Raising(exc), on_fatal=seen.append).run(_ids(runner, 1))
        assert seen == ([exc] if fatal else [])
    assert backend.is_oom(torch.OutOfMemoryError("CUDA out of memory")) and not backend.is_fatal(
        torch.OutOfMemoryError("CUDA error: out of memory"))


def test_under_load_an_oom_batch_is_split_so_the_other_requests_succeed(runner):
    """Several requests queue behind a held pass and meet in one batch, which runs out of memory: every one of
    them is answered, with the vectors an unsplit pass gives."""
    fault = OOMFault(runner, max_rows=2)
    guard = backend.GuardedRunner(fault, release=lambda: None)
    engine = Engine("t", guard, max_batch_tokens=16384, batch_wait_ms=0)
    try:
        fault.gate = threading.Event()
        first = engine.submit(_ids(runner, 1))
        assert fault.holding.wait(WAIT)
        texts = _ids(runner, 6, start=1)
        jobs = [engine.submit([t]) for t in texts]  # queued while the first pass is held
        fault.gate.set()
        first.wait(WAIT)
        rows = [job.wait(WAIT) for job in jobs]
    finally:
        engine.stop()
    want = runner.run(texts)
    for i, row in enumerate(rows):
        np.testing.assert_allclose(row[0], want[i], rtol=0, atol=1e-6)
    assert (6, "oom") in fault.batches and guard.splits >= 1


@pytest.fixture
def guarded_app(app):
    """The session app; its EMBED engine's runner gets a fault inside its guard, restored afterwards."""
    guard = app.extensions["embedapi"].registry.models[EMBED].engine.runner
    real = guard.inner
    yield app, guard, real
    guard.inner = real


def test_over_http_an_input_too_large_alone_is_a_503_and_non_finite_rows_a_500(guarded_app):
    app, guard, real = guarded_app
    client = app.test_client()
    guard.inner = OOMFault(real, max_len=40)
    resp = client.post("/v1/embeddings", json={"model": EMBED, "input": "長い文章です。" * 40})
    assert resp.status_code == 503 and resp.headers["Retry-After"]
    error = resp.json["error"]
    assert error["code"] == "out_of_memory" and "EMBEDAPI_MAX_BATCH_TOKENS" in error["message"]
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": "短い"}).status_code == 200

    class NaNRows:
        def run(self, batch):
            return np.full_like(real.run(batch), np.nan)

    guard.inner = NaNRows()
    resp = client.post("/v1/embeddings", json={"model": EMBED, "input": ["a", "b"]})
    assert resp.status_code == 500 and "data" not in resp.json and resp.json["error"]["type"] == "server_error"
    guard.inner = real
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": "元通り"}).status_code == 200


def test_models_that_fail_to_load_call_the_exit_hook(tmp_path):
    bad = tmp_path / "models.toml"
    bad.write_text(f'[[models]]\nid = "x"\nsource = "{tmp_path / "missing"}"\n', encoding="utf-8")
    app = create_app({"models_file": str(bad), "load_models": "off"})
    registry = app.extensions["embedapi"].registry
    reasons: list[str] = []
    registry.exit_hook = reasons.append  # Gunicorn's post_fork makes this exit the worker
    registry.start_loading("cpu", 1).join(WAIT)
    assert registry.state == "failed" and len(reasons) == 1 and reasons[0].startswith("models failed to load")
    assert app.test_client().get("/health").status_code == 503


# -- live Gunicorn -----------------------------------------------------------------------------------
def test_a_broken_cuda_context_makes_the_worker_exit_and_gunicorn_replaces_it(models_file):
    # EMBEDAPI_LOAD_MODELS=sync would make a preloaded master load models and torch: Gunicorn ignores it.
    server = FaultServer(models_file, workers=1, env={"EMBEDAPI_LOAD_MODELS": "sync"}).start()
    try:
        master = server.proc.pid
        assert "libtorch" not in Path(f"/proc/{master}/maps").read_text()
        (victim,) = server.worker_pids()
        status, _, body = call("POST", server.url + "/v1/embeddings", {"model": EMBED, "input": "FAULT_CUDA now"},
                               timeout=WAIT)
        assert status in (500, 503), body
        replacement = poll(lambda: [p for p in server.worker_pids() if p != victim], "a replacement worker")[0]
        server.wait_ready(timeout=WAIT, workers=1)
        server.wait_armed(WAIT)
        status, _, body = call("POST", server.url + "/v1/embeddings", {"model": EMBED, "input": "after"}, timeout=WAIT)
        assert status == 200 and victim not in server.worker_pids() and replacement in server.worker_pids()
        log = server.log()
        assert "CUDA context broken" in log and "exiting in 1s so that Gunicorn starts a replacement" in log
        assert "EMBEDAPI_LOAD_MODELS is ignored under Gunicorn" in log
        assert "libtorch" not in Path(f"/proc/{master}/maps").read_text()  # still none after the replacement
    finally:
        server.stop()
