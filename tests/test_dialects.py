"""TEI and Cohere dialects ride the OpenAI route's service path: same vectors, same tokens, same scores;
quantized types are fixed functions of the float vector (in process, with the real tiny models)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from embedapi import quantize

from .conftest import EMBED, EMBED_SHORT, RERANK, SHORT_MAX

TEXTS = ["蔵王温泉は強酸性の硫黄泉です。", "名古屋は愛知県の県庁所在地です。", "機械学習の基礎を学ぶ"]
# A fixed set for the int8 check, none of them calibration texts.
FIXED = ["今日の夕飯は何にしよう", "東京タワーの高さは333メートル", "犬の散歩に行ってきます", "日本の四季は美しい",
         "新しいスマートフォンが発売された", "量子力学入門", "会議は午後三時からです", "温泉旅館の予約を取りたい",
         "この本は三回読みました", "雨の日は家で映画を見る", "Pythonの型ヒントについて", "富士山に登ったことがある"]
COHERE_TYPES = {"search_query": "query", "search_document": "document", "classification": "classification",
                "clustering": "clustering"}


def openai(client, texts, **extra) -> tuple[np.ndarray, int]:
    resp = client.post("/v1/embeddings", json={"model": EMBED, "input": texts, **extra})
    assert resp.status_code == 200, resp.json
    return np.array([d["embedding"] for d in resp.json["data"]], dtype=np.float32), resp.json["usage"]["total_tokens"]


def ok(client, path, body):
    resp = client.post(path, json=body)
    assert resp.status_code == 200, resp.json
    return resp.json


@pytest.mark.parametrize("input_type", [None, "query", "document", "classification", "clustering", "sts"])
def test_tei_embed_equals_openai_route(client, input_type):
    want, _ = openai(client, TEXTS, input_type=input_type)
    got = np.array(ok(client, "/embed", {"inputs": TEXTS, "prompt_name": input_type}), dtype=np.float32)
    np.testing.assert_allclose(got, want, atol=1e-6)
    one = np.array(ok(client, "/embed", {"inputs": TEXTS[0], "prompt_name": input_type, "model": EMBED}))
    np.testing.assert_allclose(one[0], want[0], atol=1e-6)


def test_tei_embed_options_are_the_openai_options(client):
    want, _ = openai(client, TEXTS, input_type="query", normalize=False, dimensions=32)
    got = np.array(ok(client, "/embed", {"inputs": TEXTS, "prompt_name": "search_query", "normalize": False,
                                         "dimensions": 32}))
    np.testing.assert_allclose(got, want, atol=1e-6)
    root = np.array(ok(client, "/", {"inputs": TEXTS, "prompt_name": "query", "normalize": False, "dimensions": 32}))
    np.testing.assert_allclose(root, want, atol=1e-6)


@pytest.mark.parametrize("input_type", list(COHERE_TYPES))
def test_cohere_embed_equals_openai_route(client, input_type):
    want, tokens = openai(client, TEXTS, input_type=COHERE_TYPES[input_type])
    v2 = ok(client, "/v2/embed", {"model": EMBED, "texts": TEXTS, "input_type": input_type,
                                  "embedding_types": ["float", "base64"]})
    np.testing.assert_allclose(np.array(v2["embeddings"]["float"]), want, atol=1e-6)
    decoded = np.stack([np.frombuffer(base64.b64decode(s), dtype="<f4") for s in v2["embeddings"]["base64"]])
    np.testing.assert_allclose(decoded, want, atol=1e-6)
    assert v2["meta"]["billed_units"]["input_tokens"] == tokens and v2["texts"] == TEXTS
    v1 = ok(client, "/v1/embed", {"model": EMBED, "texts": TEXTS, "input_type": input_type})
    assert v1["response_type"] == "embeddings_floats"
    np.testing.assert_allclose(np.array(v1["embeddings"]), want, atol=1e-6)


def test_cohere_output_dimension_and_truncate(client):
    want, _ = openai(client, TEXTS, input_type="document", dimensions=16)
    got = ok(client, "/v2/embed", {"model": EMBED, "texts": TEXTS, "input_type": "search_document",
                                   "output_dimension": 16})
    np.testing.assert_allclose(np.array(got["embeddings"]["float"]), want, atol=1e-6)
    long = "長い文章です。" * 20
    resp = client.post("/v2/embed", json={"model": EMBED_SHORT, "texts": [long], "input_type": "search_query",
                                          "truncate": "NONE"})
    assert resp.status_code == 400 and "truncate" in resp.json["error"]["message"]
    end = ok(client, "/v2/embed", {"model": EMBED_SHORT, "texts": [long], "input_type": "search_query"})
    assert end["meta"]["billed_units"]["input_tokens"] == SHORT_MAX
    capped = ok(client, "/v2/embed", {"model": EMBED, "texts": [long], "input_type": "search_query", "max_tokens": 10})
    assert capped["meta"]["billed_units"]["input_tokens"] == 10


@pytest.mark.parametrize("prompt_name", [None, "query", "document"])
def test_tokenize_is_what_the_embeddings_route_feeds(client, st_model, prompt_name):
    texts = [*TEXTS, "長い文章です。" * 30]
    _, usage = openai(client, texts, input_type=prompt_name)
    lists = ok(client, "/tokenize", {"inputs": texts, "prompt_name": prompt_name})
    assert sum(len(t) for t in lists) == usage
    prefix = {None: "", "query": "検索クエリ: ", "document": "検索文書: "}[prompt_name]
    for text, tokens in zip(texts, lists):
        want = st_model.tokenizer(prefix + text)["input_ids"]
        assert [t["id"] for t in tokens] == want
        assert tokens[0]["special"] and tokens[-1]["special"] and not any(t["special"] for t in tokens[1:-1])
        raw = (prefix + text).encode("utf-8")
        for t in tokens[1:-1]:
            assert raw[t["start"]:t["stop"]].decode("utf-8").strip() == t["text"].strip()
    bare = ok(client, "/tokenize", {"inputs": TEXTS[0], "add_special_tokens": False})
    assert [t["id"] for t in bare[0]] == st_model.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]


def test_tokenize_and_decode_show_left_truncation_keeping_the_prefix(client, st_short):
    text = "あいうえおかきくけこさしすせそたちつてと"
    lists = ok(client, "/tokenize", {"inputs": text, "prompt_name": "query", "model": EMBED_SHORT})
    assert len(lists[0]) == SHORT_MAX
    prefix_ids = st_short.tokenizer("検索クエリ: ", add_special_tokens=False)["input_ids"]
    text_ids = st_short.tokenizer("検索クエリ: " + text, add_special_tokens=False)["input_ids"]
    resp = client.post("/embed", json={"inputs": text, "prompt_name": "query", "model": EMBED_SHORT,
                                       "truncation_direction": "left"})
    assert resp.status_code == 200
    # The same cut, seen through the route that shows tokens: the prefix, then the text's end.
    left = ok(client, "/v2/embed", {"model": EMBED_SHORT, "texts": [text], "input_type": "search_query",
                                    "truncate": "START"})
    assert left["meta"]["billed_units"]["input_tokens"] == SHORT_MAX
    body = SHORT_MAX - 2
    kept = [*prefix_ids, *text_ids[len(text_ids) - (body - len(prefix_ids)):]]
    decoded = ok(client, "/decode", {"ids": kept, "model": EMBED_SHORT})[0]
    assert decoded.startswith("検索クエリ:") and decoded.endswith("たちつてと")
    want = st_short.encode(st_short.tokenizer.decode(kept), normalize_embeddings=True)
    np.testing.assert_allclose(np.array(resp.json[0]), want, atol=1e-5)


def test_decode_round_trips_tokenize(client):
    ids = [t["id"] for t in ok(client, "/tokenize", {"inputs": TEXTS[0]})[0]]
    assert ok(client, "/decode", {"ids": [ids]}) == [TEXTS[0]]
    assert ok(client, "/decode", {"ids": ids, "skip_special_tokens": False})[0].startswith("<s>")


def test_tei_rerank_scores_equal_the_v1_route(client):
    query, docs = "温泉の泉質", ["蔵王温泉は強酸性の硫黄泉です。", "名古屋は愛知県にあります。", "草津温泉は湯畑が有名"]
    for raw in (False, True):
        v1 = ok(client, "/v1/rerank", {"model": RERANK, "query": query, "documents": docs, "raw_scores": raw})
        for path in ("/rerank", "/"):
            tei = ok(client, path, {"query": query, "texts": docs, "raw_scores": raw, "return_text": True})
            assert [r["index"] for r in tei] == [r["index"] for r in v1["results"]]
            assert [r["score"] for r in tei] == [r["relevance_score"] for r in v1["results"]]
            assert [r["text"] for r in tei] == [docs[r["index"]] for r in tei]
    assert "text" not in ok(client, "/rerank", {"query": query, "texts": docs})[0]
    # The Jina/Cohere body on the same path keeps its own answer.
    assert "results" in ok(client, "/rerank", {"model": RERANK, "query": query, "documents": docs})


def test_tei_rerank_truncate_false_refuses_a_long_pair(client):
    long = "🍣" * 2500  # byte-fallback tokens: over 8192 tokens within the app's 5000 characters
    resp = client.post("/rerank", json={"query": "温泉", "texts": ["短い", long], "truncate": False})
    assert resp.status_code == 400 and resp.json["error_type"] == "Validation" and "document 1" in resp.json["error"]


def test_info_describes_the_default_and_named_models(client):
    info = client.get("/info").json
    assert info["model_id"] == EMBED and "embedding" in info["model_type"] and info["max_input_length"] > 0
    assert info["model_dtype"] == "float32" and info["version"]
    rerank = client.get("/info", query_string={"model": RERANK}).json
    assert rerank["model_id"] == RERANK and "reranker" in rerank["model_type"]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_keeps_cosine_with_the_floats_and_ignores_batch_company(app, client):
    types = ["float", "int8", "uint8", "binary", "ubinary"]
    for input_type in ("search_query", "search_document"):
        got = ok(client, "/v2/embed", {"model": EMBED, "texts": FIXED, "input_type": input_type,
                                       "embedding_types": types})["embeddings"]
        floats = np.array(got["float"], dtype=np.float32)
        int8 = np.array(got["int8"], dtype=np.float64)
        assert cosine(floats, int8).min() >= 0.99  # the raw codes, as a vector database compares them
        np.testing.assert_array_equal(np.array(got["uint8"]), int8 + 128)
        # Each type is a fixed function of the float vector: the model's step, not the batch's range.
        step = app.extensions["embedapi"].registry.models[EMBED].quantizer.step(floats.shape[1], True)
        np.testing.assert_array_equal(int8, quantize.to_int8(floats, step))
        np.testing.assert_array_equal(np.array(got["ubinary"]), np.packbits(floats > 0, axis=-1))
        np.testing.assert_array_equal(np.array(got["binary"]), np.packbits(floats > 0, axis=-1).astype(int) - 128)
        # Alone, or in other company: the same codes (the float vectors agree to float noise).
        for i in (0, 5):
            alone = ok(client, "/v2/embed", {"model": EMBED, "texts": [FIXED[i]], "input_type": input_type,
                                             "embedding_types": ["float", "int8"]})["embeddings"]
            mixed = ok(client, "/v2/embed", {"model": EMBED, "texts": [TEXTS[0] * 5, FIXED[i], "短い"],
                                             "input_type": input_type, "embedding_types": ["int8"]})["embeddings"]
            assert np.abs(np.array(alone["int8"][0]) - int8[i]).max() <= 1
            assert np.abs(np.array(mixed["int8"][1]) - int8[i]).max() <= 1
            np.testing.assert_array_equal(alone["int8"][0], quantize.to_int8(np.array(alone["float"]), step)[0])


def test_binary_types_match_sentence_transformers(client):
    from sentence_transformers.util.quantization import quantize_embeddings

    got = ok(client, "/v2/embed", {"model": EMBED, "texts": FIXED, "input_type": "search_document",
                                   "embedding_types": ["float", "binary", "ubinary"]})["embeddings"]
    floats = np.array(got["float"], dtype=np.float32)
    np.testing.assert_array_equal(np.array(got["binary"]), quantize_embeddings(floats, precision="binary"))
    np.testing.assert_array_equal(np.array(got["ubinary"]), quantize_embeddings(floats, precision="ubinary"))
    assert len(got["binary"][0]) == floats.shape[1] // 8


def test_the_step_is_rounded_so_replicas_agree():
    assert quantize.round_up(0.4922) == pytest.approx(0.5) and quantize.round_up(0.5) == pytest.approx(0.5)
    assert quantize.round_up(0.0123) == pytest.approx(0.013) and quantize.round_up(3.21) == pytest.approx(3.3)
    rows = np.array([[0.30, -0.4922], [0.1, 0.2]], dtype=np.float32)
    noisy = rows * np.float32(1.0005)  # another dtype's last bits
    assert quantize.Quantizer(rows).step(2, False) == quantize.Quantizer(noisy).step(2, False) == np.float32(0.5 / 127)


def test_calibration_is_fixed_and_covers_every_prefix():
    inputs = quantize.calibration_inputs(["検索クエリ: ", "検索文書: ", "トピック: ", "トピック: ", ""])
    assert len(inputs) == 4 * len(quantize.CALIBRATION_TEXTS)
    assert inputs[len(quantize.CALIBRATION_TEXTS)].startswith("検索クエリ: ")


def test_tokenize_offsets_after_a_left_cut_without_prefix(app):
    """The tokens' offsets point at the text's end after a left cut, even when its first token recurs there."""
    encoder = app.extensions["embedapi"].registry.models[EMBED_SHORT].encoder
    text = "あい" + "うえお" * 10 + "あい"
    ids = encoder.ids([text])[0]
    seq = encoder.single(ids, left=True)
    tokens = encoder.describe(text, seq)
    assert [t["id"] for t in tokens] == seq and len(seq) == SHORT_MAX
    raw = text.encode("utf-8")
    assert tokens[-2]["stop"] == len(raw) and raw[tokens[1]["start"]:tokens[-2]["stop"]].decode().endswith("えおあい")
