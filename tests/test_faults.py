"""Faults on live Gunicorn servers: a killed worker, a crashing forward, a stuck forward, vanishing clients.

The only fake is the fault itself: tests/faults/gunicorn_faults.conf.py runs the repository's
gunicorn.conf.py and wraps each engine's real runner so that a batch holding a marker text raises or
waits (see that file). Every expectation below is about order and counts, never about durations.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from itertools import count
from pathlib import Path

import pytest

from .conftest import EMBED, RERANK
from .faults.server import FaultServer
from .server import GunicornServer, call, poll as _poll

E = "/v1/embeddings"
WAIT = 120  # bound of every wait on the server (seconds); reaching it fails the test
QUEUE_TOKENS = 1000


def poll(predicate, what: str, timeout: float = WAIT):
    return _poll(predicate, what, timeout)


def embed_text(url: str, text: str, **headers: str) -> tuple[int, dict, object]:
    return call("POST", url + E, {"model": EMBED, "input": text}, headers=headers, timeout=WAIT)


def assert_server_error(status: int, body: dict) -> None:
    assert status == 500, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
    assert "injected" not in err["message"] and "/secret" not in err["message"] and "Traceback" not in err["message"]


# -- one worker with fault wrappers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def release_file():
    path = Path(tempfile.mkdtemp(prefix="embedapi-faults-")) / "release"
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def faults_server(models_file, release_file):
    server = FaultServer(models_file, workers=1, env={
        "EMBEDAPI_MAX_QUEUE_TOKENS": str(QUEUE_TOKENS), "EMBEDAPI_THREADS": "48",
        "EMBEDAPI_FAULT_SLOW_SECONDS": str(WAIT), "EMBEDAPI_FAULT_RELEASE_FILE": str(release_file)}).start()
    yield server
    release_file.touch()  # never leave an engine held
    server.stop()


class Held:
    """A FAULT_SLOW request holding the engine until `release()`; `started` once its batch is running."""

    def __init__(self, server: FaultServer, release_file: Path, marker: str) -> None:
        self.server, self.release_file, self.marker = server, release_file, marker
        release_file.unlink(missing_ok=True)
        self.before = len(server.batches())
        self.pool = ThreadPoolExecutor(1)
        self.future = self.pool.submit(embed_text, server.url, f"FAULT_SLOW {marker}")
        poll(lambda: any(o == "slow" and any(marker in t for t in texts)
                         for _, _, o, texts in server.batches()[self.before:]), "the slow batch to start")

    def release(self) -> tuple[int, dict, object]:
        self.release_file.touch()
        result = self.future.result(timeout=WAIT)
        self.pool.shutdown()
        self.release_file.unlink(missing_ok=True)
        return result


def test_a_raising_forward_fails_only_its_batch_and_the_worker_keeps_serving(faults_server):
    url = faults_server.url
    pid = faults_server.worker_pids()
    before = len(faults_server.batches())
    texts = [f"req{i:03d}x innocent" for i in range(15)] + ["req999x FAULT_RAISE"]
    start = threading.Barrier(len(texts))

    def one(text: str):
        start.wait(WAIT)
        return text, embed_text(url, text)

    with ThreadPoolExecutor(len(texts)) as pool:
        results = dict(pool.map(one, texts))

    batches = faults_server.batches()[before:]
    raised = {t for _, _, outcome, decoded in batches if outcome == "raise"
              for t in texts if t.split()[0] in " ".join(decoded)}
    assert "req999x FAULT_RAISE" in raised
    for text, (status, _, body) in results.items():
        if text in raised:
            assert_server_error(status, body)
        else:
            assert status == 200, (text, body)
            assert len(body["data"]) == 1
    # Every innocent request was computed in some batch that did not raise.
    assert len(raised) < len(texts)
    # Same worker process, still serving both models.
    assert faults_server.worker_pids() == pid
    assert embed_text(url, "after the crash")[0] == 200
    status, _, body = call("POST", url + "/v1/rerank", {"model": RERANK, "query": "q", "documents": ["a", "b"]})
    assert status == 200 and len(body["results"]) == 2
    assert "injected fault" in faults_server.log()  # the log has the cause (and the trace) the client did not get


def test_a_raising_rerank_forward_fails_that_request_only(faults_server):
    url = faults_server.url
    status, _, body = call("POST", url + "/v1/rerank",
                           {"model": RERANK, "query": "q", "documents": ["ok", "FAULT_RAISE here"]})
    assert_server_error(status, body)
    status, _, body = call("POST", url + "/v1/rerank", {"model": RERANK, "query": "q", "documents": ["ok"]})
    assert status == 200


def test_a_stuck_forward_fills_the_queue_and_later_requests_get_429_with_retry_after(faults_server, release_file):
    url = faults_server.url
    text = "queue test " + "名古屋大学" * 30
    status, _, body = embed_text(url, text)  # every request below sends this same text: same token count
    assert status == 200
    tokens = body["usage"]["total_tokens"]
    # The engine admits a request while the queued tokens stay within the limit (the first always).
    admitted = max(1, QUEUE_TOKENS // tokens)
    assert admitted + 2 < 48  # the held requests must not take every server thread (EMBEDAPI_THREADS)
    n = admitted + 12

    held = Held(faults_server, release_file, "hold-queue")
    pool = ThreadPoolExecutor(n)
    futures = {pool.submit(embed_text, url, text): i for i in range(n)}
    try:
        # With the engine held, exactly the requests beyond the admitted ones come back, all 429 at once.
        refused = []
        for future in as_completed(futures, timeout=WAIT):
            refused.append(future.result())
            if len(refused) == n - admitted:
                break
        for status, headers, body in refused:
            assert status == 429, body
            assert int(headers["Retry-After"]) >= 1
            assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
            assert "busy" in body["error"]["message"]
        assert not held.future.done()  # all of that happened while the forward pass was still stuck
        assert sum(f.done() for f in futures) == n - admitted  # the admitted ones wait in the queue
    finally:
        status, _, _ = held.release()
        done = [f.result(timeout=WAIT) for f in futures]
        pool.shutdown()
    assert status == 200
    assert sorted(s for s, _, _ in done) == [200] * admitted + [429] * (n - admitted)
    assert embed_text(url, "after the queue drained")[0] == 200


def raw_post(port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def access_lines(server, status: int) -> int:
    return len(re.findall(rf"embedapi\.access: POST /v1/embeddings {status} ", server.log()))


def test_a_client_that_disconnects_while_queued_breaks_nothing_and_its_work_is_dropped(faults_server,
                                                                                       release_file):
    url = faults_server.url
    gone_before = access_lines(faults_server, 499)
    held = Held(faults_server, release_file, "hold-gone")
    try:
        sock = raw_post(faults_server.port, b'{"model": "%s", "input": "gonequeued marker"}' % EMBED.encode())
        # Queued behind the held batch (or, if the server reads it only after the client left, refused at
        # its first liveness check): either way the engine must never run it.
        sock.close()
        poll(lambda: access_lines(faults_server, 499) > gone_before, "the server to notice the client left")
    finally:
        status, _, _ = held.release()
    assert status == 200
    assert embed_text(url, "after the client left")[0] == 200
    # The queued work of the departed client never reached the model.
    assert not any("gonequeued" in t for _, _, _, texts in faults_server.batches() for t in texts)


def test_a_client_that_disconnects_during_its_forward_breaks_nothing(faults_server, release_file):
    url = faults_server.url
    release_file.unlink(missing_ok=True)
    before = len(faults_server.batches())
    gone_before = access_lines(faults_server, 499)
    released = faults_server.log().count("FAULTS released")
    sock = raw_post(faults_server.port, b'{"model": "%s", "input": "FAULT_SLOW goneinflight"}' % EMBED.encode())
    poll(lambda: any("goneinflight" in t for _, _, _, texts in faults_server.batches()[before:] for t in texts),
         "the batch to start")
    sock.close()
    poll(lambda: access_lines(faults_server, 499) > gone_before, "the server to notice the client left")
    release_file.touch()
    poll(lambda: faults_server.log().count("FAULTS released") > released, "the batch to finish")
    release_file.unlink(missing_ok=True)
    assert embed_text(url, "after the in-flight client left")[0] == 200
    status, _, body = call("POST", url + "/v1/rerank", {"model": RERANK, "query": "q", "documents": ["a"]})
    assert status == 200


def test_a_client_that_disconnects_mid_body_or_mid_headers_breaks_nothing(faults_server):
    pids = faults_server.worker_pids()
    for head in (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"model\": ",
                 b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Le",
                 b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"a\""):
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", faults_server.port), timeout=WAIT) as sock:
                sock.sendall(head)
    assert embed_text(faults_server.url, "after half requests")[0] == 200
    assert faults_server.worker_pids() == pids


# -- SIGKILL of one of two workers under load ---------------------------------------------------
def test_sigkill_of_a_worker_under_load_costs_at_most_its_in_flight_requests(models_file):
    clients = 8
    server = GunicornServer(models_file, workers=2).start()
    try:
        url = server.url
        seq = count()
        lock = threading.Lock()
        outcomes: list[tuple[int, int, str, object]] = []  # (start seq, end seq, request id, status or error)
        stop = threading.Event()

        def client(c: int) -> None:
            for i in range(100_000):  # bounded; `stop` ends it
                if stop.is_set():
                    return
                rid = f"kill-{c}-{i}"
                started = next(seq)
                try:
                    status, _, body = embed_text(url, f"client {c} request {i}", **{"X-Request-ID": rid})
                    result: object = status if status != 200 or len(body["data"]) == 1 else "bad body"
                except (OSError, http.client.HTTPException) as exc:  # reset, closed, or cut mid-body by the kill
                    result = type(exc).__name__
                with lock:
                    outcomes.append((started, next(seq), rid, result))

        def successes() -> int:
            with lock:
                return sum(1 for o in outcomes if o[3] == 200)

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
        for t in threads:
            t.start()
        try:
            poll(lambda: successes() >= 100, "load to be served")
            victim, survivor = server.worker_pids()
            os.kill(victim, signal.SIGKILL)
            poll(lambda: victim not in server.worker_pids(), "the victim to be gone")
            killed_at = next(seq)
            server.wait_ready(timeout=WAIT, workers=2)  # the master has replaced it and /ready came back
            ready_at = next(seq)
            replacement = (set(server.worker_pids()) - {survivor}).pop()
            served_before = successes()
            poll(lambda: successes() >= served_before + 100, "load after the replacement")
        finally:
            stop.set()
            for t in threads:
                t.join(WAIT)

        assert set(server.worker_pids()) == {survivor, replacement} and victim != replacement
        failed = [o for o in outcomes if o[3] != 200]
        # At most one in-flight request per client, all started before the victim was gone, none an HTTP error.
        assert len(failed) <= clients, failed
        assert all(start < killed_at for start, _, _, _ in failed), failed
        assert all(isinstance(result, str) and result != "bad body" for _, _, _, result in failed), failed

        # Who served what, from the access log: the survivor served throughout, the replacement afterwards.
        served_by = {rid: int(pid) for pid, rid in
                     re.findall(r"\[(\d+)\] embedapi\.access: POST /v1/embeddings 200 .*?rid=(kill-\d+-\d+)",
                                server.log())}
        survivor_window = [o for o in outcomes if o[3] == 200 and killed_at < o[0] and o[1] < ready_at
                           and served_by.get(o[2]) == survivor]
        assert survivor_window, "the surviving worker served nothing while its sibling was being replaced"
        assert any(served_by.get(o[2]) == replacement for o in outcomes if o[3] == 200)
        assert victim in {served_by.get(o[2]) for o in outcomes if o[0] < killed_at}
    finally:
        server.stop()


# -- a worker that is still loading ------------------------------------------------------------
def test_a_request_reaching_a_worker_still_loading_waits_for_the_models_instead_of_a_503(models_file):
    """What a replacement worker does with the connections it accepts before its models are ready."""
    from embedapi import create_app

    app = create_app({"models_file": str(models_file), "load_models": "background"})
    try:
        client = app.test_client()
        assert not app.extensions["embedapi"].registry.ready  # the loader thread has only just started
        resp = client.post(E, json={"model": EMBED, "input": "読み込み中に届いた"})
        assert resp.status_code == 200 and len(resp.get_json()["data"]) == 1
    finally:
        poll(lambda: app.extensions["embedapi"].registry.state in ("ready", "failed"), "loading to end")
        app.extensions["embedapi"].registry.shutdown()
