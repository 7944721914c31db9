"""Property-based fuzzing of the request bodies of both endpoints (hypothesis, in-process Flask client).

Whatever JSON (or not-JSON) arrives, the answer is either a 2xx with the documented shape or a 4xx
with the contract's error object; never a 5xx and never a hung request. Bodies mix valid and hostile
fields so that a good share of the examples reach the model and the rest hit every validation path:
wrong types, huge and tiny numbers, deep nesting, emoji, combining marks, right-to-left text, NUL,
and lone surrogates escaped in the JSON text (valid JSON syntax, but not encodable text).
"""

from __future__ import annotations

import base64
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from .conftest import EMBED, EMBED_ALIAS, EMBED_SHORT, INSTRUCT, RERANK

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
REQUEST_TIMEOUT = 60  # a request that has not answered by then counts as hung
DIMS = 64  # the tiny embedding model's width (matryoshka 32, 16)

# A private-use character stands for a lone surrogate: after json.dumps(ensure_ascii=True) its escape
# "\ue000" is rewritten into "\ud800" / "\udfff", which JSON allows syntactically but no UTF-8 text holds.
LONE = "\ue000"

# -- text ----------------------------------------------------------------------------------------
EMOJI = "😀🎌🗾👨‍👩‍👧‍👦🏳️‍🌈🇯🇵"
COMBINING = "".join(chr(c) for c in range(0x300, 0x370))
RTL = "שלום עולם مرحبا بالعالم \u202e\u202b\u200f"
JAPANESE = "名古屋大学で開発された日本語の埋め込みモデル検索クエリ:文書トピック、。ｱｲｳ１２３"
ODD = "\x00\t\n\r\x1b\u00a0\u200b\u2028\u2029\ufeff\ufffd\uffff"
ASCII = "abc XYZ 012 :{}[]\"\\/"
good_texts = st.one_of(
    st.text(st.sampled_from(EMOJI + COMBINING + RTL + JAPANESE + ODD + ASCII), min_size=1, max_size=40),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),  # any encodable code point
    st.sampled_from([" ", "\x00", "検索クエリ: ", "検索クエリ：", "a" * 1000, "あ" * 600, "😀" * 300]),
)
texts = st.one_of(good_texts, st.text(st.sampled_from(EMOJI + RTL + ODD + LONE + ASCII), max_size=20))
nonempty = texts.filter(bool)

# -- arbitrary JSON --------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),  # beyond int64 too
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(texts, inner, max_size=5)),
    max_leaves=25,
)


def deep(depth: int, leaf: object = "x") -> object:
    value: object = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"text": value}
    return value


nested = st.integers(min_value=1, max_value=400).map(deep)
anything = st.one_of(json_values, nested)
good_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), good_texts),
                         lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                 st.dictionaries(good_texts, inner, max_size=4)),
                         max_leaves=10)


def sometimes(good: st.SearchStrategy, bad: st.SearchStrategy = anything) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(good, good, good, bad)


models = st.sampled_from([EMBED, EMBED_SHORT, INSTRUCT, EMBED_ALIAS, RERANK, "gpt-4", "", "../../etc/passwd",
                          "cl-nagoya/ruri-v3-310m"])
ints = st.one_of(st.integers(min_value=-3, max_value=2100), st.sampled_from([16, 32, 64, 2 ** 63, -(2 ** 63)]))
bools = st.one_of(st.booleans(), st.sampled_from([0, 1, "true", None]))


def optional(**fields: st.SearchStrategy) -> st.SearchStrategy:
    """A dict holding any subset of `fields`."""
    return st.fixed_dictionaries({}, optional=fields)


good_embed_bodies = st.builds(
    lambda required, extra: {**required, **extra},
    st.fixed_dictionaries({"model": st.sampled_from([EMBED, EMBED_SHORT, INSTRUCT, EMBED_ALIAS]),
                           "input": st.one_of(good_texts, st.lists(good_texts, min_size=1, max_size=8))}),
    optional(
        encoding_format=st.sampled_from(["float", "base64"]),
        dimensions=st.sampled_from([16, 32, 64, None]),
        input_type=st.sampled_from(["query", "document", "classification", "sts", "passage", None]),
        instruction=st.one_of(good_texts, st.none()),
        apply_ruri_prefix=st.booleans(),
        normalize=st.one_of(st.booleans(), st.none()),
        truncate=st.just(True),
        user=good_json,
        extra_field=good_json,
    ),
)

