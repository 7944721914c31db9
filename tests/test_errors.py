"""Every bad request gets its documented status and an OpenAI-shaped error; the next one still works."""

from __future__ import annotations

import pytest

from embedapi import create_app

from .conftest import EMBED, EMBED_SHORT, RERANK

E = "/v1/embeddings"
R = "/v1/rerank"
OK_EMBED = {"model": EMBED, "input": "テスト"}
OK_RERANK = {"model": RERANK, "query": "温泉", "documents": ["蔵王温泉", "名古屋"]}


def embed(**changes):
    body = {**OK_EMBED, **changes}
    return {k: v for k, v in body.items() if v is not ...}


def rr(**changes):
    body = {**OK_RERANK, **changes}
    return {k: v for k, v in body.items() if v is not ...}


# (id, method, path, json body or raw bytes, extra headers, status, code, param)
CASES = [
    ("missing input", "POST", E, embed(input=...), {}, 400, None, "input"),
    ("missing model", "POST", E, embed(model=...), {}, 400, None, "model"),
    ("input number", "POST", E, embed(input=3), {}, 400, None, "input"),
    ("input null", "POST", E, embed(input=None), {}, 400, None, "input"),
    ("input object", "POST", E, embed(input={"text": "a"}), {}, 400, None, "input"),
    ("empty string", "POST", E, embed(input=""), {}, 400, None, "input"),
    ("empty array", "POST", E, embed(input=[]), {}, 400, None, "input"),
    ("empty string in array", "POST", E, embed(input=["a", ""]), {}, 400, None, "input"),
    ("mixed array", "POST", E, embed(input=["a", 1]), {}, 400, None, "input"),
    ("nested strings", "POST", E, embed(input=[["a"]]), {}, 400, None, "input"),
    ("token ids", "POST", E, embed(input=[1, 2, 3]), {}, 400, None, "input"),
    ("token id arrays", "POST", E, embed(input=[[1, 2], [3]]), {}, 400, None, "input"),
    ("too many inputs", "POST", E, embed(input=["a"] * 65), {}, 400, None, "input"),
    ("too long string", "POST", E, embed(input="あ" * 5001), {}, 400, None, "input"),
    ("model not string", "POST", E, embed(model=7), {}, 400, None, "model"),
    ("unknown model", "POST", E, embed(model="gpt-4"), {}, 404, "model_not_found", "model"),
    ("path-like model", "POST", E, embed(model="../../etc/passwd"), {}, 404, "model_not_found", "model"),
    ("hub id not configured", "POST", E, embed(model="cl-nagoya/ruri-v3-310m"), {}, 404, "model_not_found",
     "model"),
    ("rerank model to embeddings", "POST", E, embed(model=RERANK), {}, 400, None, "model"),
    ("bad encoding_format", "POST", E, embed(encoding_format="int8"), {}, 400, None, "encoding_format"),
    ("dimensions not offered", "POST", E, embed(dimensions=7), {}, 400, None, "dimensions"),
    ("dimensions zero", "POST", E, embed(dimensions=0), {}, 400, None, "dimensions"),
    ("dimensions string", "POST", E, embed(dimensions="64"), {}, 400, None, "dimensions"),
    ("unknown input_type", "POST", E, embed(input_type="question"), {}, 400, None, "input_type"),
    ("normalize not bool", "POST", E, embed(normalize="maybe"), {}, 400, None, "normalize"),
    ("truncate as a string", "POST", E, embed(truncate="false"), {}, 400, None, "truncate"),
    ("apply_ruri_prefix as a number", "POST", E, embed(apply_ruri_prefix=1), {}, 400, None, "apply_ruri_prefix"),
    ("instruction not string", "POST", E, embed(instruction=5), {}, 400, None, "instruction"),
    ("body is array", "POST", E, [OK_EMBED], {}, 400, None, None),
    ("body is string", "POST", E, "hello", {}, 400, None, None),
    ("not json", "POST", E, b"input=hello&model=x", {"Content-Type": "application/x-www-form-urlencoded"}, 400,
     None, None),
    ("invalid utf-8", "POST", E, b'{"model": "' + EMBED.encode() + b'", "input": "\xff\xfe"}', {}, 400, None,
     None),
    ("lone surrogate", "POST", E, b'{"model": "' + EMBED.encode() + b'", "input": "\\ud800"}', {}, 400, None,
     None),
    ("empty body", "POST", E, b"", {}, 400, None, None),
    ("body too large", "POST", E, embed(input=["あ" * 4000] * 40), {}, 413, "request_too_large", None),
    ("rerank empty query", "POST", R, rr(query=""), {}, 400, None, "query"),
    ("rerank missing query", "POST", R, rr(query=...), {}, 400, None, "query"),
    ("rerank no documents", "POST", R, rr(documents=[]), {}, 400, None, "documents"),
    ("rerank documents string", "POST", R, rr(documents="abc"), {}, 400, None, "documents"),
    ("rerank document number", "POST", R, rr(documents=["a", 3]), {}, 400, None, "documents"),
    ("rerank document object without text", "POST", R, rr(documents=[{"body": "a"}]), {}, 400, None,
     "documents"),
    ("rerank too many documents", "POST", R, rr(documents=["a"] * 33), {}, 400, None, "documents"),
    ("rerank top_n zero", "POST", R, rr(top_n=0), {}, 400, None, "top_n"),
    ("rerank top_n negative", "POST", R, rr(top_n=-1), {}, 400, None, "top_n"),
    ("rerank top_n string", "POST", R, rr(top_n="2"), {}, 400, None, "top_n"),
    ("rerank top_n float", "POST", R, rr(top_n=1.5), {}, 400, None, "top_n"),
    ("rerank top_k zero", "POST", R, rr(top_k=0), {}, 400, None, "top_k"),
    ("rerank raw_scores as a string", "POST", R, rr(raw_scores="yes"), {}, 400, None, "raw_scores"),
    ("rerank embedding model", "POST", R, rr(model=EMBED), {}, 400, None, "model"),
    ("rerank unknown model", "POST", R, rr(model="rerank-english-v3.0"), {}, 404, "model_not_found", "model"),
    ("rerank max_tokens_per_doc zero", "POST", R, rr(max_tokens_per_doc=0), {}, 400, None, "max_tokens_per_doc"),
    ("v2 rerank empty documents", "POST", "/v2/rerank", rr(documents=[]), {}, 400, None, "documents"),
    # Cohere embed (the contract's error shape, which the cohere SDK keeps as the typed error's body)
    ("cohere v2 missing input_type", "POST", "/v2/embed", {"model": EMBED, "texts": ["a"]}, {}, 400, None,
     "input_type"),
    ("cohere v2 image input_type", "POST", "/v2/embed", {"model": EMBED, "texts": ["a"], "input_type": "image"}, {},
     400, None, "input_type"),
    ("cohere v2 texts string", "POST", "/v2/embed", {"model": EMBED, "texts": "a", "input_type": "search_query"}, {},
     400, None, "texts"),
    ("cohere v2 empty texts", "POST", "/v2/embed", {"model": EMBED, "texts": [], "input_type": "search_query"}, {},
     400, None, "texts"),
    ("cohere v2 unknown embedding type", "POST", "/v2/embed",
     {"model": EMBED, "texts": ["a"], "input_type": "search_query", "embedding_types": ["int4"]}, {}, 400, None,
     "embedding_types"),
    ("cohere v2 bad truncate", "POST", "/v2/embed",
     {"model": EMBED, "texts": ["a"], "input_type": "search_query", "truncate": "MIDDLE"}, {}, 400, None, "truncate"),
    ("cohere v2 output_dimension not offered", "POST", "/v2/embed",
     {"model": EMBED, "texts": ["a"], "input_type": "search_query", "output_dimension": 7}, {}, 400, None,
     "output_dimension"),
    ("cohere v2 images", "POST", "/v2/embed",
     {"model": EMBED, "texts": ["a"], "input_type": "search_query", "images": ["data:image/png;base64,AA=="]}, {},
     400, None, "images"),
    ("cohere v2 missing model", "POST", "/v2/embed", {"texts": ["a"], "input_type": "search_query"}, {}, 400, None,
     "model"),
    ("cohere v2 unknown model", "POST", "/v2/embed", {"model": "embed-v4.0", "texts": ["a"],
                                                      "input_type": "search_query"}, {}, 404, "model_not_found",
     "model"),
    ("cohere v2 rerank model", "POST", "/v2/embed", {"model": RERANK, "texts": ["a"], "input_type": "search_query"},
     {}, 400, None, "model"),
    ("cohere v1 too long with NONE", "POST", "/v1/embed",
     {"model": EMBED_SHORT, "texts": ["長い文章です。" * 20], "truncate": "NONE"}, {}, 400, None, "texts"),
    ("cohere v1 empty text", "POST", "/v1/embed", {"texts": ["a", ""]}, {}, 400, None, "texts"),
    ("unknown route", "POST", "/v1/chat/completions", {}, {}, 404, "not_found", None),
    ("unknown get route", "GET", "/nothing/here", None, {}, 404, "not_found", None),
    ("unknown model info", "GET", "/v1/models/nope", None, {}, 404, "model_not_found", "model"),
    ("wrong method on embeddings", "GET", E, None, {}, 405, "method_not_allowed", None),
    ("wrong method on rerank", "PUT", R, OK_RERANK, {}, 405, "method_not_allowed", None),
]


