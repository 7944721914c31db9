"""Embeddings over HTTP equal SentenceTransformer.encode of the right prefixed text."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from .conftest import EMBED, EMBED_ALIAS, EMBED_SHORT, INSTRUCT, SHORT_MAX

TEXTS = ["名古屋大学で開発された日本語モデルについて教えて。", "蔵王温泉の泉質は硫黄泉です。"]
RURI_V3 = {"query": "検索クエリ: ", "document": "検索文書: ", "classification": "トピック: ",
           "clustering": "トピック: ", "sts": "",
           "search_query": "検索クエリ: ", "retrieval.query": "検索クエリ: ", "search_document": "検索文書: ",
           "passage": "検索文書: ", "retrieval.passage": "検索文書: ", "text-matching": "", "separation": "トピック: "}


def post(client, body, path="/v1/embeddings"):
    resp = client.post(path, json=body)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def vectors(body) -> np.ndarray:
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


def reference(st, texts) -> np.ndarray:
    return st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


@pytest.mark.parametrize("input_type", sorted(RURI_V3))
def test_every_input_type_matches_encode_of_prefixed_text(client, st_model, input_type):
    body = post(client, {"model": EMBED, "input": TEXTS, "input_type": input_type})
    expected = reference(st_model, [RURI_V3[input_type] + t for t in TEXTS])
    np.testing.assert_allclose(vectors(body), expected, atol=1e-5)


def test_no_prefix_by_default(client, st_model):
    body = post(client, {"model": EMBED, "input": TEXTS})
    np.testing.assert_allclose(vectors(body), reference(st_model, TEXTS), atol=1e-5)


def test_apply_ruri_prefix_string_is_query_array_is_document(client, st_model):
    one = post(client, {"model": EMBED, "input": TEXTS[0], "apply_ruri_prefix": True})
    np.testing.assert_allclose(vectors(one), reference(st_model, ["検索クエリ: " + TEXTS[0]]), atol=1e-5)
    many = post(client, {"model": EMBED, "input": TEXTS, "apply_ruri_prefix": True})
    np.testing.assert_allclose(vectors(many), reference(st_model, ["検索文書: " + t for t in TEXTS]), atol=1e-5)


def test_precedence_instruction_over_input_type_over_apply_ruri_prefix(client, st_model):
    body = post(client, {"model": EMBED, "input": TEXTS[0], "input_type": "document", "apply_ruri_prefix": True})
    np.testing.assert_allclose(vectors(body), reference(st_model, ["検索文書: " + TEXTS[0]]), atol=1e-5)
    body = post(client, {"model": EMBED, "input": TEXTS[0], "instruction": "関連する文書を探す: ",
                         "input_type": "document"})
    np.testing.assert_allclose(vectors(body), reference(st_model, ["関連する文書を探す: " + TEXTS[0]]), atol=1e-5)


def test_instruction_goes_through_the_models_template(client, st_model):
    body = post(client, {"model": INSTRUCT, "input": TEXTS[0], "instruction": "文書を検索する"})
    expected = reference(st_model, ["Instruct: 文書を検索する\nQuery: " + TEXTS[0]])
    np.testing.assert_allclose(vectors(body), expected, atol=1e-5)


@pytest.mark.parametrize("given", ["検索クエリ: ", "検索クエリ：", "検索クエリ:"])
def test_text_already_carrying_the_prefix_is_not_prefixed_again(client, st_model, given):
    text = given + TEXTS[0]
    body = post(client, {"model": EMBED, "input": [text], "input_type": "query"})
    np.testing.assert_allclose(vectors(body), reference(st_model, [text]), atol=1e-5)


def test_usage_counts_tokens_fed_with_special_tokens(client, st_model):
    body = post(client, {"model": EMBED, "input": TEXTS, "input_type": "query"})
    tok = st_model.tokenizer
    expected = sum(len(tok("検索クエリ: " + t)["input_ids"]) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": expected, "total_tokens": expected}


def test_response_shape_and_order(client):
    body = post(client, {"model": EMBED, "input": ["a", "b", "c"]})
    assert body["object"] == "list" and body["model"] == EMBED
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    np.testing.assert_allclose(np.linalg.norm(vectors(body), axis=1), 1.0, atol=1e-5)


def test_alias_and_echoed_model_name(client, st_model):
    body = post(client, {"model": EMBED_ALIAS, "input": TEXTS[0]})
    assert body["model"] == EMBED_ALIAS
    np.testing.assert_allclose(vectors(body), reference(st_model, [TEXTS[0]]), atol=1e-5)


def test_base64_decodes_to_the_float_response(client):
    floats = post(client, {"model": EMBED, "input": TEXTS})
    b64 = post(client, {"model": EMBED, "input": TEXTS, "encoding_format": "base64"})
    for f, b in zip(floats["data"], b64["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(f["embedding"], dtype=np.float32))


def test_normalize_false_gives_the_raw_pooled_vector(client, st_model):
    body = post(client, {"model": EMBED, "input": TEXTS, "normalize": False})
    raw = st_model.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(vectors(body), raw, atol=1e-4, rtol=1e-5)


def test_dimensions_full_and_matryoshka(client, st_model):
    full = reference(st_model, TEXTS)
    same = post(client, {"model": EMBED, "input": TEXTS, "dimensions": full.shape[1]})
    np.testing.assert_allclose(vectors(same), full, atol=1e-5)
    cut = post(client, {"model": EMBED, "input": TEXTS, "dimensions": 16})
    raw = st_model.encode(TEXTS, convert_to_numpy=True)[:, :16]
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors(cut), expected, atol=1e-5)


def test_truncation_keeps_the_prefix_and_feeds_exactly_the_kept_tokens(client, st_short):
    tok = st_short.tokenizer
    text = "人工知能の研究は名古屋大学で盛んに行われており、日本語の検索や文書の分類に役立っています。" * 3
    body = post(client, {"model": EMBED_SHORT, "input": [text], "input_type": "query"})
    bare = tok("検索クエリ: " + text, add_special_tokens=False)["input_ids"]
    prefix_ids = tok("検索クエリ: ", add_special_tokens=False)["input_ids"]
    kept = bare[: SHORT_MAX - 2]
    assert kept[: len(prefix_ids)] == prefix_ids
    assert body["usage"]["total_tokens"] == SHORT_MAX
    ids_fed = [1, *kept, 2]
    assert len(ids_fed) == SHORT_MAX
    # The reference: sentence-transformers' own modules on exactly the kept ids (no decode/re-encode).
    with torch.inference_mode():
        out = st_short.forward({"input_ids": torch.tensor([ids_fed]),
                                "attention_mask": torch.ones(1, len(ids_fed), dtype=torch.long)})
    expected = torch.nn.functional.normalize(out["sentence_embedding"], dim=-1).numpy()
    np.testing.assert_allclose(vectors(body), expected, atol=1e-5)
    # and the tail was really cut: the whole text gives another vector
    whole = st_short.encode(["検索クエリ: " + text], normalize_embeddings=True)
    assert np.abs(whole - expected).max() < 1e-5  # ST truncates the same way at max_seq_length


def test_truncate_false_refuses_an_over_long_input(client):
    text = "人工知能の研究は名古屋大学で盛んに行われています。" * 5
    resp = client.post("/v1/embeddings", json={"model": EMBED_SHORT, "input": text, "truncate": False})
    assert resp.status_code == 400
    err = resp.get_json()["error"]
    assert err["param"] == "input" and str(SHORT_MAX) in err["message"]


def test_the_alias_route_without_v1(client):
    assert post(client, {"model": EMBED, "input": "ping"}, path="/embeddings")["data"]
