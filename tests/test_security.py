"""Security: API keys guard every model route, model ids never reach the hub or the disk, errors leak nothing.

tests/test_errors.py already checks the main routes against missing, empty and wrong keys; here every
route the app registers is enumerated, so a route added later cannot slip past the key check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embedapi import create_app

from .conftest import EMBED, RERANK
from .test_errors import CASES, send

OPEN_ROUTES = {"/health", "/ready", "/metrics", "/openapi.json", "/docs"}  # probes and API docs
KEYS = ("k-one", "k-two")
BAD_HEADERS = [None, "", "Bearer", "Bearer ", "Bearer  ", "bearer wrong", "Bearer k-on",
               "Bearer K-ONE", "Token k-one", "Basic azpvbmU=", "Bearer k-one,k-two", "Bearer k-one\tk-two",
               "Bearer " + "k" * 10_000]
BODIES = {"/v1/embeddings": {"model": EMBED, "input": "テスト"}, "/embeddings": {"model": EMBED, "input": "テスト"},
          "/v1/rerank": {"model": RERANK, "query": "q", "documents": ["a"]},
          "/rerank": {"model": RERANK, "query": "q", "documents": ["a"]},
          "/v2/rerank": {"model": RERANK, "query": "q", "documents": ["a"]},
          # TEI's and Cohere's dialects (docs/dialects.md)
          "/embed": {"inputs": "テスト"}, "/": {"inputs": "テスト"}, "/tokenize": {"inputs": "テスト"},
          "/decode": {"ids": [5, 6]}, "/v2/embed": {"model": EMBED, "texts": ["テスト"], "input_type": "search_query"},
          "/v1/embed": {"model": EMBED, "texts": ["テスト"]}}
TEI_ROUTES = {"/embed", "/", "/tokenize", "/decode", "/info"}  # their errors take TEI's shape


def key_error(resp, path: str) -> tuple[str, str]:
    """(code or error_type, message) of a 401, in the route's error shape."""
    body = resp.get_json()
    if path in TEI_ROUTES:
        return body["error_type"], body["error"]
    return body["error"]["code"], body["error"]["message"]


@pytest.fixture(scope="module")
def keyed_app(models_file):
    app = create_app({"models_file": str(models_file), "load_models": "sync", "api_keys": ",".join(KEYS)})
    yield app
    app.extensions["embedapi"].registry.shutdown()


def model_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every registered route except the open ones and static files."""
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.rule in OPEN_ROUTES or rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?[^>]+>", EMBED, rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            routes.append((method, path))
    return routes


def test_every_model_route_is_enumerated(keyed_app):
    routes = set(model_routes(keyed_app))
    assert {("POST", p) for p in BODIES} <= routes
    assert {("GET", "/v1/models"), ("GET", "/models"), ("GET", f"/v1/models/{EMBED}")} <= routes


@pytest.mark.parametrize("header", BAD_HEADERS, ids=lambda h: repr(h)[:30])
def test_every_model_route_refuses_a_missing_empty_or_wrong_key(keyed_app, header):
    client = keyed_app.test_client()
    headers = {} if header is None else {"Authorization": header}
    for method, path in model_routes(keyed_app):
        resp = client.open(path, method=method, json=BODIES.get(path), headers=headers)
        assert resp.status_code == 401, (method, path, resp.get_data(as_text=True))
        code, message = key_error(resp, path)
        assert code in ("invalid_api_key", "Unauthorized") and "k-one" not in message
    for path in ("/health", "/ready"):
        assert client.get(path, headers=headers).status_code == 200


def test_every_model_route_accepts_a_configured_key(keyed_app):
    client = keyed_app.test_client()
    for key in KEYS:
        for method, path in model_routes(keyed_app):
            resp = client.open(path, method=method, json=BODIES.get(path), headers={"Authorization": f"Bearer {key}"})
            assert resp.status_code == 200, (method, path, resp.get_data(as_text=True))


def test_the_key_is_checked_before_the_body_is_looked_at(keyed_app):
    """Without a key, a bad body, an unknown model or a huge body all get the same 401: no oracle."""
    client = keyed_app.test_client()
    for data in (b"{not json", json.dumps({"model": "nope", "input": "x"}).encode(), b"[" * 10_000):
        resp = client.post("/v1/embeddings", data=data)
        assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "invalid_api_key"


def test_a_key_elsewhere_than_the_authorization_header_is_not_accepted(keyed_app):
    client = keyed_app.test_client()
    body = BODIES["/v1/embeddings"]
    for resp in (client.post("/v1/embeddings?api_key=k-one", json=body),
                 client.post("/v1/embeddings", json={**body, "api_key": "k-one"}),
                 client.post("/v1/embeddings", json=body, headers={"X-API-Key": "k-one"}),
                 client.post("/v1/embeddings", json=body, headers={"Api-Key": "k-one"})):
        assert resp.status_code == 401


# -- model ids load nothing ------------------------------------------------------------------
HOSTILE_IDS = ["../../etc/passwd", "/etc/passwd", "..", ".", "~", "~/.ssh/id_rsa", "file:///etc/passwd",
               "https://huggingface.co/cl-nagoya/ruri-v3-310m", "cl-nagoya/ruri-v3-310m",
               "cl-nagoya/ruri-v3-reranker-310m", "sentence-transformers/all-MiniLM-L6-v2", "gpt2",
               "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..\\..\\windows\\win.ini", "test/ruri-v3-tiny/../../x",
               "test/ruri-v3-tiny\x00", EMBED + " ", EMBED.upper(), "a" * 5000]

PROBE = textwrap.dedent("""
    import json, os, socket, sys
    attempts = []
    real_connect = socket.socket.connect
    def connect(self, address):
        attempts.append(repr(address))
        raise OSError("network disabled in this test")
    socket.socket.connect = connect
    socket.create_connection = lambda address, *a, **k: connect(None, address)
    from embedapi import create_app
    app = create_app({"models_file": sys.argv[1], "load_models": "sync"})
    registry = app.extensions["embedapi"].registry
    loaded = sorted(registry.models)
    client = app.test_client()
    answers = []
    for model in json.loads(sys.argv[2]):
        for path, body in (("/v1/embeddings", {"model": model, "input": "x"}),
                           ("/v1/rerank", {"model": model, "query": "q", "documents": ["d"]}),
                           ("/v2/rerank", {"model": model, "query": "q", "documents": ["d"]})):
            resp = client.post(path, json=body)
            answers.append([path, model, resp.status_code, resp.get_json()["error"]])
        resp = client.get("/v1/models/" + model)
        answers.append(["/v1/models/<id>", model, resp.status_code, (resp.get_json() or {}).get("error")])
    print(json.dumps({"attempts": attempts, "answers": answers, "loaded_before": loaded,
                      "loaded_after": sorted(registry.models)}))
