"""Dify's "OpenAI-API-compatible" model provider, reproduced request for request with `requests`.

What the plugin sends was read (search tool) in langgenius/dify-official-plugins:
- models/openai_api_compatible/models/text_embedding/text_embedding.py, `_embed_in_batches`: URL
  `endpoint_url.rstrip("/") + "/embeddings"`; headers `{"Content-Type": "application/json",
  "Authorization": f"Bearer {api_key}" if api_key else ""}` (an EMPTY Authorization header when no key
  is set); body `json={"model": endpoint_model_name or model, "input": batch}` with batches of
  `max_chunks` texts, plus `"encoding_format"` only when the credential sets it; it reads
  `data[].embedding` in order and `usage.prompt_tokens or usage.total_tokens`. Query/document prefixes
  from the credentials are joined as f"{prefix} {text}".
- models/openai_api_compatible/provider/openai_api_compatible.yaml: `max_chunks` defaults to "1" (one
  text per request), `encoding_format` to not_set, `query_prefix` / `document_prefix` to "".
- models/openai_api_compatible/tests/test_text_embedding.py: the credential check posts the runtime
  shape `{"model": ..., "input": ["ping"]}`.
- models/openai_api_compatible/models/rerank/rerank.py, `_invoke`: URL `endpoint_url.rstrip("/") +
  "/rerank"`, the same headers, `json={"model", "query", "documents": docs, "top_n": top_n if top_n is
  not None else len(docs)}`; reads `results[].index` and `results[].relevance_score`, sorts by score,
  keeps `top_n`, filters by `score_threshold`; `validate_credentials` sends three English documents
  with top_n=3.
Older plugin releases delegate to the SDK base classes, read in langgenius/dify-plugin-sdks
python/dify_plugin/interfaces/model/openai_compatible/text_embedding.py (URL by
`urljoin(endpoint_url + "/", "embeddings")`, body `data=json.dumps(...)` (ASCII-escaped),
`encoding_format: "float"`, credential check `{"input": "ping", "model": ...}` that needs "model" in
the answer, no Authorization header without a key) and .../rerank.py (URL `yarl.URL(url) / "rerank"`,
`"top_n": top_n` which may be null, `"return_documents": True`, `Authorization: Bearer None` without a
key).
"""

from __future__ import annotations

import json
from urllib.parse import urljoin

import numpy as np
import pytest
import requests
from yarl import URL

from .conftest import API_KEY, EMBED, RERANK, st_encode

TEXTS = ["蔵王温泉は強酸性の硫黄泉です。", "名古屋は愛知県にあります。", "人工知能の進化"]
QUERY = "蔵王温泉の泉質は？"
DOCS = ["温泉に入ると体が温まります。", "蔵王温泉は強酸性の硫黄泉です。", "日本の首都は東京です。", "名古屋の名物"]


# -- the plugin's requests, built as it builds them ----------------------------------------------
def plugin_headers(api_key: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}" if api_key else ""}


def plugin_embed(credentials: dict, model: str, texts: list[str], prefix: str = "") -> tuple[list, int, list]:
    """text_embedding.py `_invoke` + `_embed_in_batches` (standard text path)."""
    if prefix:
        texts = [f"{prefix} {t}" for t in texts]
    endpoint_url = credentials.get("endpoint_url", "").rstrip("/")
    api_key = credentials.get("api_key", "")
    endpoint_model_name = credentials.get("endpoint_model_name", "") or model
    max_chunks = int(credentials.get("max_chunks", 1))
    embeddings, used_tokens, sent = [], 0, []
    for i in range(0, len(texts), max_chunks):
        payload = {"model": endpoint_model_name, "input": texts[i:i + max_chunks]}
        encoding_format = credentials.get("encoding_format")
        if encoding_format and encoding_format != "not_set":
            payload["encoding_format"] = encoding_format
        response = requests.post(f"{endpoint_url}/embeddings", headers=plugin_headers(api_key), json=payload,
                                 timeout=60)
        sent.append(response.request)
        response.raise_for_status()
        result = response.json()
        embeddings += [data["embedding"] for data in result["data"]]
        usage = result.get("usage") or {}
        used_tokens += usage.get("prompt_tokens") or usage.get("total_tokens") or 0
    return embeddings, used_tokens, sent


def plugin_rerank(credentials: dict, model: str, query: str, docs: list[str], top_n: int | None = None,
                  score_threshold: float | None = None) -> list[tuple[int, float]]:
    """rerank.py `_invoke` (text mode)."""
    endpoint_url = credentials.get("endpoint_url", "").rstrip("/")
    api_key = credentials.get("api_key", "")
    endpoint_model_name = credentials.get("endpoint_model_name", "") or model
    payload = {"model": endpoint_model_name, "query": query, "documents": docs,
               "top_n": top_n if top_n is not None else len(docs)}
    response = requests.post(f"{endpoint_url}/rerank", headers=plugin_headers(api_key), json=payload, timeout=60)
    response.raise_for_status()
    docs_out = []
    for item in response.json().get("results", []):
        index, score = item.get("index", 0), item.get("relevance_score", 0.0)
        if index < len(docs):
            docs_out.append((index, score))
    docs_out.sort(key=lambda d: d[1], reverse=True)
    if top_n:
        docs_out = docs_out[:top_n]
    if score_threshold is not None:
        docs_out = [d for d in docs_out if d[1] >= score_threshold]
    return docs_out


