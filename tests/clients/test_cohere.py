"""The `cohere` SDK with its base URL pointed at the live server: rerank scores equal CrossEncoder.predict."""

from __future__ import annotations

import cohere
import numpy as np
import pytest

from .conftest import RERANK

QUERY = "蔵王温泉の泉質は？"
DOCS = ["蔵王温泉は強酸性の硫黄泉です。", "名古屋は愛知県にあります。", "人工知能の進化", "温泉に入ると体が温まります。"]


def expected(ce_model, query: str, docs: list[str]) -> list[tuple[int, float]]:
    """(index, score) pairs as the server must order them: score descending, ties by lower index."""
    scores = np.asarray(ce_model.predict([(query, d) for d in docs]), dtype=np.float64)
    return sorted(enumerate(scores.tolist()), key=lambda p: (-p[1], p[0]))


def check(results, want: list[tuple[int, float]]) -> None:
    assert [r.index for r in results] == [i for i, _ in want]
    np.testing.assert_allclose([r.relevance_score for r in results], [s for _, s in want], atol=1e-5)


def test_client_v2_rerank(live, ce_model):
    co = cohere.ClientV2(base_url=live.url, api_key="sk-no-key", max_retries=0)
    response = co.rerank(model=RERANK, query=QUERY, documents=DOCS)
    check(response.results, expected(ce_model, QUERY, DOCS))
    assert response.id
    assert response.meta.billed_units.search_units == 1 and response.meta.tokens.input_tokens > 0

    top = co.rerank(model=RERANK, query=QUERY, documents=DOCS, top_n=2)
    check(top.results, expected(ce_model, QUERY, DOCS)[:2])


def test_client_v2_max_tokens_per_doc(live, ce_model):
    co = cohere.ClientV2(base_url=live.url, api_key="sk-no-key", max_retries=0)
    response = co.rerank(model=RERANK, query=QUERY, documents=DOCS, max_tokens_per_doc=4)
    assert sorted(r.index for r in response.results) == list(range(len(DOCS)))
    assert response.meta.tokens.input_tokens < co.rerank(model=RERANK, query=QUERY,
                                                         documents=DOCS).meta.tokens.input_tokens


def test_client_v1_rerank_with_documents(live, ce_model):
    co = cohere.Client(base_url=live.url, api_key="sk-no-key", max_retries=0)
    response = co.rerank(model=RERANK, query=QUERY, documents=DOCS, top_n=3, return_documents=True)
    want = expected(ce_model, QUERY, DOCS)[:3]
    check(response.results, want)
    assert [r.document.text for r in response.results] == [DOCS[i] for i, _ in want]


def test_errors_are_the_sdks_typed_errors(live):
    co = cohere.ClientV2(base_url=live.url, api_key="sk-no-key", max_retries=0)
    with pytest.raises(cohere.errors.NotFoundError) as err:
        co.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS)
    assert "rerank-v3.5" in str(err.value.body)
    with pytest.raises(cohere.errors.BadRequestError) as err:
        co.rerank(model="cl-nagoya/ruri-v3-310m", query=QUERY, documents=DOCS)
    assert "embedding" in str(err.value.body)
