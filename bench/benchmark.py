#!/usr/bin/env python
"""Side-by-side benchmark: raw sentence-transformers in-process vs the real embedapi Gunicorn server.

Random-weight models with the real Ruri v3 shapes (tests/synthetic_models.py: vocab 102400,
ruri-v3-30m / -310m, reranker-310m as a one-label classifier) are built once and cached. Then,
in one run on the same machine, it measures and prints:

  1. raw SentenceTransformer.encode throughput at its best batch size (float32 and bfloat16)
  2. the server (defaults: 1 worker, 2 torch threads, two forward passes side by side) with 32
     concurrent clients, one ~50-token text each; also with 2 workers x 1 thread (not the default)
  3. the same with EMBEDAPI_BATCHING=false (one request per forward pass: the seeds' design)
  4. one request of 1,000 texts of mixed lengths (10-500 tokens) vs raw encode of the same texts
  5. p50/p99 latency of one short request on an idle server vs raw single encode
  6. rerank: one query x 100 documents, server vs raw CrossEncoder.predict
  7. worker RSS before and after 5,000 requests (once warm)
  + the bfloat16 accuracy cost (cosine vs float32 over 200 fixed texts) and one 8,192-token input;
  + (2) "paired": (1)'s winning float32 configuration and the server measured alternately, the same
    number of times (--rounds), so both see the same stretch of a shared machine;
  + (2) "ceiling": the server's own forward pass alone (two 1-thread passes, no HTTP), what (2)
    could reach if request handling were free.

    /work/venv/bin/python bench/benchmark.py            # full run (about 20 minutes on 2 cores)
    /work/venv/bin/python bench/benchmark.py --quick    # short trial run
    /work/venv/bin/python bench/benchmark.py --quick --smoke   # tiny shapes: proves the script works

Throughput figures are best-of-N repetitions (the machine may be shared). Nothing here is
asserted: the table reports ratios and whether each target is met. Each run also saves its results
(`--out`, default bench/out/: benchmark-<mode>-<UTC time>.json and the table as .md); bench/chart.py
draws a results file as the chart in docs/benchmarks.md, which also holds the method and past runs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ORIGINAL_ENV = dict(os.environ)
if "--raw-probe" not in sys.argv:
    # Raw references run with the server's process settings (embedapi.backends.pytorch sets its OpenMP wait policy
    # before torch loads); a `--raw-probe` subprocess measures (1) again with torch's own defaults.
    import embedapi.backends.pytorch  # noqa: E402,F401

import numpy as np  # noqa: E402
import torch  # noqa: E402

from chart import save_results  # noqa: E402  (bench/chart.py: the results file and its chart)
from tests.server import GunicornServer, call  # noqa: E402
from tests.synthetic_models import RURI_V3_SHAPES, build_embedding_model, build_reranker, build_tokenizer, \
    corpus  # noqa: E402

TORCH_THREADS = 2
SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   vocab_size=102400)


# -- models ------------------------------------------------------------------------------
def build_models(root: Path, shapes: dict[str, tuple[str, dict[str, int]]]) -> dict[str, Path]:
    """Build (once; cached under `root`) the tokenizer and each requested model."""
    root.mkdir(parents=True, exist_ok=True)
    tok = root / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        build_tokenizer(tok)
    out = {}
    for name, (kind, shape) in shapes.items():
        path = root / name
        if not (path / ".complete").exists():
            started = time.monotonic()
            print(f"building {name} ({kind}, {shape}) in {path} ...", file=sys.stderr, flush=True)
            if kind == "embedding":
                build_embedding_model(path, tokenizer_dir=tok, **shape)
            else:
                build_reranker(path, tokenizer_dir=tok, **shape)
            (path / ".complete").write_text("ok")
            print(f"  built in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
        out[name] = path
    return out


# -- texts -------------------------------------------------------------------------------
class TextMaker:
    """Texts of a chosen token length (special tokens included), cut from a shuffled corpus stream."""

    def __init__(self, tokenizer: Any, seed: int = 0) -> None:
        rng = random.Random(seed)
        lines = corpus()
        stream = "".join(rng.choice(lines) for _ in range(4000))
        self.tok = tokenizer
        self.ids = tokenizer(stream, add_special_tokens=False, verbose=False)["input_ids"]
        self.rng = rng

    def make(self, tokens: int) -> str:
        n = max(1, tokens - 2)
        start = self.rng.randrange(0, len(self.ids) - n)
        return self.tok.decode(self.ids[start:start + n])

    def length(self, texts: list[str]) -> list[int]:
        return [len(x) for x in self.tok(texts)["input_ids"]]


# -- a lean HTTP client (keep-alive, pre-built requests) so the load generator costs little CPU --
class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=600)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        req = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        for attempt in (0, 1):
            if self.sock is None:
                self.sock = self._connect()
            try:
                self.sock.sendall(req)
                return self._read()
            except (ConnectionError, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _read(self) -> tuple[int, bytes]:
        assert self.sock is not None
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        while len(rest) < length:
            chunk = self.sock.recv(max(65536, length - len(rest)))
            if not chunk:
                raise ConnectionError("server closed the connection mid-body")
            rest += chunk
        if close:
            self.close()
        return status, rest[:length]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def body(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def load_run(port: int, bodies: list[bytes], clients: int, path: str = "/v1/embeddings") -> float:
    """`clients` threads with one keep-alive connection each send every body once; returns seconds."""
    lock = threading.Lock()
    next_i = [0]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def worker() -> None:
        conn = Conn(port)
        barrier.wait()
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= len(bodies):
                break
            status, payload = conn.post(path, bodies[i])
            if status != 200:
                errors.append(f"{status}: {payload[:200]!r}")
                break
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join(900)
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return seconds


# -- helpers -----------------------------------------------------------------------------
def best_of(reps: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(reps))


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM", "RssAnon")):
            name, value = line.split(":")
            out[name] = int(value.split()[0]) * 1024
    return out


def mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB"


def models_toml(paths: dict[str, Path], embed: str, rerank: str | None, dtype: str) -> Path:
    text = f'[[models]]\nid = "bench/embed"\nsource = "{paths[embed]}"\nkind = "embedding"\ndtype = "{dtype}"\n'
    if rerank:
        text += f'\n[[models]]\nid = "bench/rerank"\nsource = "{paths[rerank]}"\nkind = "rerank"\ndtype = "{dtype}"\n'
    fd, name = tempfile.mkstemp(prefix="embedapi-bench-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(name)


def start_server(toml: Path, **env: str) -> GunicornServer:
    server_env = {"EMBEDAPI_TORCH_THREADS": str(TORCH_THREADS), "EMBEDAPI_THREADS": "64",
                  "EMBEDAPI_MAX_INPUTS": "2048", **env}
    return GunicornServer(toml, workers=1, env=server_env).start(timeout=600)


def raw_encode_best(st: Any, texts: list[str], reps: int) -> dict[str, tuple[float, int]]:
    """Best texts/s of SentenceTransformer.encode over batch sizes, float32 and bfloat16."""
    out: dict[str, tuple[float, int]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = st if dtype == torch.float32 else copy.deepcopy(st).to(dtype)  # st itself stays float32
        best = (0.0, 0)
        for bs in (16, 32, 64, 128):
            model.encode(texts[:bs], batch_size=bs)
            secs = best_of(reps, lambda: timed(lambda: model.encode(texts, batch_size=bs)))
            best = max(best, (len(texts) / secs, bs))
        out[str(dtype).removeprefix("torch.")] = best
        del model
    return out


def short_texts_for(tokenizer: Any, n: int) -> list[str]:
    texts = TextMaker(tokenizer)
    return [texts.make(random.Random(i).randint(45, 55)) for i in range(n)]


def raw_probe(model_dir: str, n: int, reps: int, batch_size: int = 0) -> None:
    """(1) with torch's default process settings; with `batch_size`, one float32 figure at that size."""
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(TORCH_THREADS)
    st = SentenceTransformer(model_dir, device="cpu")
    texts = short_texts_for(st.tokenizer, n)
    if batch_size:
        print(json.dumps(raw_encode_at(st, texts, batch_size, reps)))
    else:
        print(json.dumps(raw_encode_best(st, texts, reps)))


