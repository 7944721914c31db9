"""`llama-index-embeddings-openai-like` OpenAILikeEmbedding against the live server."""

from __future__ import annotations

import numpy as np
from llama_index.embeddings.openai_like import OpenAILikeEmbedding

from .conftest import EMBED, float_json, st_encode

TEXT = "蔵王温泉は強酸性の硫黄泉です。"
QUERY = "蔵王温泉の泉質は？"


def test_text_and_query_embeddings(live, st_model):
    emb = OpenAILikeEmbedding(model_name=EMBED, api_base=live.url + "/v1", api_key="sk-no-key", max_retries=0)
    text = np.array(emb.get_text_embedding(TEXT), dtype=np.float32)
    query = np.array(emb.get_query_embedding(QUERY), dtype=np.float32)
    np.testing.assert_allclose(text, st_encode(st_model, [TEXT])[0], atol=1e-5)
    np.testing.assert_allclose(query, st_encode(st_model, [QUERY])[0], atol=1e-5)
    np.testing.assert_allclose(text, float_json(live.url, {"model": EMBED, "input": [TEXT]})[0], atol=1e-6)

    batch = np.array(emb.get_text_embedding_batch([TEXT, QUERY, "日本の首都"]), dtype=np.float32)
    np.testing.assert_allclose(batch, st_encode(st_model, [TEXT, QUERY, "日本の首都"]), atol=1e-5)


def test_ruri_prefixes_through_additional_kwargs(live, st_model):
    # separate query / document instances, each asking for its Ruri prefix in the request body
    queries = OpenAILikeEmbedding(model_name=EMBED, api_base=live.url + "/v1", api_key="sk-no-key", max_retries=0,
                                  additional_kwargs={"extra_body": {"input_type": "query"}})
    docs = OpenAILikeEmbedding(model_name=EMBED, api_base=live.url + "/v1", api_key="sk-no-key", max_retries=0,
                               additional_kwargs={"extra_body": {"input_type": "document"}})
    np.testing.assert_allclose(np.array(queries.get_query_embedding(QUERY), dtype=np.float32),
                               st_encode(st_model, ["検索クエリ: " + QUERY])[0], atol=1e-5)
    np.testing.assert_allclose(np.array(docs.get_text_embedding(TEXT), dtype=np.float32),
                               st_encode(st_model, ["検索文書: " + TEXT])[0], atol=1e-5)
