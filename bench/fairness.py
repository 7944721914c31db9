#!/usr/bin/env python
"""Fair scheduling benchmark: short queries while one bulk request runs, on the real Gunicorn server.

One run, one machine, default configuration (1 worker, 2 torch threads, dtype auto), ruri-v3-30m
shape with random weights (tests/synthetic_models.py). For each server configuration it measures:

  - 8 concurrent short-query clients (one ~12-token text per request, closed loop) on an idle server:
    latency p50 / p99;
  - one bulk request (default 128 texts of ~3,300 tokens, ~420k tokens) alone: tokens/s;
  - the same bulk request with the 8 query clients running the whole time: the queries' p50 / p99
    and the bulk's tokens/s, as a ratio to its alone figure;
  - one request of 400 texts of mixed lengths (10-500 tokens) alone.

The configurations are the default (bulk work holds the two regular lanes, queries get a spare one)
and EMBEDAPI_QUERY_LANES=0 (turns between requests only: a query waits for a lane), for comparison.

    /work/main/.venv/bin/python bench/fairness.py            # full run (about 15 minutes on 2 cores)
    /work/main/.venv/bin/python bench/fairness.py --quick    # 48 bulk texts
    /work/main/.venv/bin/python bench/fairness.py --smoke    # tiny shapes: proves the script works

Nothing is asserted: the table reports figures and whether the issue's targets are met
(p99 <= 1 s while the bulk runs; bulk keeps >= 85 % of its alone throughput).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchmark import RURI_V3_SHAPES, SMOKE_SHAPE, Conn, TextMaker, body, build_models, models_toml, \
    percentile, start_server  # noqa: E402

QUERY_CLIENTS = 8


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def query_clients(port: int, bodies: list[bytes], stop: threading.Event, n_each: int = 0) -> list[float]:
    """QUERY_CLIENTS closed-loop clients; each sends until `stop` is set (or `n_each` requests)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = Conn(port)
        i = k
        sent = 0
        while not sent or (not stop.is_set() and (not n_each or sent < n_each)):  # one at least
            started = time.perf_counter()
            status, payload = conn.post("/v1/embeddings", bodies[i % len(bodies)])
            took = time.perf_counter() - started
            if status != 200:
                errors.append(f"{status}: {payload[:200]!r}")
                break
            with lock:
                latencies.append(took)
            i += QUERY_CLIENTS
            sent += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(QUERY_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    if errors:
        raise RuntimeError(f"{len(errors)} queries failed, first: {errors[0]}")
    return latencies


def bulk_once(port: int, payload: bytes) -> float:
    conn = Conn(port)
    conn.sock = socket.create_connection(("127.0.0.1", port), timeout=3600)  # a shared machine may be slow
    started = time.perf_counter()
    status, out = conn.post("/v1/embeddings", payload)
    seconds = time.perf_counter() - started
    conn.close()
    if status != 200:
        raise RuntimeError(f"bulk request failed: {status}: {out[:300]!r}")
    return seconds


def measure(toml: Path, label: str, env: dict[str, str], queries: list[bytes], bulk: bytes, bulk_tokens: int,
            n_idle: int, row, mixed: bytes, mixed_tokens: int) -> None:
    # The bulk request (~420k tokens) is over the default per-request limit (300k, as OpenAI's).
    server = start_server(toml, EMBEDAPI_MAX_REQUEST_TOKENS="1000000", EMBEDAPI_REQUEST_TIMEOUT="3600", **env)
    try:
        port = server.port
        stop = threading.Event()
        query_clients(port, queries[:QUERY_CLIENTS * 2], stop, n_each=2)  # warm the connections and caches
        idle = query_clients(port, queries, stop, n_each=n_idle)
        alone = bulk_once(port, bulk)
        stop = threading.Event()
        result: dict[str, float] = {}

        def run_bulk() -> None:
            try:
                result["seconds"] = bulk_once(port, bulk)
            finally:
                stop.set()  # the query clients stop with the bulk request, whatever its outcome

        bulk_thread = threading.Thread(target=run_bulk, daemon=True)
        bulk_thread.start()
        time.sleep(min(1.0, alone / 4))  # the bulk request is in the model before the queries start
        busy = query_clients(port, queries, stop)
        bulk_thread.join(3600)
        if "seconds" not in result:
            raise RuntimeError("the bulk request with queries failed (see above)")
        with_q = result["seconds"]
        mixed_s = bulk_once(port, mixed)
    finally:
        server.stop()
    p50i, p99i = percentile(idle, 50) * 1000, percentile(idle, 99) * 1000
    p50b, p99b = percentile(busy, 50) * 1000, percentile(busy, 99) * 1000
    row(f"{label}: {QUERY_CLIENTS} query clients, idle server, p50 / p99 ms", f"{p50i:.1f} / {p99i:.1f}",
        f"{len(idle)} queries", "")
    row(f"{label}: {QUERY_CLIENTS} query clients while the bulk runs, p50 / p99 ms", f"{p50b:.1f} / {p99b:.1f}",
        f"{len(busy)} queries, max {max(busy) * 1000:.0f} ms",
        "met" if p99b <= 1000 else "NOT met", "p99 <= 1000 ms")
    row(f"{label}: bulk request alone / with the queries, tokens/s",
        f"{bulk_tokens / alone:.0f} / {bulk_tokens / with_q:.0f}",
        f"{alone:.1f} s / {with_q:.1f} s; kept {alone / with_q:.2f}x",
        "met" if alone / with_q >= 0.85 else "NOT met", ">= 0.85x")
    row(f"{label}: one request of mixed texts (10-500 tokens) alone, tokens/s", f"{mixed_tokens / mixed_s:.0f}",
        f"{mixed_s:.1f} s", "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="48 bulk texts instead of 128")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, small bulk: only proves the script works")
    ap.add_argument("--models-dir", default=os.environ.get("EMBEDAPI_BENCH_MODELS",
                                                            str(Path(tempfile.gettempdir()) / "embedapi-bench")))
    ap.add_argument("--only-default", action="store_true", help="skip the EMBEDAPI_QUERY_LANES=0 comparison")
    ap.add_argument("--also", action="append", default=[], metavar="VAR=VALUE[,VAR=VALUE]",
                    help="another server configuration to measure in the same run (repeatable)")
    ap.add_argument("--bulk-texts", type=int, default=0, help="texts in the bulk request (default 128, quick 48)")
    args = ap.parse_args()
    smoke = args.smoke
    shape = SMOKE_SHAPE if smoke else RURI_V3_SHAPES["ruri-v3-30m"]
    root = Path(args.models_dir) / ("smoke" if smoke else "real")
    paths = build_models(root, {"embed-30m": ("embedding", shape)})
    paths["embed"] = paths["embed-30m"]
    n_bulk = args.bulk_texts or (8 if smoke else (48 if args.quick else 128))
    bulk_len = 600 if smoke else 3300
    n_idle = 5 if smoke else 40

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(paths["embed"]))
    maker = TextMaker(tok)
    bulk_texts = [maker.make(bulk_len) for _ in range(n_bulk)]
    bulk_tokens = sum(maker.length(bulk_texts))
    query_texts = [maker.make(12) for _ in range(400)]
    queries = [body({"model": "bench/embed", "input": q, "input_type": "query"}) for q in query_texts]
    bulk = body({"model": "bench/embed", "input": bulk_texts, "input_type": "document"})
    toml = models_toml(paths, "embed", None, "auto")
    import random
    rng = random.Random(7)
    mixed_texts = [maker.make(rng.randint(10, 120 if smoke else 500)) for _ in range(20 if smoke else 400)]
    mixed_tokens = sum(maker.length(mixed_texts))
    mixed = body({"model": "bench/embed", "input": mixed_texts, "input_type": "document"})

    rows: list[tuple[str, ...]] = []

    def row(*cells: str) -> None:
        rows.append(cells)
        print("  " + " | ".join(cells), file=sys.stderr, flush=True)

    configs = [("default", {})]
    if not args.only_default:
        configs.append(("EMBEDAPI_QUERY_LANES=0", {"EMBEDAPI_QUERY_LANES": "0"}))
    for spec in args.also:
        configs.append((spec, dict(kv.split("=", 1) for kv in spec.split(","))))
    for label, env in configs:
        print(f"{label} ...", file=sys.stderr, flush=True)
        measure(toml, label, env, queries, bulk, bulk_tokens, n_idle, row, mixed, mixed_tokens)

    import torch
    print(f"embedapi fairness benchmark: {'smoke' if smoke else 'ruri-v3-30m'} shape, 1 worker, 2 torch threads, "
          f"dtype auto, {os.cpu_count()} CPUs ({cpu_name()}), torch {torch.__version__}; bulk request of "
          f"{n_bulk} texts, {bulk_tokens} tokens (EMBEDAPI_MAX_REQUEST_TOKENS=1000000 to allow it)")
    head = ("measurement", "figure", "detail", "result", "target")
    widths = [max(len(r[i]) if i < len(r) else 0 for r in [head, *rows]) for i in range(len(head))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        cells = list(r) + [""] * (len(head) - len(r))
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