def raw_encode_at(st: Any, texts: list[str], batch_size: int, reps: int) -> float:
    """texts/s of SentenceTransformer.encode at one batch size (after a warm-up batch)."""
    st.encode(texts[:batch_size], batch_size=batch_size)
    return len(texts) / best_of(reps, lambda: timed(lambda: st.encode(texts, batch_size=batch_size)))


class RawReference:
    """The (1) float32 baseline's winning configuration (process settings, batch size), measured again
    on demand: in this process for the server's OpenMP settings, in a subprocess for torch's defaults."""

    def __init__(self, st: Any, model_dir: Path, texts: list[str], setting: str, batch_size: int) -> None:
        self.st, self.model_dir, self.texts = st, model_dir, texts
        self.setting, self.batch_size = setting, batch_size

    def measure(self) -> float:
        if self.setting == "server's OpenMP settings":
            return raw_encode_at(self.st, self.texts, self.batch_size, 1)
        probe = subprocess.run([sys.executable, __file__, "--raw-probe", str(self.model_dir), str(len(self.texts)),
                                "1", str(self.batch_size)], capture_output=True, text=True, check=True, env=ORIGINAL_ENV)
        return float(probe.stdout.strip().splitlines()[-1])


def paired_rounds(raw: RawReference, port: int, bodies: list[bytes], rounds: int) -> list[tuple[float, float]]:
    """Raw encode and the server (32 clients) measured alternately, `rounds` times each: both see the
    same stretch of a shared machine and the same number of repetitions. Returns (raw, server) texts/s."""
    out = []
    for _ in range(rounds):
        r = raw.measure()
        out.append((r, len(bodies) / load_run(port, bodies, 32)))
    return out


