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


# -- embed --------------------------------------------------------------------------------------------
EMBED_TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
INPUT_TYPES = {"search_query": "query", "search_document": "document", "classification": "classification",
               "clustering": "clustering"}


@pytest.mark.parametrize("input_type", list(INPUT_TYPES))
def test_client_v2_embed_every_input_and_embedding_type(live, input_type):
    import base64

    from .conftest import EMBED, float_json

    co = cohere.ClientV2(base_url=live.url, api_key="sk-no-key", max_retries=0)
    response = co.embed(model=EMBED, texts=DOCS, input_type=input_type, embedding_types=EMBED_TYPES)
    want = float_json(live.url, {"model": EMBED, "input": DOCS, "input_type": INPUT_TYPES[input_type]})
    e = response.embeddings
    floats = np.array(e.float_, dtype=np.float32)
    np.testing.assert_allclose(floats, want, atol=1e-6)
    np.testing.assert_allclose(np.stack([np.frombuffer(base64.b64decode(s), "<f4") for s in e.base64]), want,
                               atol=1e-6)
    int8 = np.array(e.int8, dtype=np.float64)
    assert int8.min() >= -127 and int8.max() <= 127
    assert ((int8 * floats).sum(1) / np.linalg.norm(int8, axis=1)).min() >= 0.99  # floats are unit vectors
    np.testing.assert_array_equal(np.array(e.uint8), int8 + 128)
    np.testing.assert_array_equal(np.array(e.ubinary), np.packbits(floats > 0, axis=-1))
    np.testing.assert_array_equal(np.array(e.binary), np.packbits(floats > 0, axis=-1).astype(int) - 128)
    assert response.texts == DOCS and response.meta.billed_units.input_tokens > 0


def test_client_v2_embed_output_dimension_and_errors(live):
    from .conftest import EMBED

    co = cohere.ClientV2(base_url=live.url, api_key="sk-no-key", max_retries=0)
    full = co.embed(model=EMBED, texts=[QUERY], input_type="search_query", embedding_types=["float"])
    assert len(full.embeddings.float_[0]) > 8
    with pytest.raises(cohere.errors.BadRequestError) as err:
        co.embed(model=EMBED, texts=[QUERY], input_type="search_query", embedding_types=["float"], output_dimension=7)
    assert "output_dimension" in str(err.value.body)
    with pytest.raises(cohere.errors.NotFoundError):
        co.embed(model="embed-v4.0", texts=[QUERY], input_type="search_query", embedding_types=["float"])
    with pytest.raises(cohere.errors.BadRequestError) as err:
        co.embed(model=EMBED, texts=[QUERY], input_type="image", embedding_types=["float"])
    assert "input_type" in str(err.value.body)


def test_client_v1_embed(live):
    from .conftest import EMBED, float_json

    co = cohere.Client(base_url=live.url, api_key="sk-no-key", max_retries=0)
    floats = co.embed(model=EMBED, texts=DOCS, input_type="search_document")
    assert floats.response_type == "embeddings_floats"
    want = float_json(live.url, {"model": EMBED, "input": DOCS, "input_type": "document"})
    np.testing.assert_allclose(np.array(floats.embeddings), want, atol=1e-6)
    by_type = co.embed(model=EMBED, texts=DOCS, input_type="search_document", embedding_types=["float", "int8"])
    assert by_type.response_type == "embeddings_by_type"
    np.testing.assert_allclose(np.array(by_type.embeddings.float_), want, atol=1e-6)
    assert len(by_type.embeddings.int8) == len(DOCS)
