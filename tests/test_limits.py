"""Limits hold before work is done: oversized bodies, 100,000 inputs, a 10 MB string, deep nesting.

The live two-worker Gunicorn server runs with the production defaults (32 MiB bodies, 2048 inputs,
1000 documents, 200,000 characters per text); the in-process app below uses the same defaults and
counts forward passes, to show that a refused request never reached the model.
"""

from __future__ import annotations

import json
import select
import socket

import pytest

from embedapi import create_app

from .conftest import EMBED, RERANK
from .server import call

SOCKET_TIMEOUT = 30  # a server that waited for the announced body would trip this, not answer


def raw_request(port: int, head: bytes, body_parts=(), timeout: float = SOCKET_TIMEOUT) -> tuple[int, dict, dict]:
    """Send a hand-made HTTP/1.1 request; stop sending as soon as the server answers; parse its reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        for part in body_parts:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered (and may have stopped reading)
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without a response: {reply!r}"
            reply += chunk
        header, _, rest = reply.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk
            rest += chunk
    return status, headers, json.loads(rest[:length])


def assert_error(status: int, body: dict, expected_status: int, code: str | None = None, param: str | None = None):
    assert status == expected_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    if code:
        assert err["code"] == code
    if param:
        assert err["param"] == param
    assert "Traceback" not in err["message"]
    return err


def still_serves(url: str) -> None:
    status, _, body = call("POST", url + "/v1/embeddings", {"model": EMBED, "input": "まだ動く"})
    assert status == 200 and len(body["data"]) == 1


# -- bodies over the limit ---------------------------------------------------------------------
def test_a_100_mb_content_length_is_refused_without_reading_the_body(gunicorn_server):
    """Only 16 bytes of the announced 100 MB are ever sent: the 413 can only come from the header."""
    head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n" + b'{"input": ["aaa"')
    status, headers, body = raw_request(gunicorn_server.port, head)
    assert_error(status, body, 413, "request_too_large")
    assert headers["content-type"] == "application/json"
    still_serves(gunicorn_server.url)


def test_a_chunked_body_over_the_limit_is_refused(gunicorn_server):
    """No Content-Length (chunked): the server stops reading at the limit and refuses, rather than
    answering from the first 32 MiB (which here would be a valid request followed by spaces)."""
    start = b'{"model": "' + EMBED.encode() + b'", "input": "a"}'
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b" " * (1 << 20)
    parts = [b"%x\r\n%s\r\n" % (len(start), start)]
    parts += [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 40  # 40 MiB > the 32 MiB default
    parts += [b"0\r\n\r\n"]
    status, _, body = raw_request(gunicorn_server.port, head, parts)
    assert_error(status, body, 413, "request_too_large")
    still_serves(gunicorn_server.url)


def test_a_chunked_body_under_the_limit_is_served(gunicorn_server):
    start = b'{"model": "' + EMBED.encode() + b'", "input": "a"}'
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    pad = b" " * 100_000
    parts = [b"%x\r\n%s\r\n" % (len(start), start), b"%x\r\n%s\r\n" % (len(pad), pad), b"0\r\n\r\n"]
    status, _, body = raw_request(gunicorn_server.port, head, parts)
    assert status == 200 and len(body["data"]) == 1


# -- hostile payloads under the body limit ------------------------------------------------------
def nested(depth: int) -> bytes:
    return b"[" * depth + b'"x"' + b"]" * depth


HOSTILE = [
    # (id, path, raw body, status, param, words the message must contain)
    ("100000 inputs", "/v1/embeddings", json.dumps({"model": EMBED, "input": ["a"] * 100_000}).encode(), 400,
     "input", "2048"),
    ("100000 documents", "/v1/rerank",
     json.dumps({"model": RERANK, "query": "q", "documents": ["a"] * 100_000}).encode(), 400, "documents", "1000"),
    ("10 MB string", "/v1/embeddings", json.dumps({"model": EMBED, "input": "あ" * 10_000_000},
                                                  ensure_ascii=False).encode(), 400, "input", "200000"),
    ("10 MB query", "/v1/rerank", json.dumps({"model": RERANK, "query": "a" * 10_000_000, "documents": ["a"]}).encode(),
     400, "query", "200000"),
    ("10 MB document", "/v1/rerank", json.dumps({"model": RERANK, "query": "q", "documents": [{"text": "a" * 10_000_000}]})
     .encode(), 400, "documents", "200000"),
    ("100000-deep array body", "/v1/embeddings", nested(100_000), 400, None, "JSON"),
    ("100000-deep object body", "/v1/rerank", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400, None, "JSON"),
    ("deep input", "/v1/embeddings",
     b'{"model": "' + EMBED.encode() + b'", "input": ' + nested(1000) + b"}", 400, "input", "input"),
    ("deep input under the parser's limit", "/v1/embeddings",
     b'{"model": "' + EMBED.encode() + b'", "input": ' + nested(500) + b"}", 400, "input", "input"),
    ("deep document", "/v1/rerank",
     b'{"model": "' + RERANK.encode() + b'", "query": "q", "documents": [' + b'{"text": ' * 500 + b'"x"'
     + b"}" * 500 + b"]}", 400, "documents", "document"),
    ("100000 unknown fields", "/v1/embeddings",
     json.dumps({"model": EMBED, "input": "a", **{f"f{i}": i for i in range(100_000)}}).encode(), 200, None, ""),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_payloads_are_refused_cleanly_by_the_live_server(gunicorn_server, case):
    _, path, raw, status, param, words = case
    got, headers, body = call("POST", gunicorn_server.url + path, raw=raw, timeout=120)
    assert headers["Content-Type"] == "application/json"
    if status == 200:
        assert got == 200 and len(body["data"]) == 1
    else:
        err = assert_error(got, body, status, param=param)
        assert words in err["message"], err
    still_serves(gunicorn_server.url)


@pytest.fixture(scope="module")
def counted_app(models_file):
    """The production limits, in process, with every forward pass counted (the real runner runs)."""
    app = create_app({"models_file": str(models_file), "load_models": "sync", "api_keys": ()})
    calls = []
    for model in app.extensions["embedapi"].registry.models.values():
        real = model.engine.runner.run

        def run(batch, real=real):
            calls.append(len(batch))
            return real(batch)
        model.engine.runner.run = run
    app.forward_calls = calls
    yield app
    app.extensions["embedapi"].registry.shutdown()


@pytest.mark.parametrize("case", [c for c in HOSTILE if c[3] != 200], ids=[c[0] for c in HOSTILE if c[3] != 200])
def test_hostile_payloads_never_reach_the_model(counted_app, case):
    _, path, raw, status, param, _ = case
    client = counted_app.test_client()
    before = len(counted_app.forward_calls)
    resp = client.post(path, data=raw)
    assert_error(resp.status_code, resp.get_json(), status, param=param)
    assert len(counted_app.forward_calls) == before  # refused before any token reached the model
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": "a"}).status_code == 200
    assert len(counted_app.forward_calls) == before + 1


def test_limits_in_process_match_the_app_settings(client):
    """The session app has small limits (64 inputs, 5000 characters, 256 KiB bodies): each holds."""
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": ["a"] * 65}).status_code == 400
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": "a" * 5001}).status_code == 400
    resp = client.post("/v1/embeddings", data=b'{"input": "' + b"a" * 300_000 + b'"}')
    assert resp.status_code == 413 and resp.get_json()["error"]["code"] == "request_too_large"
