"""Results are routed to their own requests under concurrency (two-worker Gunicorn, dynamic batching).

Many threads send distinct texts at once; each answer must carry the vectors (or scores) of its own
texts in its own order: compared with SentenceTransformer.encode / CrossEncoder.predict within 1e-5.
Requests of different lengths and sizes are mixed so that the engine coalesces and re-sorts them.
"""

from __future__ import annotations

import base64
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .conftest import EMBED, RERANK
from .server import call

THREADS = 24
REQUESTS = 240
WORDS = ["名古屋", "大学", "温泉", "検索", "文書", "モデル", "日本語", "埋め込み", "東京", "京都", "山", "川", "電車",
         "sushi", "ramen", "42", "😀"]


def sentence(rng: random.Random, i: int, j: int) -> str:
    """A distinct text of varied length (1..60 words), so batches mix short and long rows."""
    n = rng.choice([1, 2, 3, 8, 20, 60])
    return f"{i}-{j} " + "".join(rng.choice(WORDS) for _ in range(n))


def vectors(body: dict) -> np.ndarray:
    rows = []
    for item in body["data"]:
        emb = item["embedding"]
        rows.append(np.frombuffer(base64.b64decode(emb), dtype="<f4") if isinstance(emb, str) else emb)
    return np.array(rows, dtype=np.float32)


def test_concurrent_embeddings_each_get_their_own_vectors_in_order(gunicorn_server, st_model):
    rng = random.Random(6)
    requests = []
    for i in range(REQUESTS):
        texts = [sentence(rng, i, j) for j in range(rng.choice([1, 1, 2, 3, 7]))]
        requests.append({"model": EMBED, "input": texts if len(texts) > 1 or rng.random() < 0.5 else texts[0],
                         "encoding_format": rng.choice(["float", "base64"])})
    all_texts = [t for r in requests for t in (r["input"] if isinstance(r["input"], list) else [r["input"]])]
    assert len(set(all_texts)) == len(all_texts)
    expected = dict(zip(all_texts, st_model.encode(all_texts, normalize_embeddings=True, convert_to_numpy=True)))

    start = threading.Barrier(THREADS)

    def send(k: int) -> list[tuple[dict, tuple]]:
        start.wait(60)
        return [(requests[i], call("POST", gunicorn_server.url + "/v1/embeddings", requests[i], timeout=120))
                for i in range(k, REQUESTS, THREADS)]

    with ThreadPoolExecutor(THREADS) as pool:
        answers = [a for chunk in pool.map(send, range(THREADS)) for a in chunk]
    assert len(answers) == REQUESTS
    for req, (status, _, body) in answers:
        assert status == 200, body
        texts = req["input"] if isinstance(req["input"], list) else [req["input"]]
        assert [d["index"] for d in body["data"]] == list(range(len(texts)))
        np.testing.assert_allclose(vectors(body), np.stack([expected[t] for t in texts]), atol=1e-5)


def test_concurrent_reranks_each_get_their_own_scores(gunicorn_server, ce_model):
    rng = random.Random(7)
    requests = []
    for i in range(REQUESTS // 2):
        docs = [sentence(rng, i, j) for j in range(rng.choice([1, 2, 5, 9]))]
        requests.append({"model": RERANK, "query": sentence(rng, i, 99), "documents": docs,
                         "return_documents": True})

    def send(req: dict) -> tuple[dict, tuple]:
        return req, call("POST", gunicorn_server.url + "/v1/rerank", req, timeout=120)

    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(send, requests))
    pairs = [(req["query"], d) for req in requests for d in req["documents"]]
    reference = dict(zip(pairs, ce_model.predict(pairs, batch_size=64, convert_to_numpy=True)))
    for req, (status, _, body) in answers:
        assert status == 200, body
        assert body["query"] == req["query"]
        expected = [reference[(req["query"], d)] for d in req["documents"]]
        got = {r["index"]: r["relevance_score"] for r in body["results"]}
        assert sorted(got) == list(range(len(req["documents"])))
        np.testing.assert_allclose([got[i] for i in range(len(got))], expected, atol=1e-5)
        for r in body["results"]:
            assert r["document"]["text"] == req["documents"][r["index"]]


def test_concurrent_mixed_traffic_matches_single_requests(gunicorn_server):
    """The same request answered alone and amid a burst of others gives the same vectors."""
    url = gunicorn_server.url
    probe = {"model": EMBED, "input": ["単独で送った文", "バーストの中で送った文"]}
    status, _, alone = call("POST", url + "/v1/embeddings", probe)
    assert status == 200
    rng = random.Random(8)

    def noise(i: int):
        if i % 10 == 0:
            return call("POST", url + "/v1/embeddings", probe)
        if i % 3 == 0:
            return call("POST", url + "/v1/rerank", {"model": RERANK, "query": sentence(rng, i, 0),
                                                     "documents": [sentence(rng, i, 1), sentence(rng, i, 2)]})
        return call("POST", url + "/v1/embeddings", {"model": EMBED, "input": [sentence(rng, i, k) for k in range(4)]})

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(noise, range(200)))
    assert all(status == 200 for status, _, _ in results)
    for i in range(0, 200, 10):
        np.testing.assert_allclose(vectors(results[i][2]), vectors(alone), atol=1e-5)