hostile_embed_bodies = st.builds(
    lambda required, extra: {**required, **extra},
    optional(
        model=sometimes(st.sampled_from([EMBED, EMBED_SHORT, INSTRUCT, EMBED_ALIAS]), models),
        input=sometimes(st.one_of(nonempty, st.lists(nonempty, min_size=1, max_size=8)),
                        st.one_of(anything, st.lists(ints, max_size=5), st.lists(st.lists(ints, max_size=3)))),
    ),
    optional(
        encoding_format=sometimes(st.sampled_from(["float", "base64"])),
        dimensions=sometimes(st.sampled_from([16, 32, 64, None]), st.one_of(ints, anything)),
        input_type=sometimes(st.sampled_from(["query", "document", "classification", "clustering", "sts",
                                              "search_query", "passage", "retrieval.query", None])),
        instruction=sometimes(st.one_of(texts, st.none())),
        apply_ruri_prefix=sometimes(bools),
        normalize=sometimes(bools),
        truncate=sometimes(bools),
        user=anything,
        extra_field=anything,
    ),
)

documents = st.one_of(texts, st.builds(lambda t: {"text": t}, texts))
good_documents = st.one_of(good_texts, st.builds(lambda t: {"text": t, "id": 1}, good_texts))
good_rerank_bodies = st.builds(
    lambda required, extra: {**required, **extra},
    st.fixed_dictionaries({"model": st.just(RERANK), "query": good_texts,
                           "documents": st.lists(good_documents, min_size=1, max_size=8)}),
    optional(
        top_n=st.one_of(st.integers(min_value=1, max_value=10), st.none()),
        top_k=st.integers(min_value=1, max_value=10),
        return_documents=st.booleans(),
        raw_scores=st.booleans(),
        max_tokens_per_doc=st.one_of(st.integers(min_value=1, max_value=64), st.none()),
        extra_field=good_json,
    ),
)
hostile_rerank_bodies = st.builds(
    lambda required, extra: {**required, **extra},
    optional(
        model=sometimes(st.just(RERANK), models),
        query=sometimes(nonempty),
        documents=sometimes(st.lists(documents, min_size=1, max_size=8), st.one_of(anything, st.lists(anything))),
    ),
    optional(
        top_n=sometimes(st.one_of(st.integers(min_value=1, max_value=10), st.none()), st.one_of(ints, anything)),
        top_k=sometimes(st.integers(min_value=1, max_value=10), st.one_of(ints, anything)),
        return_documents=sometimes(bools),
        raw_scores=sometimes(bools),
        max_tokens_per_doc=sometimes(st.integers(min_value=1, max_value=64), st.one_of(ints, anything)),
        extra_field=anything,
    ),
)


def encode(body: object, ascii_only: bool, lone: str) -> bytes:
    text = json.dumps(body, ensure_ascii=ascii_only)
    if ascii_only:
        text = text.replace("\\ue000", lone)
    return text.encode("utf-8", "surrogatepass")


def wire(bodies: st.SearchStrategy) -> st.SearchStrategy:
    """JSON text of a body (either escaping style, lone surrogates escaped), any JSON value, or raw bytes."""
    as_json = st.builds(encode, st.one_of(bodies, bodies, bodies, anything), st.booleans(),
                        st.sampled_from(["\\ud800", "\\udfff", "\\udbff\\u0041"]))
    raw = st.one_of(st.binary(max_size=200), st.sampled_from([b"", b"{", b"[" * 5000, b"{\"input\": NaN}",
                                                             b"\xff\xfe{}", b"null", b"1e999999"]))
    return st.one_of(as_json, as_json, as_json, raw)


embed_bodies = st.one_of(good_embed_bodies, good_embed_bodies, hostile_embed_bodies)
rerank_bodies = st.one_of(good_rerank_bodies, good_rerank_bodies, hostile_rerank_bodies)

content_types = st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "application/json; charset=latin-1", "multipart/form-data; boundary=x"])