def send(client, method, path, body, headers):
    if isinstance(body, bytes):
        return client.open(path, method=method, data=body, headers=headers)
    if body is None:
        return client.open(path, method=method, headers=headers)
    return client.open(path, method=method, json=body, headers=headers)


def assert_error_shape(resp, status, code=None, param=None):
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    err = resp.get_json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    assert "Traceback" not in err["message"] and "/embedapi/" not in err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    expected_type = "invalid_request_error" if status < 500 and status != 429 else None
    if expected_type:
        assert err["type"] == expected_type
    return err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_documented_error_then_next_request_works(client, case):
    _, method, path, body, headers, status, code, param = case
    assert_error_shape(send(client, method, path, body, headers), status, code, param)
    assert client.post(E, json=OK_EMBED).status_code == 200


def test_the_table_is_large_enough():
    assert len(CASES) >= 30
    assert len(TEI_CASES) >= 20


# TEI's routes answer TEI's error shape, {"error": "...", "error_type": "..."}, which huggingface_hub shows
# and Haystack's ranker reads. (id, method, path, body, status, error_type, a word the message must hold)
TEI_CASES = [
    ("embed missing inputs", "POST", "/embed", {}, 400, "Validation", "inputs"),
    ("embed empty string", "POST", "/embed", {"inputs": ""}, 400, "Validation", "inputs"),
    ("embed empty array", "POST", "/embed", {"inputs": []}, 400, "Validation", "inputs"),
    ("embed number", "POST", "/embed", {"inputs": 3}, 400, "Validation", "inputs"),
    ("embed token ids", "POST", "/embed", {"inputs": [1, 2, 3]}, 400, "Validation", "/tokenize"),
    ("embed unknown prompt_name", "POST", "/embed", {"inputs": "a", "prompt_name": "question"}, 400, "Validation",
     "prompt_name"),
    ("embed bad truncation_direction", "POST", "/embed", {"inputs": "a", "truncation_direction": "middle"}, 400,
     "Validation", "truncation_direction"),
    ("embed normalize string", "POST", "/embed", {"inputs": "a", "normalize": "yes"}, 400, "Validation", "normalize"),
    ("embed dimensions not offered", "POST", "/embed", {"inputs": "a", "dimensions": 7}, 400, "Validation",
     "dimensions"),
    ("embed too long, truncate false", "POST", "/embed",
     {"inputs": "長い文章です。" * 20, "model": EMBED_SHORT, "truncate": False}, 400, "Validation", "truncate"),
    ("embed too many inputs", "POST", "/embed", {"inputs": ["a"] * 65}, 400, "Validation", "inputs"),
    ("embed unknown model", "POST", "/embed", {"inputs": "a", "model": "BAAI/bge-m3"}, 404, "NotFound", "BAAI/bge-m3"),
    ("embed rerank model", "POST", "/embed", {"inputs": "a", "model": RERANK}, 400, "Validation", "rerank"),
    ("embed body array", "POST", "/embed", ["a"], 400, "Validation", "JSON object"),
    ("embed not json", "POST", "/embed", b"inputs=a", 400, "Validation", "JSON"),
    ("rerank empty texts", "POST", "/rerank", {"query": "q", "texts": []}, 400, "Validation", "texts"),
    ("rerank text number", "POST", "/rerank", {"query": "q", "texts": ["a", 3]}, 400, "Validation", "texts"),
    ("rerank missing query", "POST", "/rerank", {"texts": ["a"]}, 400, "Validation", "query"),
    ("rerank return_text string", "POST", "/rerank", {"query": "q", "texts": ["a"], "return_text": "yes"}, 400,
     "Validation", "return_text"),
    ("rerank embedding model", "POST", "/rerank", {"query": "q", "texts": ["a"], "model": EMBED}, 400, "Validation",
     "embedding"),
    ("rerank too many texts", "POST", "/rerank", {"query": "q", "texts": ["a"] * 33}, 400, "Validation", "texts"),
    ("tokenize missing inputs", "POST", "/tokenize", {"add_special_tokens": True}, 400, "Validation", "inputs"),
    ("tokenize add_special_tokens number", "POST", "/tokenize", {"inputs": "a", "add_special_tokens": 1}, 400,
     "Validation", "add_special_tokens"),
    ("decode not ids", "POST", "/decode", {"ids": ["a"]}, 400, "Validation", "ids"),
    ("decode empty", "POST", "/decode", {"ids": []}, 400, "Validation", "ids"),
    ("decode id out of range", "POST", "/decode", {"ids": [1, 10**9]}, 400, "Validation", "1000000000"),
    ("decode negative id", "POST", "/decode", {"ids": [[-1]]}, 400, "Validation", "-1"),
    ("root unknown body", "POST", "/", {"text": "a"}, 400, "Validation", "inputs"),
    ("root rerank body without texts", "POST", "/", {"query": "q"}, 400, "Validation", "texts"),
    ("info unknown model", "GET", "/info?model=nope", None, 404, "NotFound", "nope"),
    ("wrong method on embed", "GET", "/embed", None, 405, None, "POST"),
]