def base_urls(server) -> list[str]:
    """What users type into "API endpoint URL": with /v1, with a trailing slash, without /v1."""
    return [server.url + "/v1", server.url + "/v1/", server.url]


def ce_order(ce_model, query: str, docs: list[str]) -> list[tuple[int, float]]:
    scores = np.asarray(ce_model.predict([(query, d) for d in docs]), dtype=np.float64).tolist()
    return sorted(enumerate(scores), key=lambda p: (-p[1], p[0]))


# -- embeddings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", [0, 1, 2], ids=["v1", "v1-slash", "no-v1"])
def test_embeddings_one_text_per_request_with_an_empty_authorization_header(live, st_model, base):
    credentials = {"endpoint_url": base_urls(live)[base], "api_key": "", "max_chunks": "1",
                   "encoding_format": "not_set", "context_size": "8192"}
    vectors, tokens, sent = plugin_embed(credentials, EMBED, TEXTS)
    assert len(sent) == len(TEXTS)  # one request per text
    assert all(r.headers["Authorization"] == "" for r in sent)  # the empty header really went out
    assert {r.url.removeprefix(live.url) for r in sent} == {"/v1/embeddings" if base < 2 else "/embeddings"}
    assert tokens > 0
    np.testing.assert_allclose(np.array(vectors, dtype=np.float32), st_encode(st_model, TEXTS), atol=1e-5)


def test_embeddings_in_batches_with_float_and_the_credential_check(live, st_model):
    credentials = {"endpoint_url": live.url + "/v1", "api_key": "", "max_chunks": "2", "encoding_format": "float"}
    vectors, _, sent = plugin_embed(credentials, EMBED, TEXTS)
    assert len(sent) == 2 and json.loads(sent[0].body)["encoding_format"] == "float"
    np.testing.assert_allclose(np.array(vectors, dtype=np.float32), st_encode(st_model, TEXTS), atol=1e-5)

    # the credential check: the runtime shape with the one text "ping"
    vectors, tokens, sent = plugin_embed({**credentials, "max_chunks": "1", "encoding_format": "not_set"},
                                         EMBED, ["ping"])
    assert json.loads(sent[0].body) == {"model": EMBED, "input": ["ping"]}
    assert len(vectors) == 1 and tokens > 0


def test_query_and_document_prefixes_from_the_dify_credentials(live, st_model):
    # Dify cannot send input_type, but its provider form has "Query prefix" / "Document prefix";
    # with 検索クエリ: / 検索文書: (no trailing space: the plugin inserts one) the vectors are Ruri's.
    credentials = {"endpoint_url": live.url + "/v1", "api_key": "", "max_chunks": "1",
                   "query_prefix": "検索クエリ:", "document_prefix": "検索文書:"}
    docs, _, _ = plugin_embed(credentials, EMBED, TEXTS, prefix=credentials["document_prefix"])
    query, _, _ = plugin_embed(credentials, EMBED, [QUERY], prefix=credentials["query_prefix"])
    np.testing.assert_allclose(np.array(docs, dtype=np.float32),
                               st_encode(st_model, ["検索文書: " + t for t in TEXTS]), atol=1e-5)
    np.testing.assert_allclose(np.array(query, dtype=np.float32),
                               st_encode(st_model, ["検索クエリ: " + QUERY]), atol=1e-5)


def test_embeddings_as_older_plugins_send_them_through_the_sdk_base_class(live, st_model):
    for endpoint_url in base_urls(live):
        url = urljoin(endpoint_url if endpoint_url.endswith("/") else endpoint_url + "/", "embeddings")
        # credential check: a bare string, and the answer must name the model
        response = requests.post(url=url, headers={"Content-Type": "application/json"},
                                 data=json.dumps({"input": "ping", "model": EMBED}), timeout=(10, 300))
        assert response.status_code == 200 and "model" in response.json()
        # invocation: ASCII-escaped JSON body (json.dumps default), encoding_format float
        payload = {"input": TEXTS[:1], "model": EMBED, "encoding_format": "float"}
        response = requests.post(url, headers={"Content-Type": "application/json"}, data=json.dumps(payload),
                                 timeout=(10, 300))
        assert "\\u" in response.request.body  # json.dumps escapes the Japanese text
        response.raise_for_status()
        body = response.json()
        assert body["usage"]["total_tokens"] > 0
        np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]], dtype=np.float32),
                                   st_encode(st_model, TEXTS[:1]), atol=1e-5)


