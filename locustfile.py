"""Manual load tests of embedapi with Locust (both endpoints, mixed sizes).

    locust -f locustfile.py --host http://localhost:8000                   # web UI on :8089
    locust -f locustfile.py --headless -u 32 -r 8 -t 2m --host http://localhost:8000

Environment variables:
    EMBEDAPI_LOCUST_EMBED_MODEL    embedding model id   (default cl-nagoya/ruri-v3-310m)
    EMBEDAPI_LOCUST_RERANK_MODEL   rerank model id      (default cl-nagoya/ruri-v3-reranker-310m)
    EMBEDAPI_API_KEY               bearer key, when the server has EMBEDAPI_API_KEYS set

Every answer is checked (status and shape); a 429 (queue full) is counted as a failure named
"queue full", so the report shows where the server starts to shed load.
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

EMBED_MODEL = os.environ.get("EMBEDAPI_LOCUST_EMBED_MODEL", "cl-nagoya/ruri-v3-310m")
RERANK_MODEL = os.environ.get("EMBEDAPI_LOCUST_RERANK_MODEL", "cl-nagoya/ruri-v3-reranker-310m")
API_KEY = os.environ.get("EMBEDAPI_API_KEY", "")

SENTENCES = [
    "瑠璃色はどんな色？",
    "瑠璃色（るりいろ）は、紫みを帯びた濃い青。名は、半貴石の瑠璃（ラピスラズリ、英: lapis lazuli）による。",
    "名古屋大学で開発された日本語の文埋め込みモデルです。",
    "蔵王温泉は山形県にある強酸性の硫黄泉で知られる温泉地です。",
    "東京から京都へは新幹線でおよそ二時間十五分かかります。",
    "検索拡張生成（RAG）では、まず関連する文書をベクトル検索で取り出し、再ランキングで並べ替えます。",
    "明日の天気は晴れのち曇り、降水確率は二十パーセントです。",
    "日本の歴史において、江戸時代は約二百六十年続いた。",
]


def texts(n: int) -> list[str]:
    return [" ".join(random.choices(SENTENCES, k=random.randint(1, 6))) for _ in range(n)]


class EmbedapiUser(HttpUser):
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def _post(self, name: str, path: str, body: dict, check) -> None:
        with self.client.post(path, json=body, name=name, catch_response=True) as resp:
            if resp.status_code == 429:
                resp.failure("queue full (429)")
            elif resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
            else:
                try:
                    problem = check(resp.json())
                except (ValueError, KeyError, TypeError) as exc:
                    problem = f"malformed answer: {exc!r}"
                if problem:
                    resp.failure(problem)

    @task(4)
    def embed_query(self) -> None:
        body = {"model": EMBED_MODEL, "input": texts(1)[0], "input_type": "query"}
        self._post("embeddings: 1 query", "/v1/embeddings", body,
                   lambda r: None if len(r["data"]) == 1 else "expected 1 vector")

    @task(2)
    def embed_documents(self) -> None:
        n = random.choice([4, 16, 32])
        body = {"model": EMBED_MODEL, "input": texts(n), "input_type": "document",
                "encoding_format": random.choice(["float", "base64"])}
        self._post("embeddings: documents", "/v1/embeddings", body,
                   lambda r: None if [d["index"] for d in r["data"]] == list(range(n)) else "vectors out of order")

    @task(3)
    def rerank(self) -> None:
        n = random.choice([5, 20, 50])
        body = {"model": RERANK_MODEL, "query": texts(1)[0], "documents": texts(n), "top_n": 5}
        self._post("rerank", "/v1/rerank", body,
                   lambda r: None if len(r["results"]) == min(5, n) else "wrong number of results")

    @task(1)
    def rerank_v2(self) -> None:
        n = random.choice([5, 20])
        body = {"model": RERANK_MODEL, "query": texts(1)[0], "documents": texts(n)}
        self._post("rerank v2", "/v2/rerank", body,
                   lambda r: None if len(r["results"]) == n else "wrong number of results")