@pytest.mark.parametrize("case", TEI_CASES, ids=[c[0] for c in TEI_CASES])
def test_tei_routes_answer_bad_requests_in_tei_shape(client, case):
    _, method, path, body, status, error_type, word = case
    resp = send(client, method, path, body, {})
    assert resp.status_code == status, resp.get_data(as_text=True)
    payload = resp.get_json()
    if error_type is None:  # routing errors (405) are the app's, before any blueprint: the contract's shape
        assert word in payload["error"]["message"]
        return
    assert set(payload) == {"error", "error_type"} and payload["error_type"] == error_type
    assert isinstance(payload["error"], str) and word in payload["error"] and "Traceback" not in payload["error"]
    assert client.post("/embed", json={"inputs": "テスト"}).status_code == 200


def test_token_ids_error_explains_the_langchain_fix(client):
    err = client.post(E, json=embed(input=[[1, 2, 3]])).get_json()["error"]
    assert "check_embedding_ctx_length=False" in err["message"]


def test_json_without_json_content_type_is_accepted(client):
    import json
    resp = client.post(E, data=json.dumps(OK_EMBED), headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200
    resp = client.post(E, data=json.dumps(OK_EMBED))  # no Content-Type at all
    assert resp.status_code == 200


def test_unknown_fields_are_ignored(client):
    assert client.post(E, json=embed(user="u1", foo={"bar": 1})).status_code == 200


def test_internal_errors_leak_nothing(app, client, monkeypatch):
    engine = app.extensions["embedapi"].registry.models[EMBED].engine

    class Boom:
        def run(self, batch):
            raise RuntimeError("secret /etc/shadow detail")

    monkeypatch.setattr(engine, "runner", Boom())
    resp = client.post(E, json=OK_EMBED)
    err = assert_error_shape(resp, 500)
    assert err["type"] == "server_error" and "secret" not in err["message"]
    monkeypatch.undo()
    assert client.post(E, json=OK_EMBED).status_code == 200


@pytest.fixture(scope="module")
def keyed_app(models_file):
    app = create_app({"models_file": str(models_file), "load_models": "sync", "api_keys": "k-one,k-two"})
    yield app
    app.extensions["embedapi"].registry.shutdown()


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Bearer wrong", "Basic k-one", "k-one",
                                    "Bearer k-one-and-more"])