def test_with_api_keys_the_key_works_and_a_missing_key_is_a_clear_401(guarded, st_model):
    vectors, _, _ = plugin_embed({"endpoint_url": guarded.url + "/v1", "api_key": API_KEY}, EMBED, TEXTS[:1])
    np.testing.assert_allclose(np.array(vectors, dtype=np.float32), st_encode(st_model, TEXTS[:1]), atol=1e-5)
    with pytest.raises(requests.HTTPError) as err:
        plugin_embed({"endpoint_url": guarded.url + "/v1", "api_key": ""}, EMBED, TEXTS[:1])
    assert err.value.response.status_code == 401
    error = err.value.response.json()["error"]
    assert error["code"] == "invalid_api_key" and "Authorization" in error["message"]


# -- rerank -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", [0, 1, 2], ids=["v1", "v1-slash", "no-v1"])
def test_rerank_top_n_equal_to_the_document_count(live, ce_model, base):
    credentials = {"endpoint_url": base_urls(live)[base], "api_key": "", "context_size": "8192"}
    got = plugin_rerank(credentials, RERANK, QUERY, DOCS, top_n=len(DOCS))
    want = ce_order(ce_model, QUERY, DOCS)
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
    assert all(0.0 <= s <= 1.0 for _, s in got)  # probabilities: what Dify's score_threshold assumes


def test_rerank_without_top_n_and_with_a_threshold(live, ce_model):
    credentials = {"endpoint_url": live.url + "/v1", "api_key": ""}
    want = ce_order(ce_model, QUERY, DOCS)
    got = plugin_rerank(credentials, RERANK, QUERY, DOCS)  # top_n None -> the plugin sends len(docs)
    assert [i for i, _ in got] == [i for i, _ in want]
    threshold = (want[1][1] + want[2][1]) / 2
    got = plugin_rerank(credentials, RERANK, QUERY, DOCS, top_n=3, score_threshold=threshold)
    assert [i for i, _ in got] == [i for i, _ in want[:2]]


def test_rerank_credential_check(live):
    # rerank.py validate_credentials: three English documents, top_n=3, threshold 0.8 (it only needs a 200)
    credentials = {"endpoint_url": live.url + "/v1", "api_key": ""}
    plugin_rerank(credentials, RERANK, "What is the capital of the United States?", [
        "Carson City is the capital city of the American state of Nevada. At the 2010 United States "
        "Census, Carson City had a population of 55,274.",
        "The Commonwealth of the Northern Mariana Islands is a group of islands in the Pacific Ocean that "
        "are a political division controlled by the United States. Its capital is Saipan.",
        "Washington, D.C., formally the District of Columbia, is the capital city and federal district of "
        "the United States. It is located on the east bank of the Potomac River.",
    ], top_n=3, score_threshold=0.8)


def test_rerank_as_the_sdk_base_class_sends_it_top_n_null(live, ce_model):
    want = ce_order(ce_model, QUERY, DOCS)
    for endpoint_url in base_urls(live):
        headers = {"Authorization": f"Bearer {None}", "Content-Type": "application/json"}  # no key -> "Bearer None"
        data = {"model": RERANK, "query": QUERY, "documents": DOCS, "top_n": None, "return_documents": True}
        response = requests.post(str(URL(endpoint_url) / "rerank"), headers=headers, data=json.dumps(data),
                                 timeout=60)
        response.raise_for_status()
        results = response.json()["results"]
        assert [r["index"] for r in results] == [i for i, _ in want]
        np.testing.assert_allclose([r["relevance_score"] for r in results], [s for _, s in want], atol=1e-5)
        assert [r["document"]["text"] for r in results] == [DOCS[i] for i, _ in want]


# -- Jina-style bodies ------------------------------------------------------------------------------
def test_jina_style_rerank_with_text_objects_and_return_documents(live, ce_model):
    want = ce_order(ce_model, QUERY, DOCS)
    body = {"model": RERANK, "query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 3,
            "return_documents": True}
    response = requests.post(live.url + "/v1/rerank", json=body, headers={"Authorization": "Bearer jina_x"},
                             timeout=60)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["model"] == RERANK and out["usage"]["total_tokens"] > 0
    assert [r["index"] for r in out["results"]] == [i for i, _ in want[:3]]
    np.testing.assert_allclose([r["relevance_score"] for r in out["results"]], [s for _, s in want[:3]],
                               atol=1e-5)
    assert [r["document"] for r in out["results"]] == [{"text": DOCS[i]} for i, _ in want[:3]]

    body["return_documents"] = False
    out = requests.post(live.url + "/rerank", json=body, timeout=60).json()
    assert [r["index"] for r in out["results"]] == [i for i, _ in want[:3]]
    assert all("document" not in r for r in out["results"])