def paired_row(pairs: list[tuple[float, float]]) -> tuple[str, str, str]:
    """Table cells for paired rounds: raw and server as the best of the rounds followed by each round in
    parentheses, then the best/best ratio and the ratio of each round."""
    raws, srvs = [p[0] for p in pairs], [p[1] for p in pairs]
    per_round = "/".join(f"{s / r:.2f}" for r, s in pairs)
    return (f"{max(raws):.1f} ({'/'.join(f'{r:.0f}' for r in raws)})",
            f"{max(srvs):.1f} ({'/'.join(f'{s:.0f}' for s in srvs)})",
            f"{max(srvs) / max(raws):.2f}x best/best; rounds {per_round}")


def forward_ceiling(model_dir: Path, texts: list[str], dtype: torch.dtype, seconds: float) -> tuple[float, int]:
    """The server's own forward pass alone (traced runner, no HTTP, no queue): two 1-thread passes side
    by side, as the default worker's two lanes under load, at batch sizes 8/16/32. Returns the best
    texts/s and its batch size: what (2) could reach if request handling cost nothing."""
    from embedapi.backends import pytorch as backend
    from embedapi.config import ModelSpec
    model = backend.load(ModelSpec(id="ceiling", source=str(model_dir), kind="embedding"), "cpu")
    runner = backend.TorchRunner(model, "cpu", dtype, "embedding", trace=True)
    from backends import side_by_side_rate  # bench/backends.py: passes side by side, as the engine's lanes

    best = (0.0, 0)
    for bs in (8, 16, 32):
        ids = [model.tokenizer(t)["input_ids"] for t in texts[:bs]]
        best = max(best, (side_by_side_rate(runner, ids, 1, 2, seconds), bs))
    return best