""")


def test_hostile_or_unconfigured_model_ids_load_nothing_and_touch_no_network(models_file, tmp_path):
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "EMBEDAPI_LOG_LEVEL": "WARNING"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("SENTENCE_TRANSFORMERS_HOME", None)
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", PROBE, str(models_file), json.dumps(HOSTILE_IDS)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["attempts"] == []
    assert report["loaded_after"] == report["loaded_before"]
    assert len(report["answers"]) == 4 * len(HOSTILE_IDS)
    for path, model, status, err in report["answers"]:
        # ("//" in an id is merged in place, never redirected: /v1/models//etc/passwd looks up "etc/passwd".)
        assert status == 404 and err["code"] == "model_not_found", (path, model, status, err)
        assert "Traceback" not in err["message"] and str(models_file.parent) not in err["message"]
    assert [p for p in hf_home.rglob("*")] == []  # nothing was downloaded, cached or even locked


# -- errors leak nothing -----------------------------------------------------------------------
def leaks(message: str, secrets: list[str]) -> list[str]:
    found = [s for s in secrets if s and s in message]
    for pattern in (r"Traceback", r'File "', r"\.py\b", r"site-packages", r"(?<![\w.])/(?:tmp|work|home|root|usr|etc"
                    r"|var|opt)/", r"\b0x[0-9a-f]{6,}\b", r"<\w+ object at"):
        if re.search(pattern, message):
            found.append(pattern)
    return found


def test_no_error_message_carries_a_trace_or_a_path(client, models_file, model_dirs):
    secrets = [str(models_file.parent), *(str(d) for d in model_dirs.values()), os.getcwd(), sys.prefix]
    messages = []
    for _, method, path, body, headers, *_ in CASES:
        resp = send(client, method, path, body, headers)
        messages.append((path, resp.get_json()["error"]["message"]))
    for body in ({"model": EMBED, "input": "x" * 6000}, {"model": EMBED, "input": [[1, 2]]},
                 {"model": "x/" + "../" * 20, "input": "x"}, {"model": RERANK, "query": "q", "documents": [{}]}):
        resp = client.post("/v1/embeddings" if "input" in body else "/v1/rerank", json=body)
        assert resp.status_code >= 400
        messages.append((body, resp.get_json()["error"]["message"]))
    for where, message in messages:
        assert not leaks(message, secrets), (where, message, leaks(message, secrets))


def test_a_request_id_header_cannot_inject_into_logs_or_responses(client):
    for rid in ("abc\x00X-Evil: 1", "\x1b[31mred", "tab\there", "x" * 1000):
        resp = client.post("/v1/embeddings", json={"model": EMBED, "input": "a"}, headers={"X-Request-ID": rid})
        echoed = resp.headers["X-Request-ID"]
        assert "\n" not in echoed and "\x1b" not in echoed and len(echoed) <= 128


def test_a_model_that_failed_to_load_does_not_leak_its_path(tmp_path):
    missing = tmp_path / "secret-dir" / "model"
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nid = "x/broken"\nsource = "{missing}"\n', encoding="utf-8")
    app = create_app({"models_file": str(config), "load_models": "off"})
    with pytest.raises(Exception):
        app.extensions["embedapi"].registry.load_all("cpu")
    resp = app.test_client().post("/v1/embeddings", json={"model": "x/broken", "input": "a"})
    assert resp.status_code == 503
    message = resp.get_json()["error"]["message"]
    assert not leaks(message, [str(tmp_path)]), message
