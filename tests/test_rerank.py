"""Rerank over HTTP equals CrossEncoder.predict; ordering, top_n, shapes of v1 and v2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .conftest import RERANK

QUERY = "山形県の蔵王温泉にある泉質はなに？"
DOCS = ["蔵王温泉は強酸性の硫黄泉です。", "名古屋は愛知県の県庁所在地です。", "人工知能の進化は速い。",
        "山形市の蔵王温泉はどのような温泉ですか？"]


def post(client, body, path="/v1/rerank"):
    resp = client.post(path, json=body)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def test_scores_equal_crossencoder_predict(client, ce_model):
    body = post(client, {"model": RERANK, "query": QUERY, "documents": DOCS})
    expected = ce_model.predict([(QUERY, d) for d in DOCS])
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], expected, atol=1e-5)
    assert all(0.0 <= s <= 1.0 for s in got.values())


def test_raw_scores_are_the_logits(client, ce_model):
    body = post(client, {"model": RERANK, "query": QUERY, "documents": DOCS, "raw_scores": True})
    expected = ce_model.predict([(QUERY, d) for d in DOCS], activation_fn=torch.nn.Identity())
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], expected, atol=1e-5)


def test_sorted_descending_with_ties_by_lower_index(client):
    docs = [DOCS[0], DOCS[1], DOCS[0], DOCS[1], DOCS[0]]
    body = post(client, {"model": RERANK, "query": QUERY, "documents": docs})
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    keyed = [(-r["relevance_score"], r["index"]) for r in body["results"]]
    assert keyed == sorted(keyed)
    assert body["data"] == body["results"] and body["query"] == QUERY and body["model"] == RERANK


@pytest.mark.parametrize("field,value,count", [("top_n", 2, 2), ("top_k", 3, 3), ("top_n", 99, 4),
                                               ("top_n", None, 4)])
def test_top_n_top_k_alias_and_overflow(client, field, value, count):
    body = post(client, {"model": RERANK, "query": QUERY, "documents": DOCS, field: value})
    assert len(body["results"]) == count


def test_documents_as_text_objects_and_return_documents(client):
    body = post(client, {"model": RERANK, "query": QUERY, "documents": [{"text": d} for d in DOCS],
                         "return_documents": True, "top_n": 2})
    for r in body["results"]:
        assert r["document"] == {"text": DOCS[r["index"]]}
    plain = post(client, {"model": RERANK, "query": QUERY, "documents": DOCS})
    assert all("document" not in r for r in plain["results"])


def test_usage_counts_the_pair_tokens_fed(client, ce_model):
    body = post(client, {"model": RERANK, "query": QUERY, "documents": DOCS})
    tok = ce_model.tokenizer
    expected = sum(len(tok(QUERY, d)["input_ids"]) for d in DOCS)
    assert body["usage"] == {"prompt_tokens": expected, "total_tokens": expected}


def test_max_tokens_per_doc_cuts_each_document(client, ce_model):
    body = post(client, {"model": RERANK, "query": QUERY, "documents": DOCS, "max_tokens_per_doc": 3,
                         "raw_scores": True})
    tok = ce_model.tokenizer
    q = tok(QUERY, add_special_tokens=False)["input_ids"]
    expected_tokens = sum(len(q) + min(3, len(tok(d, add_special_tokens=False)["input_ids"])) + 4 for d in DOCS)
    assert body["usage"]["total_tokens"] == expected_tokens


def test_v2_shape(client, ce_model):
    body = post(client, {"model": RERANK, "query": QUERY, "documents": DOCS, "top_n": 3}, path="/v2/rerank")
    assert set(body) == {"id", "results", "meta"}
    assert len(body["results"]) == 3 and set(body["results"][0]) == {"index", "relevance_score"}
    assert body["meta"]["billed_units"] == {"search_units": 1}
    expected = ce_model.predict([(QUERY, d) for d in DOCS])
    best = int(np.argmax(expected))
    assert body["results"][0]["index"] == best
    assert body["meta"]["tokens"]["input_tokens"] > 0


def test_alias_route_without_v1(client):
    assert post(client, {"model": RERANK, "query": QUERY, "documents": DOCS}, path="/rerank")["results"]


def test_long_pair_cuts_the_document_first(app, ce_model):
    registry = app.extensions["embedapi"].registry
    encoder = registry.models[RERANK].encoder
    max_len = encoder.max_seq_length
    q, d = list(range(10, 20)), list(range(100, 100 + max_len))
    pair = encoder.pair(q, d)
    assert len(pair) == max_len and pair[1:11] == q
    long_q = list(range(10, 10 + max_len))
    pair = encoder.pair(long_q, d)
    budget = max_len - 4
    assert pair.first_len - 3 == budget // 2  # the query is cut only beyond half
    assert len(pair) == max_len