# -- the run -----------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer texts and repetitions, 30m-shape reranker")
    ap.add_argument("--smoke", action="store_true", help="tiny model shapes: only proves the script works")
    ap.add_argument("--models-dir", default=os.environ.get("EMBEDAPI_BENCH_MODELS",
                                                            str(Path(tempfile.gettempdir()) / "embedapi-bench")))
    ap.add_argument("--no-310m", action="store_true", help="skip the 310m-shape accuracy check")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per throughput figure (best is kept)")
    ap.add_argument("--rounds", type=int, default=0, help="paired raw/server rounds for (2) (default 3, quick 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out",
                    help="where the results go (JSON and the table; bench/chart.py draws the JSON)")
    ap.add_argument("--raw-probe", nargs="+", metavar="ARG", help=argparse.SUPPRESS)  # MODEL_DIR N REPS [BS]
    args = ap.parse_args()
    if args.raw_probe:
        model_dir, n, probe_reps, *bs = args.raw_probe
        raw_probe(model_dir, int(n), int(probe_reps), int(bs[0]) if bs else 0)
        return 0

    quick, smoke = args.quick or args.smoke, args.smoke
    run_started = datetime.now(timezone.utc)
    reps = args.reps or (1 if quick else 2)
    rounds = args.rounds or (1 if quick else 3)
    n_short = 64 if smoke else (256 if quick else 512)          # texts for (1)
    n_server = 96 if smoke else (640 if quick else 1536)         # requests for (2)
    n_nobatch = 64 if smoke else (256 if quick else 512)         # requests for (3)
    n_mixed = 40 if smoke else (200 if quick else 1000)          # texts for (4)
    n_latency = 20 if smoke else (100 if quick else 300)         # requests for (5)
    n_docs = 100
    n_soak = 200 if smoke else (1000 if quick else 5000)         # requests for (7)
    n_accuracy = 200
    max_mixed = 120 if smoke else 500

    embed_shape = SMOKE_SHAPE if smoke else RURI_V3_SHAPES["ruri-v3-30m"]
    rerank_shape = SMOKE_SHAPE if smoke else (RURI_V3_SHAPES["ruri-v3-30m"] if quick
                                              else RURI_V3_SHAPES["ruri-v3-reranker-310m"])
    rerank_size = "30m" if (quick or smoke) else "310m"
    shapes: dict[str, tuple[str, dict[str, int]]] = {  # cached by name: the name says the shape
        "embed-30m": ("embedding", embed_shape),
        f"rerank-{rerank_size}": ("rerank", rerank_shape),
    }
    with_310m = not (quick or args.no_310m)
    if with_310m:
        shapes["embed-310m"] = ("embedding", RURI_V3_SHAPES["ruri-v3-310m"])
    tag = "smoke" if smoke else ""
    root = Path(args.models_dir) / (tag or "real")
    paths = build_models(root, shapes)
    paths["embed"], paths["rerank"] = paths["embed-30m"], paths[f"rerank-{rerank_size}"]
    rerank_name = ("smoke" if smoke else ("30m-shape" if quick else "reranker-310m-shape"))

    from sentence_transformers import CrossEncoder, SentenceTransformer
    torch.set_num_threads(TORCH_THREADS)
    rows: list[tuple[str, str, str, str, str]] = []  # what, raw, server, ratio/figure, target
    notes: list[str] = []

    def row(what: str, raw: str, server: str, ratio: str, target: str = "") -> None:
        rows.append((what, raw, server, ratio, target))
        print(f"  {what}: raw {raw} | server {server} | {ratio} {target}", file=sys.stderr, flush=True)

    st = SentenceTransformer(str(paths["embed"]), device="cpu")
    texts = TextMaker(st.tokenizer)
    short_texts = short_texts_for(st.tokenizer, n_short)
    lens = texts.length(short_texts)
    notes.append(f"short texts: {len(short_texts)} of {min(lens)}-{max(lens)} tokens (mean {np.mean(lens):.0f})")
    mixed_rng = random.Random(7)
    mixed = [texts.make(mixed_rng.randint(10, max_mixed)) for _ in range(n_mixed)]
    mlens = texts.length(mixed)
    notes.append(f"mixed texts: {len(mixed)} of {min(mlens)}-{max(mlens)} tokens (mean {np.mean(mlens):.0f})")
    tiny = texts.make(12)
    query = texts.make(16)
    docs = [texts.make(random.Random(100 + i).randint(30, 90)) for i in range(n_docs)]

    # (1) raw encode throughput, best batch size, float32 and bfloat16 -------------------------
    print("(1) raw encode ...", file=sys.stderr, flush=True)
    # This process runs with the server's OpenMP settings; a subprocess measures again with torch's
    # defaults (the environment as given). The better of the two is the baseline.
    tuned = raw_encode_best(st, short_texts, reps)
    probe = subprocess.run([sys.executable, __file__, "--raw-probe", str(paths["embed"]), str(n_short), str(reps)],
                           capture_output=True, text=True, check=True, env=ORIGINAL_ENV)
    default = {k: tuple(v) for k, v in json.loads(probe.stdout.strip().splitlines()[-1]).items()}
    for dtype in ("float32", "bfloat16"):
        for label, res in (("torch defaults", default), ("server's OpenMP settings", tuned)):
            row(f"(1) raw encode, ~50-token texts/s, {dtype}, {label}", f"{res[dtype][0]:.1f} (bs {res[dtype][1]})",
                "", "")
    raw32 = max(default["float32"][0], tuned["float32"][0])
    raw16 = max(default["bfloat16"][0], tuned["bfloat16"][0])
    winner = max(("torch defaults", default), ("server's OpenMP settings", tuned), key=lambda x: x[1]["float32"][0])
    raw_ref = RawReference(st, paths["embed"], short_texts, winner[0], int(winner[1]["float32"][1]))
    # For reference only (not the baseline): one torch thread, as each of the server's side-by-side passes.
    torch.set_num_threads(1)
    one = raw_encode_best(st, short_texts, reps)
    torch.set_num_threads(TORCH_THREADS)
    row("(1) raw encode, 1 torch thread (reference), float32 / bfloat16",
        f"{one['float32'][0]:.1f} (bs {one['float32'][1]}) / {one['bfloat16'][0]:.1f} (bs {one['bfloat16'][1]})", "", "")
    row("(1) baseline: best raw float32 / bfloat16", f"{raw32:.1f} / {raw16:.1f}", "",
        f"bf16 = {raw16 / raw32:.2f}x fp32")
    print("forward-only ceiling ...", file=sys.stderr, flush=True)
    ceiling = {name: forward_ceiling(paths["embed"], short_texts, dt, 1.5 if quick else 4.0)
               for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}

    # bf16 accuracy cost ---------------------------------------------------------------------
    acc_rng = random.Random(11)
    acc_texts = [texts.make(acc_rng.randint(8, 200)) for _ in range(n_accuracy)]

    def cosines(model: Any) -> tuple[float, float]:
        ref = model.encode(acc_texts, batch_size=32, normalize_embeddings=True)
        low = copy.deepcopy(model).to(torch.bfloat16).encode(acc_texts, batch_size=32, normalize_embeddings=True)
        low = low.astype(np.float32)
        cos = np.sum(ref * low, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(low, axis=1))
        return float(cos.min()), float(cos.mean())

    lo, mean = cosines(st)
    accuracy = [f"30m shape: cosine(bf16, fp32) over {n_accuracy} texts min {lo:.5f} mean {mean:.5f}"]

    # raw references for (4), (5), (6) ----------------------------------------------------------
    print("raw references ...", file=sys.stderr, flush=True)
    st.encode(mixed[:64], batch_size=32)
    raw_mixed = len(mixed) / best_of(reps, lambda: timed(lambda: st.encode(mixed, batch_size=32)))
    raw_single = []
    for _ in range(10):
        st.encode([tiny])
    for _ in range(n_latency):
        raw_single.append(timed(lambda: st.encode([tiny])))
    raw_vec = st.encode([tiny], normalize_embeddings=True)[0]
    ce = CrossEncoder(str(paths["rerank"]), device="cpu")
    pairs = [(query, d) for d in docs]
    ce.predict(pairs[:8])
    raw_out: list[Any] = []
    raw_rerank = best_of(reps, lambda: timed(lambda: raw_out.append(ce.predict(pairs, batch_size=32))))
    raw_scores = raw_out[-1]
    del ce
    if with_310m:
        print("310m accuracy ...", file=sys.stderr, flush=True)
        big = SentenceTransformer(str(paths["embed-310m"]), device="cpu")
        lo, mean = cosines(big)
        accuracy.append(f"310m shape: cosine(bf16, fp32) over {n_accuracy} texts min {lo:.5f} mean {mean:.5f}")
        del big
    gc.collect()  # `st` stays: raw_ref measures (1) again between server rounds

    # server float32, batching on: (2), (4), (5), (6), (7), 8192 tokens ---------------------------
    print("server float32 ...", file=sys.stderr, flush=True)
    toml32 = models_toml(paths, "embed", "rerank", "float32")
    server = start_server(toml32)
    try:
        port = server.port
        pid = server.worker_pids()[0]
        one_bodies = [body({"model": "bench/embed", "input": t}) for t in short_texts]
        load_run(port, one_bodies[:64], 32)  # warm-up
        srv_bodies = [one_bodies[i % len(one_bodies)] for i in range(n_server)]
        secs = best_of(reps, lambda: load_run(port, srv_bodies, 32))
        srv32 = n_server / secs
        row("(2) server, 32 clients x 1 text/request, float32, texts/s", f"{raw32:.1f}", f"{srv32:.1f}",
            f"{srv32 / raw32:.2f}x raw fp32", "target >= 0.9x")
        pairs = paired_rounds(raw_ref, port, srv_bodies, rounds)
        row(f"(2) paired: raw fp32 (bs {raw_ref.batch_size}, {raw_ref.setting}) and server alternated, "
            f"{rounds} rounds, float32", *paired_row(pairs), "target >= 0.9x")

        conn = Conn(port)
        mixed_body = body({"model": "bench/embed", "input": mixed})
        status, payload = conn.post("/v1/embeddings", body({"model": "bench/embed", "input": mixed[:64]}))
        assert status == 200, payload[:300]
        secs = best_of(reps, lambda: timed(lambda: conn.post("/v1/embeddings", mixed_body)))
        srv_mixed = n_mixed / secs
        row(f"(4) one request of {n_mixed} mixed texts (10-{max_mixed} tokens), texts/s", f"{raw_mixed:.1f}",
            f"{srv_mixed:.1f}", f"{srv_mixed / raw_mixed:.2f}x raw", "target >= 0.95x")

        tiny_body = body({"model": "bench/embed", "input": tiny})
        status, payload = conn.post("/v1/embeddings", tiny_body)
        vec = np.array(json.loads(payload)["data"][0]["embedding"], dtype=np.float32)
        notes.append(f"server vs raw vector (float32): max abs diff {np.abs(vec - raw_vec).max():.2e}")
        for _ in range(10):
            conn.post("/v1/embeddings", tiny_body)
        lat = [timed(lambda: conn.post("/v1/embeddings", tiny_body)) for _ in range(n_latency)]
        p50r, p99r = percentile(raw_single, 50) * 1e3, percentile(raw_single, 99) * 1e3
        p50s, p99s = percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3
        row("(5) idle latency, one 12-token text, p50 ms", f"{p50r:.2f}", f"{p50s:.2f}",
            f"{p50s - p50r:+.2f} ms", "target <= +5 ms")
        row("(5) idle latency, one 12-token text, p99 ms", f"{p99r:.2f}", f"{p99s:.2f}", f"{p99s - p99r:+.2f} ms")

        rr_body = body({"model": "bench/rerank", "query": query, "documents": docs[:8], "raw_scores": True})
        conn.post("/v1/rerank", rr_body)  # warm
        rr_body = body({"model": "bench/rerank", "query": query, "documents": docs, "raw_scores": True})
        srv_out: list[tuple[int, bytes]] = []
        secs = best_of(reps, lambda: timed(lambda: srv_out.append(conn.post("/v1/rerank", rr_body))))
        status, payload = srv_out[-1]
        assert status == 200, payload[:300]
        got = {r["index"]: r["relevance_score"] for r in json.loads(payload)["results"]}
        logits = np.array([got[i] for i in range(n_docs)])
        notes.append(f"rerank logits server vs raw sigmoid-inverse: max abs diff "
                     f"{np.abs(1 / (1 + np.exp(-logits)) - raw_scores).max():.2e}")
        row(f"(6) rerank 1 query x {n_docs} docs ({rerank_name}), seconds", f"{raw_rerank:.3f}", f"{secs:.3f}",
            f"{raw_rerank / secs:.2f}x raw speed")

        # (7) RSS: warm first (every length bucket seen), then n_soak requests of varied shapes.
        soak_rng = random.Random(5)
        soak = []
        for i in range(n_soak):
            k = soak_rng.choice((1, 1, 1, 2, 4, 8))
            soak.append(body({"model": "bench/embed", "input": [short_texts[(i + j) % len(short_texts)]
                                                                for j in range(k)]}))
        load_run(port, soak[: max(200, n_soak // 10)], 32)
        before = proc_status(pid)
        load_run(port, soak, 32)
        after = proc_status(pid)
        growth = (after["VmRSS"] - before["VmRSS"]) / before["VmRSS"]
        row(f"(7) worker RSS before/after {n_soak} requests", mb(before["VmRSS"]), mb(after["VmRSS"]),
            f"{growth * 100:+.1f} %", "target <= +5 %")

        # One 8,192-token input (the model's max_seq_length) on the 30m shape.
        long_text = texts.make(9000)
        hwm = proc_status(pid)["VmHWM"]
        long_body = body({"model": "bench/embed", "input": long_text})
        started = time.perf_counter()
        status, payload = conn.post("/v1/embeddings", long_body)
        long_secs = time.perf_counter() - started
        used = json.loads(payload)["usage"]["total_tokens"] if status == 200 else None
        hwm2 = proc_status(pid)["VmHWM"]
        notes.append(f"one 8,192-token input: HTTP {status}, {used} tokens fed, {long_secs:.2f}s, "
                     f"worker peak RSS {mb(hwm)} -> {mb(hwm2)}")
        conn.close()
    finally:
        server.stop()
        toml32.unlink()

    # server float32, batching off: (3) -----------------------------------------------------------
    print("server float32, batching off ...", file=sys.stderr, flush=True)
    toml_e = models_toml(paths, "embed", None, "float32")
    server = start_server(toml_e, EMBEDAPI_BATCHING="false")
    try:
        load_run(server.port, one_bodies[:64], 32)
        nb_bodies = [one_bodies[i % len(one_bodies)] for i in range(n_nobatch)]
        secs = best_of(reps, lambda: load_run(server.port, nb_bodies, 32))
        nobatch = n_nobatch / secs
        row("(3) server, batching off, 32 clients, float32, texts/s", "", f"{nobatch:.1f}",
            f"(2)/(3) = {srv32 / nobatch:.2f}x", "target (2) >= 3x (3)")
        for name, (rate, bs) in ceiling.items():
            row(f"(2) ceiling: the server's forward alone, 2 x 1-thread passes, no HTTP, {name}, texts/s", "",
                f"{rate:.1f} (bs {bs})", f"{rate / raw32:.2f}x raw fp32; {rate / nobatch:.2f}x (3)")
    finally:
        server.stop()
        toml_e.unlink()

    # server dtype auto (bfloat16 where the CPU has it natively): (2) again --------------------------
    print("server dtype auto ...", file=sys.stderr, flush=True)
    toml_a = models_toml(paths, "embed", None, "auto")
    server = start_server(toml_a)
    try:
        status, _, info = call("GET", server.url + "/v1/models")
        dtype = info["data"][0]["dtype"]
        load_run(server.port, one_bodies[:64], 32)
        secs = best_of(reps, lambda: load_run(server.port, srv_bodies, 32))
        srv_auto = n_server / secs
        # Without native bfloat16 (e.g. AVX2 only) `auto` is float32, and raw float32 is its own reference.
        raw_auto = raw16 if dtype == "bfloat16" else raw32
        row(f"(2) server, 32 clients, dtype auto ({dtype}), texts/s", f"{raw32:.1f}", f"{srv_auto:.1f}",
            f"{srv_auto / raw32:.2f}x raw fp32; {srv_auto / raw_auto:.2f}x raw {dtype}", "target >= 1.5x raw fp32")
        pairs = paired_rounds(raw_ref, server.port, srv_bodies, rounds)
        row(f"(2) paired: raw fp32 (bs {raw_ref.batch_size}, {raw_ref.setting}) and server alternated, "
            f"{rounds} rounds, dtype auto ({dtype})", *paired_row(pairs), "target >= 1.5x raw fp32")
        conn = Conn(server.port)
        conn.post("/v1/embeddings", body({"model": "bench/embed", "input": mixed[:64]}))
        secs = best_of(reps, lambda: timed(lambda: conn.post("/v1/embeddings", mixed_body)))
        conn.close()
        row(f"(4) one request of {n_mixed} mixed texts, dtype auto ({dtype}), texts/s", f"{raw_mixed:.1f}",
            f"{n_mixed / secs:.1f}", f"{n_mixed / secs / raw_mixed:.2f}x raw fp32")
    finally:
        server.stop()

    # not the default: two workers of one torch thread each (two GILs, two copies of the model) -------
    print("server dtype auto, 2 workers x 1 thread ...", file=sys.stderr, flush=True)
    server = GunicornServer(toml_a, workers=2, env={"EMBEDAPI_TORCH_THREADS": "1", "EMBEDAPI_THREADS": "64",
                                                    "EMBEDAPI_MAX_INPUTS": "2048"}).start(timeout=600)
    try:
        load_run(server.port, one_bodies[:64], 32)
        secs = best_of(reps, lambda: load_run(server.port, srv_bodies, 32))
        srv_2w = n_server / secs
        row(f"(2) server, 32 clients, dtype auto ({dtype}), 2 workers x 1 thread (not the default), texts/s",
            f"{raw32:.1f}", f"{srv_2w:.1f}", f"{srv_2w / raw32:.2f}x raw fp32")
    finally:
        server.stop()
        toml_a.unlink()

    # the table --------------------------------------------------------------------------------
    from embedapi.backends.pytorch import cpu_has_native_bf16  # loaded at the top already (not in --raw-probe)
    mode = "smoke" if smoke else ("quick" if quick else "full")
    header = (f"embedapi benchmark: {mode} run, "
              f"embedding model ruri-v3-30m shape{' (smoke: tiny)' if smoke else ''}, 1 worker, "
              f"{TORCH_THREADS} torch threads, 2 side-by-side passes, {os.cpu_count()} CPUs "
              f"({'native' if cpu_has_native_bf16() else 'no native'} bfloat16), torch {torch.__version__}, "
              f"best of {reps}")
    head = ("measurement", "raw", "server", "ratio", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = [header, "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|",
             *("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows),
             "", *(f"- {n}" for n in [*accuracy, *notes])]
    table = "\n".join(lines) + "\n"
    print()
    print(table, end="")
    saved = save_results(args.out, mode, header, head, rows, [*accuracy, *notes], table, run_started)
    print(f"results: {saved} (python bench/chart.py {saved} docs/benchmark-throughput.svg draws them)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
