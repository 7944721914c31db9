#!/usr/bin/env python
"""One pod's capacity in tokens per second, and what `embedapi_queue_tokens` reads below and above it.

The HorizontalPodAutoscaler in deploy/kubernetes scales on `embedapi_queue_tokens` per pod: tokens
accepted but not yet in a forward pass. Divided by the pod's throughput it is the time a new request
waits before its computation starts, so the target is "throughput x the wait we accept" (0.25 s here). This script
measures both halves (docs/kubernetes.md has the figures and the resulting targets):

  1. saturation: --clients closed-loop clients send requests back to back for --seconds; the tokens
     the server reports in `usage` per second of wall time is the pod's capacity
  2. half load: open-loop arrivals at 50 % of that capacity; the queue stays near empty
  3. overload: open-loop arrivals at 150 %; the queue grows (then 429 at EMBEDAPI_MAX_QUEUE_TOKENS)

    python bench/capacity.py                      # a local Gunicorn, 1 worker, 30m-shape random model
    python bench/capacity.py --url http://127.0.0.1:8000 --model cl-nagoya/ruri-v3-310m
        # a real pod: kubectl -n embedapi port-forward deploy/embedapi 8000:8000

Nothing is asserted; loopback only unless you pass --url yourself.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("名古屋 大学 温泉 検索 文書 モデル 日本語 埋め込み 東京 京都 山 川 電車 天気 料理 歴史 経済 科学 音楽 "
         "旅行 サッカー 野球 ベクトル 再ランキング").split()


def make_body(rng: random.Random, model: str, texts: int, words: int) -> bytes:
    inputs = ["".join(rng.choice(WORDS) for _ in range(words)) + f" {rng.randrange(10 ** 9)}" for _ in range(texts)]
    return json.dumps({"model": model, "input": inputs, "input_type": "document"}).encode()


class Load:
    """Sends requests and counts the tokens of the 200 answers (usage.prompt_tokens)."""

    def __init__(self, url: str, model: str, texts: int, words: int, headers: dict[str, str]) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.model, self.texts, self.words, self.headers = model, texts, words, headers
        self.lock = threading.Lock()
        self.tokens = self.ok = self.rejected = self.failed = 0
        self.local = threading.local()

    def one(self, rng: random.Random) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        try:
            conn.request("POST", "/v1/embeddings", make_body(rng, self.model, self.texts, self.words),
                         {"Content-Type": "application/json", **self.headers})
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self.local.conn = None
            with self.lock:
                self.failed += 1
            return
        with self.lock:
            if resp.status == 200:
                self.ok += 1
                self.tokens += json.loads(payload)["usage"]["prompt_tokens"]
            elif resp.status == 429:
                self.rejected += 1
            else:
                self.failed += 1

    def reset(self) -> tuple[int, int, int, int]:
        with self.lock:
            out = (self.tokens, self.ok, self.rejected, self.failed)
            self.tokens = self.ok = self.rejected = self.failed = 0
            return out


def queue_tokens(url: str) -> float:
    """Sum of embedapi_queue_tokens over models, as the prometheus-adapter rule sums it per pod."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "embedapi_queue_tokens"
               for s in fam.samples)


def sample_queue(url: str, stop: threading.Event, out: list[float]) -> None:
    while not stop.wait(0.25):
        try:
            out.append(queue_tokens(url))
        except OSError:
            pass


def closed_loop(load: Load, url: str, clients: int, seconds: float) -> tuple[float, list[float], tuple]:
    stop = threading.Event()
    samples: list[float] = []

    def client(i: int) -> None:
        rng = random.Random(i)
        while not stop.is_set():
            load.one(rng)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(min(5.0, seconds / 4))  # warm: every client in flight, batches at their steady size
    load.reset()
    sampler = threading.Thread(target=sample_queue, args=(url, stop, samples), daemon=True)
    started = time.monotonic()
    sampler.start()
    time.sleep(seconds)
    counts = load.reset()
    elapsed = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join()
    return counts[0] / elapsed, samples, counts


