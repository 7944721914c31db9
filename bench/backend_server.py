#!/usr/bin/env python
"""The server on each CPU backend (issue 16): start-up with and without the conversion cache, worker RSS,
and one bulk request on the 310m shape against raw float32 `SentenceTransformer.encode`.

For each configuration (torch, torch with EMBEDAPI_PREPACK=0, openvino) it starts the real server (1 worker, defaults) on the 30m shape with
an empty conversion cache, then again with the cache that start left, and reports the wall time from
starting Gunicorn to /ready and the worker's RSS once ready. Then, on the 310m shape, one request of
`--texts` texts of ~300 tokens per backend, against raw float32 encode (bs 32) of the same texts.

    .venv/bin/python bench/backend_server.py                 # 30m starts + 310m bulk of 256 texts
    .venv/bin/python bench/backend_server.py --texts 64      # a shorter 310m row
    .venv/bin/python bench/backend_server.py --no-310m

Throughput of many small requests on each backend: bench/request_path.py --tokens 50 --also
EMBEDAPI_BACKEND=torch. Forward passes alone: bench/backends.py. Nothing is asserted: figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bm  # noqa: E402
from fairness import cpu_name  # noqa: E402

import torch  # noqa: E402

# (label, backend, extra server environment): torch as it serves by default (linear weights prepacked), torch with
# EMBEDAPI_PREPACK=0 (plain nn.Linear), OpenVINO
CONFIGS = (("torch", "torch", {}), ("torch unpacked", "torch", {"EMBEDAPI_PREPACK": "0"}),
           ("openvino", "openvino", {}))


def start(toml: Path, backend: str, cache: Path, **env: str) -> tuple[object, float, str]:
    """(server, seconds from start to ready, worker RSS: all, and the anonymous part, which is the worker's
    own; the rest maps files, such as memory-mapped weights, which workers share)."""
    started = time.perf_counter()
    server = bm.start_server(toml, EMBEDAPI_BACKEND=backend, EMBEDAPI_CONVERSION_CACHE=str(cache), **env)
    seconds = time.perf_counter() - started
    status = bm.proc_status(server.worker_pids()[0])
    return server, seconds, f"{status['VmRSS'] / 2**20:.0f} MB (anonymous {status.get('RssAnon', 0) / 2**20:.0f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=256, help="texts of ~300 tokens in the 310m bulk request")
    ap.add_argument("--no-310m", action="store_true")
    ap.add_argument("--models-dir", default=os.environ.get("EMBEDAPI_BENCH_MODELS",
                                                            str(Path(tempfile.gettempdir()) / "embedapi-bench")))
    args = ap.parse_args()
    shapes = {"ruri-v3-30m": ("embedding", bm.RURI_V3_SHAPES["ruri-v3-30m"])}
    if not args.no_310m:
        shapes["embed-310m"] = ("embedding", bm.RURI_V3_SHAPES["ruri-v3-310m"])
    paths = bm.build_models(Path(args.models_dir) / "real", shapes)
    print(f"embedapi backends in the server: 1 worker, {bm.TORCH_THREADS} torch threads, dtype auto, "
          f"{os.cpu_count()} CPUs ({cpu_name()}), torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="embedapi-bs-") as tmp:
        toml = bm.models_toml(paths, "ruri-v3-30m", None, "auto")
        for name, backend, env in CONFIGS:
            cache = Path(tmp) / f"cache-{name.replace(' ', '-')}"
            for label in ("empty cache", "cached"):
                server, seconds, rss = start(toml, backend, cache, **env)
                server.stop()
                rows.append((f"30m shape, {name}, {label}: start to ready / worker RSS", f"{seconds:.1f} s / "
                             f"{rss}"))
        toml.unlink()
        if not args.no_310m:
            from sentence_transformers import SentenceTransformer
            torch.set_num_threads(bm.TORCH_THREADS)
            st = SentenceTransformer(str(paths["embed-310m"]), device="cpu")
            maker = bm.TextMaker(st.tokenizer)
            texts = [maker.make(300) for _ in range(args.texts)]
            st.encode(texts[:2], batch_size=2)
            raw = bm.timed(lambda: st.encode(texts, batch_size=32))
            del st
            rows.append((f"310m shape: raw float32 encode (bs 32) of {args.texts} texts of ~300 tokens",
                         f"{raw:.1f} s ({args.texts / raw:.2f} texts/s)"))
            toml = bm.models_toml(paths, "embed-310m", None, "auto")
            payload = bm.body({"model": "bench/embed", "input": texts})
            for name, backend, env in CONFIGS:
                # ~300-token texts: within EMBEDAPI_OPENVINO_MAX_TOKENS' default (512), so OpenVINO runs them
                server, seconds, rss = start(toml, backend, Path(tmp) / f"cache310-{name.replace(' ', '-')}", **env)
                try:
                    conn = bm.Conn(server.port)
                    conn.post("/v1/embeddings", bm.body({"model": "bench/embed", "input": texts[:2]}))
                    took = bm.timed(lambda: conn.post("/v1/embeddings", payload))
                    conn.close()
                    after = bm.proc_status(server.worker_pids()[0])
                    rss += (f", after the request {after['VmRSS'] / 2**20:.0f} MB "
                            f"(anonymous {after.get('RssAnon', 0) / 2**20:.0f})")
                finally:
                    server.stop()
                rows.append((f"310m shape: the server ({name}, dtype auto), one request of the same texts",
                             f"{took:.1f} s = {raw / took:.2f}x raw float32; start {seconds:.0f} s, RSS {rss}"))
            toml.unlink()
    print("| measurement | figure |\n|---|---|")
    for name, figure in rows:
        print(f"| {name} | {figure} |")
    print(json.dumps({"rows": rows}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
