"""Operating the server: request ids and log lines (never texts), /v1/models, /ready, /health,
a worker's death (metrics), and graceful shutdown under SIGTERM with requests in flight."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from embedapi import create_app, logs

from .conftest import EMBED, EMBED_ALIAS, EMBED_SHORT, INSTRUCT, RERANK, SHORT_MAX
from .server import GunicornServer, call
from .test_metrics import parse, total

BOUND = 120.0  # seconds: upper bound of every wait below, never a timing assertion
SECRET = "秘密の社外秘テキスト"  # must never reach a log


# -- request ids and log lines -----------------------------------------------------------------------
@pytest.fixture
def captured():
    """Every record of the `embedapi` loggers at DEBUG, as the configured handler would print it."""
    logger = logging.getLogger("embedapi")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    configured = next(h for h in logger.handlers if getattr(h, "_embedapi", False))
    handler.setFormatter(configured.formatter)
    records: list[logging.LogRecord] = []
    handler.addFilter(lambda record: records.append(record) or True)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records, stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_request_id_is_echoed_or_generated(client, captured):
    records, _ = captured
    resp = client.get("/health", headers={"X-Request-ID": "client-id-42"})
    assert resp.headers["X-Request-ID"] == "client-id-42"
    resp = client.post("/v1/embeddings", json={"model": EMBED, "input": "x"}, headers={"X-Request-ID": "req-7"})
    assert resp.status_code == 200 and resp.headers["X-Request-ID"] == "req-7"
    generated = {client.get("/health").headers["X-Request-ID"] for _ in range(3)}
    assert len(generated) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in generated)
    # Errors carry it too, and an unprintable or overlong id is not taken as is.
    assert client.get("/nope", headers={"X-Request-ID": "err-1"}).headers["X-Request-ID"] == "err-1"
    assert re.fullmatch(r"[0-9a-f]{32}", client.get("/health", headers={"X-Request-ID": "a\tb"}).headers["X-Request-ID"])
    assert client.get("/health", headers={"X-Request-ID": "r" * 500}).headers["X-Request-ID"] == "r" * 128
    access = [r for r in records if r.name == "embedapi.access"]
    assert {r.request_id for r in access} >= {"client-id-42", "req-7", "err-1"} | generated
    line = next(r for r in access if r.request_id == "req-7")
    assert (line.method, line.path, line.status, line.model, line.items) == ("POST", "/v1/embeddings", 200, EMBED, 1)
    assert line.tokens > 0 and line.duration_ms >= 0


def test_json_log_format_from_the_environment(models_file, monkeypatch):
    monkeypatch.setenv("EMBEDAPI_LOG_FORMAT", "json")
    logger = logging.getLogger("embedapi")
    handler = next(h for h in logger.handlers if getattr(h, "_embedapi", False))
    stream = io.StringIO()
    old_stream = handler.setStream(stream)
    try:
        app = create_app({"models_file": str(models_file), "load_models": "sync"})
        assert isinstance(handler.formatter, logs.JsonFormatter)
        client = app.test_client()
        resp = client.post("/v1/embeddings", json={"model": EMBED_ALIAS, "input": [SECRET, "二つ目"]},
                           headers={"X-Request-ID": "json-1"})
        assert resp.status_code == 200
        client.post("/v1/rerank", json={"model": RERANK, "query": SECRET, "documents": [SECRET]},
                    headers={"X-Request-ID": "json-2"})
        app.extensions["embedapi"].registry.shutdown()
    finally:
        handler.setStream(old_stream)
        logs.configure("text", "INFO")  # the session's other apps log as text again
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]  # every line is JSON
    access = {line["request_id"]: line for line in lines if line["logger"] == "embedapi.access"}
    line = access["json-1"]
    assert {k: line[k] for k in ("method", "path", "status", "model", "items")} == {
        "method": "POST", "path": "/v1/embeddings", "status": 200, "model": EMBED_ALIAS, "items": 2}
    assert line["tokens"] == resp.json["usage"]["total_tokens"] and isinstance(line["duration_ms"], float)
    assert line["level"] == "INFO" and line["pid"] == os.getpid()
    assert access["json-2"]["items"] == 1
    assert SECRET not in stream.getvalue()


def test_no_request_text_in_logs_even_on_errors(app, client, captured):
    records, stream = captured
    client.post("/v1/embeddings", json={"model": EMBED, "input": [SECRET, SECRET + "2"], "input_type": "query"})
    client.post("/embeddings", json={"model": EMBED_SHORT, "input": SECRET * 20, "truncate": False})  # 400
    client.post("/v1/embeddings", json={"model": RERANK, "input": SECRET})  # wrong kind: 400
    client.post("/v1/rerank", json={"model": RERANK, "query": SECRET, "documents": [SECRET, {"text": SECRET}]})
    client.post("/v2/rerank", json={"model": RERANK, "query": SECRET, "documents": [SECRET], "top_n": 0})  # 400
    client.post("/v1/embeddings", data=f"not json {SECRET}")  # 400
    # A crashing forward pass (fault injection): a 500 whose trace is logged, still without the texts.
    model = app.extensions["embedapi"].registry.models[EMBED]

    class Crash:
        def run(self, batch):
            raise RuntimeError("injected fault")

    real, model.engine.runner = model.engine.runner, Crash()
    try:
        resp = client.post("/v1/embeddings", json={"model": EMBED, "input": SECRET})
    finally:
        model.engine.runner = real
    assert resp.status_code == 500 and SECRET not in resp.get_data(as_text=True)
    text = stream.getvalue()
    assert "injected fault" in text and "Traceback" in text  # the trace is there...
    assert SECRET not in text  # ...the texts are not
    for record in records:
        assert SECRET not in json.dumps(vars(record), default=str, ensure_ascii=False)
    statuses = [r.status for r in records if r.name == "embedapi.access"]
    assert statuses == [200, 400, 400, 200, 400, 400, 500]


# -- /v1/models, /ready, /health ------------------------------------------------------------------------
def test_model_entries_tell_clients_what_they_need(client, st_model):
    data = {m["id"]: m for m in client.get("/v1/models").json["data"]}
    embed = data[EMBED]
    assert {k: embed[k] for k in ("object", "kind", "dimensions", "max_tokens", "prompt_preset", "aliases",
                                  "device", "dtype", "ready", "matryoshka_dimensions")} == {
        "object": "model", "kind": "embedding", "dimensions": st_model.encode(["x"]).shape[1],
        "max_tokens": st_model.max_seq_length, "prompt_preset": "ruri-v3", "aliases": [EMBED_ALIAS],
        "device": "cpu", "dtype": "float32", "ready": True, "matryoshka_dimensions": [32, 16]}
    assert embed["prompts"]["query"] == "検索クエリ: "
    assert data[EMBED_SHORT]["max_tokens"] == SHORT_MAX
    assert data[INSTRUCT]["prompt_preset"] == "none"
    rerank = data[RERANK]
    assert rerank["kind"] == "rerank" and rerank["dimensions"] is None and rerank["prompt_preset"] is None
    assert rerank["device"] == "cpu" and rerank["dtype"] == "float32" and rerank["max_tokens"] > 0
    assert client.get("/models").json == client.get("/v1/models").json
    assert client.get(f"/v1/models/{EMBED_ALIAS}").json == embed  # by alias: the model it names
    missing = client.get("/v1/models/no/such-model")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "model_not_found"


def test_ready_is_503_until_this_process_has_loaded_and_warmed(models_file):
    app = create_app({"models_file": str(models_file), "load_models": "off"})
    client = app.test_client()
    resp = client.get("/ready")
    assert resp.status_code == 503 and resp.json["status"] == "idle" and not any(resp.json["models"].values())
    assert client.get("/health").status_code == 200  # alive, though nothing is loaded
    listing = client.get("/v1/models").json["data"]
    assert all(not m["ready"] and m["dimensions"] is None and m["device"] is None for m in listing)
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": "x"}).json["error"]["code"] == "model_not_ready"
    registry = app.extensions["embedapi"].registry
    try:
        registry.load_all()
        resp = client.get("/ready")
        assert resp.status_code == 200 and resp.json["status"] == "ready" and all(resp.json["models"].values())
        assert all(m["ready"] and m["device"] == "cpu" for m in client.get("/v1/models").json["data"])
    finally:
        registry.shutdown()


def test_health_and_ready_never_touch_a_model(app, client):
    models = app.extensions["embedapi"].registry.models
    calls: list[str] = []

    class Tripwire:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, batch):
            calls.append(self.name)
            raise RuntimeError("a probe ran a forward pass")

    real = {name: m.engine.runner for name, m in models.items()}
    try:
        for name, m in models.items():
            m.engine.runner = Tripwire(name)
        for _ in range(3):
            assert client.get("/health").status_code == 200
            assert client.get("/ready").status_code == 200
            assert client.get("/metrics").status_code == 200
    finally:
        for name, m in models.items():
            m.engine.runner = real[name]
    assert calls == []


# -- a live two-worker Gunicorn with JSON logs -----------------------------------------------------------
@pytest.fixture(scope="module")
def json_server(models_file):
    server = GunicornServer(models_file, workers=2,
                            env={"EMBEDAPI_LOG_FORMAT": "json", "EMBEDAPI_LOG_LEVEL": "DEBUG"}).start()
    yield server
    server.stop()


def test_live_json_logs_carry_the_request_and_never_its_text(json_server):
    url = json_server.url
    for i in range(6):
        status, headers, _ = call("POST", url + "/v1/embeddings", {"model": EMBED, "input": [SECRET, f"{i}"]},
                                  headers={"X-Request-ID": f"live-{i}"})
        assert status == 200 and headers["X-Request-ID"] == f"live-{i}"
    status, headers, _ = call("POST", url + "/v1/rerank", {"model": RERANK, "query": SECRET, "documents": [SECRET]})
    assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])
    generated = headers["X-Request-ID"]
    assert call("POST", url + "/v1/embeddings", {"model": "nope", "input": SECRET},
                headers={"X-Request-ID": "live-404"})[0] == 404
    log = json_server.log()
    assert SECRET not in log
    access = {}
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["logger"] == "embedapi.access":
                access[entry["request_id"]] = entry
    assert {f"live-{i}" for i in range(6)} | {generated, "live-404"} <= set(access)
    entry = access["live-0"]
    assert {"method", "path", "status", "duration_ms", "model", "items", "tokens", "request_id", "pid"} <= set(entry)
    assert (entry["method"], entry["path"], entry["status"], entry["model"], entry["items"]) == (
        "POST", "/v1/embeddings", 200, EMBED, 2)
    assert access[generated]["path"] == "/v1/rerank" and access["live-404"]["status"] == 404
    assert entry["pid"] != json_server.proc.pid  # a worker wrote it, not the master


def test_a_dead_worker_leaves_the_live_gauges_and_keeps_its_counts(json_server, models_file):
    url = json_server.url
    for i in range(4):
        assert call("POST", url + "/v1/embeddings", {"model": EMBED, "input": f"死ぬ前{i}"})[0] == 200
    before = parse(call("GET", url + "/metrics")[2])
    old = set(json_server.worker_pids())
    victim = min(old)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + BOUND
    while victim in json_server.worker_pids() or len(json_server.worker_pids()) < 2:
        assert time.monotonic() < deadline, "the master did not replace the killed worker"
        time.sleep(0.1)
    json_server.wait_ready(BOUND, workers=2)
    live = set(json_server.worker_pids())
    assert victim not in live and len(live) == 2
    after = parse(call("GET", url + "/metrics")[2])
    loaded_pids = {int(lab["pid"]) for name, lab, _ in after if name == "embedapi_models_loaded"}
    assert loaded_pids == live  # child_exit marked the dead worker: its per-worker gauges are gone
    load_pids = {int(lab["pid"]) for name, lab, _ in after if name == "embedapi_model_load_seconds"}
    assert load_pids == live
    # Counters are cumulative: what the dead worker counted is still in the sum.
    for name, labels in (("embedapi_requests_total", {"route": "/v1/embeddings", "status": "200"}),
                         ("embedapi_tokens_total", {"model": EMBED})):
        assert total(after, name, **labels) >= total(before, name, **labels) > 0


# -- graceful shutdown -----------------------------------------------------------------------------------
def _listen_queue(port: int) -> int | None:
    """Connections waiting in the listening socket's accept queue (rx_queue of the LISTEN row)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    return None