def open_loop(load: Load, url: str, rate: float, seconds: float) -> tuple[list[float], tuple]:
    """Requests at a fixed rate, whatever the server's pace (as independent users send them)."""
    stop = threading.Event()
    samples: list[float] = []
    sampler = threading.Thread(target=sample_queue, args=(url, stop, samples), daemon=True)
    sampler.start()
    rng = random.Random(99)
    load.reset()
    with concurrent.futures.ThreadPoolExecutor(max_workers=256) as pool:
        started = time.monotonic()
        n = 0
        while (now := time.monotonic()) - started < seconds:
            due = started + n / rate
            if due > now:
                time.sleep(due - now)
            pool.submit(load.one, random.Random(rng.random()))
            n += 1
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    return samples, load.reset()


def summary(samples: list[float]) -> str:
    if not samples:
        return "no samples"
    ordered = sorted(samples)
    return (f"mean {sum(samples) / len(samples):.0f}, median {ordered[len(ordered) // 2]:.0f}, "
            f"max {ordered[-1]:.0f} tokens ({len(samples)} samples)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start a local Gunicorn with a 30m-shape model)")
    ap.add_argument("--model", default="ruri-v3-30m-shape", help="model id to send (with --url)")
    ap.add_argument("--api-key", default=os.environ.get("EMBEDAPI_API_KEY", ""))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--texts", type=int, default=8, help="texts per request")
    ap.add_argument("--words", type=int, default=40, help="words per text (about 1.5 tokens each with Ruri)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--torch-threads", default="2", help="local server: EMBEDAPI_TORCH_THREADS (the pod's CPUs)")
    ap.add_argument("--threads", default="64",
                    help="local server: EMBEDAPI_THREADS (request threads; 64 is the default)")
    ap.add_argument("--models-dir", default=os.environ.get("EMBEDAPI_BENCH_MODELS",
                                                            str(Path(tempfile.gettempdir()) / "embedapi-bench")))
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    server = None
    url = args.url
    if url is None:
        from bench.benchmark import build_models
        from tests.server import GunicornServer
        from tests.synthetic_models import RURI_V3_SHAPES

        path = build_models(Path(args.models_dir) / "real", {"embed-30m": ("embedding", RURI_V3_SHAPES["ruri-v3-30m"])})
        toml = Path(tempfile.mkdtemp(prefix="embedapi-capacity-")) / "models.toml"
        toml.write_text(f'[[models]]\nid = "{args.model}"\nsource = "{path["embed-30m"]}"\nprompts = "ruri-v3"\n',
                        encoding="utf-8")
        server = GunicornServer(toml, workers=1, env={"EMBEDAPI_TORCH_THREADS": args.torch_threads,
                                                           "EMBEDAPI_THREADS": args.threads}).start()
        url = server.url
    try:
        load = Load(url, args.model, args.texts, args.words, headers)
        capacity, sat, counts = closed_loop(load, url, args.clients, args.seconds)
        per_request = counts[0] / max(1, counts[1])
        print(f"shape: {args.texts} texts x ~{per_request / args.texts:.0f} tokens per request; "
              f"{args.clients} clients; {args.seconds:.0f} s per phase")
        print(f"1. saturation: {capacity:.0f} tokens/s ({counts[1]} requests, {counts[2]} x 429, "
              f"{counts[3]} failed); queue: {summary(sat)}")
        for share in (0.5, 1.5):
            rate = share * capacity / per_request
            samples, counts = open_loop(load, url, rate, args.seconds)
            print(f"{2 if share < 1 else 3}. {share:.0%} of capacity ({rate:.1f} requests/s): "
                  f"queue: {summary(samples)}; "
                  f"{counts[1]} answered, {counts[2]} x 429, {counts[3]} failed")
        print(f"target for 0.25 s of queued work per pod: {capacity * 0.25:.0f} tokens")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