# -- checks ----------------------------------------------------------------------------------------
def post(client, path: str, data: bytes, content_type: str | None):
    """One request through a plain Flask test client (pytest-flask's `client` keeps request contexts
    pushed between requests, which a watchdog thread cannot share)."""
    headers = {"Content-Type": content_type} if content_type else {}
    with ThreadPoolExecutor(1) as pool:  # a hung request fails the test instead of hanging the suite
        return pool.submit(client.post, path, data=data, headers=headers).result(timeout=REQUEST_TIMEOUT)


def check_error(resp) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.get_data(as_text=True)[:500])
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] in ("invalid_request_error", "rate_limit_error")
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    assert "Traceback" not in err["message"] and 'File "' not in err["message"]


def check_embeddings(body: dict, sent: object) -> None:
    assert body["object"] == "list" and body["model"] == sent["model"]
    inputs = sent["input"] if isinstance(sent["input"], list) else [sent["input"]]
    assert [d["index"] for d in body["data"]] == list(range(len(inputs)))
    dims = sent.get("dimensions") or DIMS
    for item in body["data"]:
        assert item["object"] == "embedding"
        vec = item["embedding"]
        if sent.get("encoding_format") == "base64":
            assert len(base64.b64decode(vec)) == 4 * dims
        else:
            assert len(vec) == dims and all(isinstance(x, float) and math.isfinite(x) for x in vec)
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] >= 2 * len(inputs)  # special tokens at least


def check_rerank(body: dict, sent: dict, v2: bool) -> None:
    n = len(sent["documents"])
    top_n = sent.get("top_n") or (None if v2 else sent.get("top_k"))
    results = body["results"]
    assert len(results) == (min(top_n, n) if top_n else n)
    indices = [r["index"] for r in results]
    assert len(set(indices)) == len(indices) and all(0 <= i < n for i in indices)
    scores = [r["relevance_score"] for r in results]
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert scores == sorted(scores, reverse=True)
    if v2:
        assert body["meta"]["tokens"]["input_tokens"] > 0
        return
    assert body["data"] == results and body["model"] == sent["model"] and body["query"] == sent["query"]
    if not sent.get("raw_scores"):
        assert all(0.0 <= s <= 1.0 for s in scores)
    for r in results:
        assert ("document" in r) == bool(sent.get("return_documents"))
    assert body["usage"]["total_tokens"] > 0


def check(resp, data: bytes, path: str) -> None:
    assert resp.status_code < 500, (resp.status_code, data[:300], resp.get_data(as_text=True)[:500])
    if resp.status_code >= 400:
        check_error(resp)
        return
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    sent = json.loads(data)
    body = resp.get_json()
    if path.endswith("embeddings"):
        check_embeddings(body, sent)
    else:
        check_rerank(body, sent, v2=path.startswith("/v2"))


# -- properties ------------------------------------------------------------------------------------
@FUZZ
@given(data=wire(embed_bodies), content_type=content_types, path=st.sampled_from(["/v1/embeddings", "/embeddings"]))
def test_fuzzed_embeddings_bodies_get_a_documented_answer(app, data, content_type, path):
    resp = post(app.test_client(), path, data, content_type)
    event(f"status {resp.status_code}")  # --hypothesis-show-statistics shows the mix
    check(resp, data, path)


@FUZZ
@given(data=wire(rerank_bodies), content_type=content_types,
       path=st.sampled_from(["/v1/rerank", "/rerank", "/v2/rerank"]))
def test_fuzzed_rerank_bodies_get_a_documented_answer(app, data, content_type, path):
    resp = post(app.test_client(), path, data, content_type)
    event(f"status {resp.status_code}")  # --hypothesis-show-statistics shows the mix
    check(resp, data, path)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/rerank"])
def test_fuzzing_reaches_the_model(client, path):
    """Guard against a fuzzer that only ever produces 400s: plausible bodies do get answered."""
    body = ({"model": EMBED, "input": ["😀" + COMBINING[:5], RTL, "a\x00b"]} if "embed" in path
            else {"model": RERANK, "query": RTL, "documents": ["😀", {"text": "a\x00b" + COMBINING[:9]}]})
    resp = client.post(path, json=body)
    assert resp.status_code == 200
    check(resp, json.dumps(body).encode(), path)