def test_sigterm_during_a_burst_lets_every_accepted_request_finish(models_file):
    """40 requests are sent and accepted by the workers; SIGTERM to the master while they run: every one
    is answered 200 (none reset, none refused), then the master exits 0 and the port is closed."""
    server = GunicornServer(models_file, workers=2).start()
    n = 40
    text = "名古屋大学で開発された日本語の埋め込みモデルです。長い文章も扱えます。" * 8
    per_request = 32  # ~6k tokens: enough work that the burst is still running when SIGTERM arrives
    body = json.dumps({"model": EMBED, "input": [text] * per_request}).encode()
    sent = [threading.Event() for _ in range(n)]
    outcome: list[object] = [None] * n

    def one(i: int) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=BOUND)
            conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
            sent[i].set()
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            outcome[i] = resp.status if resp.status != 200 else (200, len(payload["data"]))
            conn.close()
        except Exception as exc:  # a reset or refused connection is the failure this test looks for
            outcome[i] = exc
        finally:
            sent[i].set()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for event in sent:
            assert event.wait(BOUND)
        # Every connection is out of the kernel's accept queue, i.e. a worker has accepted it.
        deadline = time.monotonic() + BOUND
        while _listen_queue(server.port):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        in_flight = sum(o is None for o in outcome)
        print(f"SIGTERM with {in_flight} of {n} requests in flight")
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(BOUND)
        code = server.proc.wait(BOUND)
    finally:
        server.stop()
    assert in_flight > 0, "every request finished before SIGTERM: the test proved nothing"
    assert outcome == [(200, per_request)] * n, [o for o in outcome if o != (200, per_request)]
    assert code == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    log = server.log()
    assert len(re.findall(r"embedapi\.access: POST /v1/embeddings 200", log)) == n
    assert "Traceback" not in log
