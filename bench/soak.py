"""Soak test: many concurrent clients send mixed embeddings and rerank requests for a fixed time.

    python bench/soak.py                          # starts a 2-worker Gunicorn with tiny test models
    python bench/soak.py --models-file models.toml --duration 600
    python bench/soak.py --url http://127.0.0.1:8000 --embed-model cl-nagoya/ruri-v3-310m \\
        --rerank-model cl-nagoya/ruri-v3-reranker-310m

Each client keeps one HTTP/1.1 keep-alive connection (as requests.Session and the OpenAI SDK do) and
checks every answer's shape. After a warm-up, the worker processes' resident memory (RSS) is read, the
load runs for --duration seconds, and RSS is read again. Prints the figures and exits with:

    0  no error other than deliberate 429 (queue full), and no worker grew by more than the bound
    1  some request failed (any status other than 200/429, a connection error, or a malformed answer)
    2  a worker's RSS grew by more than --max-rss-growth-mb (default 256 MiB) during the measured run

The memory bound is meant to catch leaks (anything kept per request grows without end: 10 KiB kept per
request is ~60 MiB per minute at 100 requests/s), not allocator noise: a little growth remains (+13 / +28 MiB per worker
over 60 s with the tiny models on 2026-12-03; the torch runner alone, fed 24,000 batches of varied shapes, grew
~20 MB and levelled off; the rest is not broken down). The +80-100 MiB
seen before was tokenizers' per-thread BPE word cache, now off (embedapi/tokenization.py, docs/operations.md).
The RSS samples printed show the trend.

With --url, RSS is read from /proc for the worker pids that /health reports, when they run on this host.
Loopback only unless you pass --url yourself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("名古屋 大学 温泉 検索 文書 モデル 日本語 埋め込み 東京 京都 山 川 電車 天気 料理 歴史 経済 科学 音楽 "
         "旅行 サッカー 野球 AI RAG ベクトル 再ランキング").split()


def text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) for _ in range(words)) + f" {rng.randrange(10 ** 9)}"


def make_request(rng: random.Random, embed_model: str, rerank_model: str) -> tuple[str, str, dict, int]:
    """(kind, path, body, expected item count) of one random request of the mix."""
    roll = rng.random()
    if roll < 0.6:
        n = rng.choice([1, 1, 1, 2, 4, 8, 16])
        body: dict = {"model": embed_model, "input": [text(rng, rng.choice([3, 10, 40, 150])) for _ in range(n)],
                      "input_type": rng.choice(["query", "document", None]),
                      "encoding_format": rng.choice(["float", "float", "base64"])}
        if n == 1 and rng.random() < 0.5:
            body["input"] = body["input"][0]
        return "embeddings", "/v1/embeddings", body, n
    n = rng.choice([2, 5, 10, 20])
    body = {"model": rerank_model, "query": text(rng, 5), "documents": [text(rng, rng.choice([10, 40, 100]))
                                                                         for _ in range(n)]}
    if roll < 0.9:
        top_n = rng.choice([None, 3])
        body["top_n"] = top_n
        return "rerank", "/v1/rerank", body, min(top_n or n, n)
    return "rerank_v2", "/v2/rerank", body, n


def check(kind: str, body: dict, expected: int) -> bool:
    if kind == "embeddings":
        return [d["index"] for d in body["data"]] == list(range(expected)) and body["usage"]["total_tokens"] > 0
    results = body["results"]
    scores = [r["relevance_score"] for r in results]
    return len(results) == expected and scores == sorted(scores, reverse=True)


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {}
        self.statuses: Counter = Counter()
        self.failures: Counter = Counter()  # what counts as an error, by kind of failure
        self.examples: list[str] = []

    def record(self, kind: str, status: int | str, seconds: float, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.statuses[status] += 1
            if ok:
                self.latencies.setdefault(kind, []).append(seconds)
            elif status != 429:
                self.failures[status] += 1
                if len(self.examples) < 5:
                    self.examples.append(f"{kind} -> {status}: {detail[:300]}")


class Client(threading.Thread):
    """One keep-alive connection; sends requests back to back until `stop`."""

    def __init__(self, index: int, url: str, args: argparse.Namespace, stop: threading.Event,
                 recording: threading.Event, stats: Stats, headers: dict[str, str]) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.rng = random.Random(index)
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.args, self.stop, self.recording, self.stats, self.headers = args, stop, recording, stats, headers
        self.conn: http.client.HTTPConnection | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            kind, path, body, expected = make_request(self.rng, self.args.embed_model, self.args.rerank_model)
            started = time.perf_counter()
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.args.timeout)
                self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json",
                                                                   **self.headers})
                resp = self.conn.getresponse()
                payload = resp.read()
                status: int | str = resp.status
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
            except (OSError, http.client.HTTPException) as exc:
                status, payload = type(exc).__name__, str(exc).encode()
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
            seconds = time.perf_counter() - started
            if not self.recording.is_set():
                continue
            ok = False
            if status == 200:
                try:
                    ok = check(kind, json.loads(payload), expected)
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    status = "malformed 200"
            elif status == 429:
                time.sleep(0.05)  # a polite client backs off (Retry-After is 1 s; keep the pressure up)
            self.stats.record(kind, status, seconds, ok, payload.decode("utf-8", "replace"))
        if self.conn is not None:
            self.conn.close()


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker_pids(url: str, server, headers: dict[str, str]) -> list[int]:
    if server is not None:
        return sorted(server.worker_pids())
    pids = set()
    for _ in range(50):  # bounded: /health answers with the pid of whichever worker took it
        try:
            parts = urllib.parse.urlsplit(url)
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=5)
            conn.request("GET", "/health", headers=headers)
            pids.add(json.loads(conn.getresponse().read())["pid"])
            conn.close()
        except (OSError, ValueError, KeyError):
            pass
    return sorted(p for p in pids if rss_mb(p) is not None)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_server(args: argparse.Namespace):
    sys.path.insert(0, str(ROOT))
    from tests.server import GunicornServer  # the test suite's launcher: the repository's gunicorn.conf.py

    models_file = args.models_file
    if models_file is None:
        from tests.conftest import EMBED, RERANK, models_toml
        from tests.synthetic_models import build_test_models

        scratch = Path(tempfile.mkdtemp(prefix="embedapi-soak-"))
        print(f"building tiny test models in {scratch} ...", flush=True)
        models_file = scratch / "models.toml"
        models_file.write_text(models_toml(build_test_models(scratch / "models")), encoding="utf-8")
        args.embed_model = args.embed_model or EMBED
        args.rerank_model = args.rerank_model or RERANK
    env = {"EMBEDAPI_THREADS": str(args.server_threads), "EMBEDAPI_LOG_LEVEL": "WARNING",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    server = GunicornServer(Path(models_file), workers=args.workers, env=env)
    print(f"starting gunicorn ({args.workers} workers) on {server.url} ...", flush=True)
    return server.start(timeout=300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds of load (default 60)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before RSS is first read")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--url", help="an already running server; default: start one on loopback")
    parser.add_argument("--models-file", help="models TOML for the server this script starts "
                        "(default: build the tiny test models)")
    parser.add_argument("--workers", type=int, default=2, help="Gunicorn workers of the started server")
    parser.add_argument("--server-threads", type=int, default=64, help="threads per worker of the started server")
    parser.add_argument("--embed-model", help="embedding model id (default: the tiny test model)")
    parser.add_argument("--rerank-model", help="rerank model id (default: the tiny test reranker)")
    parser.add_argument("--api-key", default=os.environ.get("EMBEDAPI_API_KEY"), help="bearer key, if needed")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    parser.add_argument("--max-rss-growth-mb", type=float, default=256.0,
                        help="largest RSS growth of any worker over the measured run (default 256 MiB)")
    args = parser.parse_args(argv)

    server = None
    if args.url is None:
        server = start_server(args)
        url = server.url
    else:
        url = args.url.rstrip("/")
        if not (args.embed_model and args.rerank_model):
            parser.error("--url needs --embed-model and --rerank-model")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        stats = Stats()
        stop, recording = threading.Event(), threading.Event()
        clients = [Client(i, url, args, stop, recording, stats, headers) for i in range(args.clients)]
        for c in clients:
            c.start()
        print(f"warm-up {args.warmup:.0f}s with {args.clients} clients ...", flush=True)
        time.sleep(args.warmup)
        pids = worker_pids(url, server, headers)
        before = {p: rss_mb(p) for p in pids}
        recording.set()
        started = time.monotonic()
        print(f"measuring {args.duration:.0f}s ...", flush=True)
        samples = []
        while (left := args.duration - (time.monotonic() - started)) > 0:
            time.sleep(min(10.0, left))
            samples.append({p: rss_mb(p) for p in pids})
        recording.clear()
        elapsed = time.monotonic() - started
        stop.set()
        for c in clients:
            c.join(args.timeout + 5)
        after = {p: rss_mb(p) for p in pids}
        if server is not None:
            replaced = set(server.worker_pids()) != set(pids)
        else:
            replaced = any(v is None for v in after.values())
    finally:
        if server is not None:
            server.stop()

    total = sum(stats.statuses.values())
    served = sum(len(v) for v in stats.latencies.values())
    print()
    print(f"soak: {args.clients} clients, {elapsed:.1f}s measured, server {url}")
    print(f"requests: {total} ({total / elapsed:.1f}/s), answered 200: {served}, "
          f"deliberate 429: {stats.statuses.get(429, 0)}, errors: {sum(stats.failures.values())}")
    print("status counts: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.statuses.items(), key=str)))
    if stats.failures:
        print("errors by status: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.failures.items(), key=str)))
        for example in stats.examples:
            print(f"  e.g. {example}")
    every = [s for v in stats.latencies.values() for s in v]
    print(f"latency (200s) all: p50 {percentile(every, 0.5) * 1000:.1f} ms, p99 {percentile(every, 0.99) * 1000:.1f} ms")
    for kind, values in sorted(stats.latencies.items()):
        print(f"latency {kind}: n={len(values)} p50 {percentile(values, 0.5) * 1000:.1f} ms, "
              f"p99 {percentile(values, 0.99) * 1000:.1f} ms")
    growth_failed = False
    for pid in pids:
        b, a = before.get(pid), after.get(pid)
        curve = " -> ".join(f"{s.get(pid) or 0:.0f}" for s in samples)
        if b is None or a is None:
            print(f"worker {pid}: RSS unknown (gone?)")
            growth_failed = True
            continue
        grew = a - b
        print(f"worker {pid}: RSS before {b:.0f} MiB, after {a:.0f} MiB, growth {grew:+.0f} MiB "
              f"(bound {args.max_rss_growth_mb:.0f} MiB); samples {curve}")
        growth_failed |= grew > args.max_rss_growth_mb
    if not pids:
        print("worker RSS: not readable from this host (remote --url); memory bound not checked")
    if replaced:
        print("a worker was replaced during the run")
    if stats.failures or served == 0 or replaced:
        print("RESULT: FAIL (errors)")
        return 1
    if growth_failed:
        print("RESULT: FAIL (worker memory grew beyond the bound)")
        return 2
    print("RESULT: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
