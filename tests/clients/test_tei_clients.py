"""Clients written for text-embeddings-inference, unchanged, against the live server: huggingface_hub's
InferenceClient, LlamaIndex's TextEmbeddingsInference, Haystack's TEI embedders and ranker."""

from __future__ import annotations

import os

import numpy as np
import pytest

from .conftest import EMBED, float_json

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # Haystack would post usage events otherwise

QUERY = "蔵王温泉の泉質は？"
DOCS = ["蔵王温泉は強酸性の硫黄泉です。", "名古屋は愛知県にあります。", "人工知能の進化", "温泉に入ると体が温まります。"]


@pytest.fixture
def loopback_hub(monkeypatch):
    """huggingface_hub's offline mode (set for the whole suite, against downloads) refuses every request,
    even to a loopback URL; these tests send only to the live server's URL, so it is lifted here."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_huggingface_hub_feature_extraction(live, loopback_hub):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    # A bare URL: the client posts to it (POST /), as TEI answers by the model's type.
    client = InferenceClient(model=live.url)
    got = client.feature_extraction(DOCS, prompt_name="document", truncate=True)
    np.testing.assert_allclose(got, float_json(live.url, {"model": EMBED, "input": DOCS, "input_type": "document"}),
                               atol=1e-6)
    # The /embed URL, one text, TEI's normalize and truncation_direction parameters.
    one = InferenceClient(model=live.url + "/embed").feature_extraction(
        QUERY, prompt_name="query", normalize=False, truncation_direction="left")
    want = float_json(live.url, {"model": EMBED, "input": [QUERY], "input_type": "query", "normalize": False})
    assert one.shape == (1, want.shape[1])
    np.testing.assert_allclose(one, want, atol=1e-5)
    with pytest.raises(HfHubHTTPError) as err:
        client.feature_extraction(QUERY, prompt_name="question")
    assert err.value.response.status_code == 400 and "prompt_name" in str(err.value)


def test_llamaindex_text_embeddings_inference(live):
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    # Its instructions are prepended with a space: "検索クエリ:" + " " + text is Ruri's prefix, not doubled.
    embed = TextEmbeddingsInference(model_name=EMBED, base_url=live.url, query_instruction="検索クエリ:",
                                    text_instruction="検索文書:", embed_batch_size=2)
    query = np.array(embed.get_query_embedding(QUERY), dtype=np.float32)
    np.testing.assert_allclose(query, float_json(live.url, {"model": EMBED, "input": [QUERY],
                                                            "input_type": "query"})[0], atol=1e-6)
    docs = np.array(embed.get_text_embedding_batch(DOCS), dtype=np.float32)
    np.testing.assert_allclose(docs, float_json(live.url, {"model": EMBED, "input": DOCS, "input_type": "document"}),
                               atol=1e-6)


def test_haystack_tei_embedders(live, loopback_hub):
    from haystack import Document
    from haystack_integrations.components.embedders.huggingface_api import (
        HuggingFaceAPIDocumentEmbedder, HuggingFaceAPITextEmbedder)

    text = HuggingFaceAPITextEmbedder(api_type="text_embeddings_inference", api_params={"url": live.url},
                                      prefix="検索クエリ: ", token=None)
    text.warm_up()
    got = np.array(text.run(text=QUERY)["embedding"], dtype=np.float32)
    # Haystack asks for normalize=False by default: the raw mean-pooled vector.
    want = float_json(live.url, {"model": EMBED, "input": [QUERY], "input_type": "query", "normalize": False})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    docs = HuggingFaceAPIDocumentEmbedder(api_type="text_embeddings_inference", api_params={"url": live.url},
                                          prefix="検索文書: ", normalize=True, batch_size=3, token=None,
                                          progress_bar=False)
    docs.warm_up()
    out = docs.run(documents=[Document(content=d) for d in DOCS])["documents"]
    np.testing.assert_allclose(np.array([d.embedding for d in out], dtype=np.float32),
                               float_json(live.url, {"model": EMBED, "input": DOCS, "input_type": "document"}),
                               atol=1e-6)


def test_haystack_tei_ranker(live, ce_model):
    from haystack import Document
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker

    ranker = HuggingFaceTEIRanker(url=live.url, top_k=3, token=None)
    ranked = ranker.run(query=QUERY, documents=[Document(content=d) for d in DOCS])["documents"]
    scores = np.asarray(ce_model.predict([(QUERY, d) for d in DOCS]), dtype=np.float64)
    want = sorted(range(len(DOCS)), key=lambda i: (-scores[i], i))[:3]
    assert [d.content for d in ranked] == [DOCS[i] for i in want]
    np.testing.assert_allclose([d.score for d in ranked], scores[want], atol=1e-5)