def test_api_keys_refuse_missing_empty_or_wrong(keyed_app, header):
    client = keyed_app.test_client()
    headers = {} if header is None else {"Authorization": header}
    for path, body in ((E, OK_EMBED), (R, OK_RERANK), ("/v2/rerank", OK_RERANK)):
        assert_error_shape(client.post(path, json=body, headers=headers), 401, "invalid_api_key")
    assert_error_shape(client.get("/v1/models", headers=headers), 401, "invalid_api_key")
    assert client.get("/health", headers=headers).status_code == 200
    assert client.get("/ready", headers=headers).status_code == 200


def test_api_keys_accept_each_configured_key(keyed_app):
    client = keyed_app.test_client()
    for key in ("k-one", "k-two"):
        assert client.post(E, json=OK_EMBED, headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_no_keys_configured_accepts_empty_authorization_header(client):
    assert client.post(E, json=OK_EMBED, headers={"Authorization": ""}).status_code == 200
    assert client.post(E, json=OK_EMBED, headers={"Authorization": "Bearer anything"}).status_code == 200


def test_api_keys_guard_the_dialect_routes_in_their_shapes(keyed_app):
    client = keyed_app.test_client()
    for path, body in (("/embed", {"inputs": "a"}), ("/", {"inputs": "a"}), ("/tokenize", {"inputs": "a"}),
                       ("/decode", {"ids": [1]})):
        resp = client.post(path, json=body, headers={"Authorization": "Bearer wrong"})
        assert resp.status_code == 401 and resp.json["error_type"] == "Unauthorized" and "Bearer" in resp.json["error"]
    assert client.get("/info").status_code == 401
    cohere = {"model": EMBED, "texts": ["a"], "input_type": "search_query"}
    for path in ("/v2/embed", "/v1/embed"):
        assert_error_shape(client.post(path, json=cohere), 401, "invalid_api_key")
        assert client.post(path, json=cohere, headers={"Authorization": "Bearer k-one"}).status_code == 200
    ok = client.post("/embed", json={"inputs": "a"}, headers={"Authorization": "Bearer k-two"})
    assert ok.status_code == 200 and isinstance(ok.json, list)
