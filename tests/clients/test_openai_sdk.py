"""The official `openai` SDK against the live server: vectors, base64 decoding, typed errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from openai import OpenAI

from .conftest import API_KEY, EMBED, EMBED_30M, RERANK, float_json, st_encode

TEXTS = ["名古屋大学で開発されたモデルについて教えて。", "蔵王温泉は強酸性の硫黄泉です。", "日本の首都は東京です。"]


@pytest.fixture(scope="module")
def client(live) -> OpenAI:
    # exactly the README's construction; no retries so that an error surfaces as it came
    return OpenAI(base_url=live.url + "/v1", api_key="sk-no-key", max_retries=0)


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_default_encoding_is_base64_and_the_sdk_decodes_it(client, live, st_model):
    # No encoding_format: the SDK asks for base64 and decodes it into float lists itself.
    raw = client.embeddings.with_raw_response.create(model=EMBED, input=TEXTS)
    sent = raw.http_request.read()
    assert b'"encoding_format":"base64"' in sent.replace(b" ", b"")
    assert isinstance(raw.http_response.json()["data"][0]["embedding"], str)  # base64 on the wire
    response = raw.parse()
    assert response.model == EMBED and response.object == "list"
    got = vectors(response)
    assert got.shape == (3, st_model.get_embedding_dimension())
    np.testing.assert_array_equal(got, float_json(live.url, {"model": EMBED, "input": TEXTS}))
    np.testing.assert_allclose(got, st_encode(st_model, TEXTS), atol=1e-5)
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0


def test_float_encoding(client, live):
    response = client.embeddings.create(model=EMBED, input=TEXTS[0], encoding_format="float")
    assert len(response.data) == 1
    np.testing.assert_array_equal(vectors(response), float_json(live.url, {"model": EMBED, "input": TEXTS[0]}))


def test_dimensions_equal_to_the_full_size(client, live, st_model):
    full = st_model.get_embedding_dimension()
    response = client.embeddings.create(model=EMBED, input=TEXTS, dimensions=full)
    got = vectors(response)
    assert got.shape == (3, full)
    np.testing.assert_array_equal(got, float_json(live.url, {"model": EMBED, "input": TEXTS}))


def test_a_list_of_100_texts_keeps_its_order(client, live, st_model):
    texts = [f"{i}番目の文書です。" + "日本語" * (i % 7) for i in range(100)]
    got = vectors(client.embeddings.create(model=EMBED, input=texts))
    assert got.shape[0] == 100
    np.testing.assert_array_equal(got, float_json(live.url, {"model": EMBED, "input": texts}))
    np.testing.assert_allclose(got, st_encode(st_model, texts), atol=1e-5)


def test_input_type_query_through_extra_body(client, live, st_model):
    # the seed's / README's example
    text = "名古屋大学で開発されたモデルについて教えて。"
    response = client.embeddings.create(model=EMBED, input=text, extra_body={"input_type": "query"})
    got = vectors(response)
    np.testing.assert_array_equal(got, float_json(live.url, {"model": EMBED, "input": text, "input_type": "query"}))
    np.testing.assert_allclose(got, st_encode(st_model, ["検索クエリ: " + text]), atol=1e-5)
    assert not np.allclose(got, st_encode(st_model, [text]), atol=1e-3)  # the prefix really was applied


def test_the_model_name_routes_to_that_model(client, st_short):
    got = vectors(client.embeddings.create(model=EMBED_30M, input=TEXTS))
    np.testing.assert_allclose(got, st_encode(st_short, TEXTS), atol=1e-5)


def test_async_client_concurrent_requests_equal_the_sync_ones(live, client):
    import asyncio

    texts = [f"非同期{i}の文です。" for i in range(16)]

    async def burst():
        aclient = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="sk-no-key", max_retries=0)
        async with aclient:
            return await asyncio.gather(*[aclient.embeddings.create(model=EMBED, input=t) for t in texts])

    got = np.concatenate([vectors(r) for r in asyncio.run(burst())])
    np.testing.assert_allclose(got, vectors(client.embeddings.create(model=EMBED, input=texts)), atol=1e-6)


def test_models_list_and_retrieve_a_name_with_a_slash(client, st_model):
    assert {m.id for m in client.models.list()} == {EMBED, EMBED_30M, RERANK}
    model = client.models.retrieve(EMBED)  # the SDK escapes the "/" of the id in the path
    assert model.id == EMBED and model.model_extra["kind"] == "embedding"
    assert model.model_extra["dimensions"] == st_model.get_embedding_dimension()


def test_bad_request_error_carries_the_server_message(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMBED, input="テキスト", extra_body={"input_type": "questions"})
    assert err.value.status_code == 400
    assert err.value.type == "invalid_request_error" and err.value.param == "input_type"
    assert "input_type" in err.value.message and "query" in err.value.message  # names the accepted values

    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=RERANK, input="テキスト")
    assert "rerank" in err.value.message and err.value.param == "model"

    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMBED, input="")
    assert err.value.param == "input"

    with pytest.raises(openai.BadRequestError) as err:  # no matryoshka_dimensions configured
        client.embeddings.create(model=EMBED, input="テキスト", dimensions=8)
    assert "dimensions" in err.value.message and err.value.param == "dimensions"


def test_not_found_error_for_an_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-3-large", input="テキスト")
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    assert "text-embedding-3-large" in err.value.message and EMBED in err.value.message


def test_authentication_error_without_the_key_and_success_with_it(guarded, st_model):
    wrong = OpenAI(base_url=guarded.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.embeddings.create(model=EMBED, input="テキスト")
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert err.value.message  # the server's explanation, not an empty body

    right = OpenAI(base_url=guarded.url + "/v1", api_key=API_KEY, max_retries=0)
    got = vectors(right.embeddings.create(model=EMBED, input="テキスト"))
    np.testing.assert_allclose(got, st_encode(st_model, ["テキスト"]), atol=1e-5)


def test_rate_limit_error_when_the_queue_is_full(guarded):
    """The guarded server's forward pass sleeps 1 s (injected) and its queue holds 1 token: of a burst
    of concurrent requests, one runs, one waits, and the others are refused with 429 + Retry-After."""
    client = OpenAI(base_url=guarded.url + "/v1", api_key=API_KEY, max_retries=0)

    def one(i: int):
        try:
            return client.embeddings.create(model=EMBED, input=f"混雑テスト{i}")
        except openai.RateLimitError as exc:
            return exc

    refused: list[openai.RateLimitError] = []
    for _ in range(5):  # bounded: a burst almost always overflows at once
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, range(8)))
        refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
        assert all(isinstance(o, openai.RateLimitError) or len(o.data) == 1 for o in outcomes)
        assert len(refused) < len(outcomes)  # the queue still serves
        if refused:
            break
    assert refused, "no burst overflowed the 1-token queue"
    err = refused[0]
    assert err.status_code == 429 and err.type == "rate_limit_error" and err.code == "queue_full"
    assert "busy" in err.message and "retry" in err.message
    assert err.response.headers.get("retry-after") == "1"
