"""Forward pass alone per backend, and bfloat16 fidelity, measured with the runners the server builds.

    python bench/backends.py [--quick] [--seconds S]   # markdown table: texts/s per backend x dtype x tokens x
                                                        # batch, one pass on 1 or 2 threads, and 2 passes side by
                                                        # side (the engine's lanes) on 1 thread each
    python bench/backends.py --fidelity [--quick]      # bfloat16 against float32 on the 30m embedding shape and
                                                        # the reranker-310m shape (random weights): cosine, scores,
                                                        # top-document changes in groups of 20
    python bench/backends.py --passes [--seconds S]    # OpenVINO float32, paired: batches cut into passes of
                                                        # PASS_TOKENS padded tokens (the runner's way) against
                                                        # whole batches, 2 passes side by side x 1 thread each;
                                                        # and each way's RssAnon in a fresh process
    python bench/backends.py --long [--shape S] [--widths 512,1024]  # one long row: OpenVINO bfloat16, torch
                                                        # bfloat16, torch autocast on float32 (the OpenVINO
                                                        # runner's long batches), torch float32: s/row, RssAnon
                                                        # growth, cosine to float32

Models are random-weight Ruri v3 shapes (tests/synthetic_models.py), built under --dir (default a temporary
directory). Runners come from embedapi.backends.load_runner, as the registry loads them (torch traced; OpenVINO
checked at load), so the figures are what the server's forward pass does without HTTP and queueing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from embedapi import backends  # noqa: E402
from embedapi.backends import pytorch  # noqa: E402
from embedapi.config import ModelSpec  # noqa: E402
from tests.synthetic_models import RURI_V3_SHAPES, build_embedding_model, build_reranker, build_tokenizer, \
    corpus  # noqa: E402


def _build(root: Path, name: str, kind: str, shape: dict[str, int]) -> Path:
    path = root / name
    if not (path / "config.json").exists():
        tok = root / "tokenizer"
        if not (tok / "tokenizer.json").exists():
            build_tokenizer(tok)
        (build_embedding_model if kind == "embedding" else build_reranker)(path, tokenizer_dir=tok, **shape)
    return path


def _runner(path: Path, kind: str, backend: str, dtype: str, threads: int, streams: int, cache: Path,
            prepack: bool = False) -> object:
    spec = ModelSpec(id=path.name, source=str(path), kind=kind, dtype=dtype)
    loaded = backends.load_runner(spec, "cpu", backend, trace=True, threads=threads, streams=streams,
                                  cache_root=str(cache), prepack=prepack)
    assert loaded.backend == backend, loaded.note
    return loaded.runner


def side_by_side_rate(runner: object, batch: list[list[int]], threads: int, passes: int,
                      seconds: float) -> float:
    """texts/s of `passes` threads each running `batch` over and over with `threads` torch threads."""
    counts = [0] * passes
    start = threading.Barrier(passes + 1)

    def lane(k: int) -> None:
        pytorch.use_threads(threads)
        for _ in range(2):
            runner.run(batch)
        start.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            runner.run(batch)
            counts[k] += len(batch)

    lanes = [threading.Thread(target=lane, args=(k,)) for k in range(passes)]
    for t in lanes:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in lanes:
        t.join()
    return sum(counts) / (time.perf_counter() - began)


def forward_table(root: Path, cache: Path, seconds: float, quick: bool) -> None:
    path = _build(root, "embed-30m", "embedding", RURI_V3_SHAPES["ruri-v3-30m"])
    rng = np.random.default_rng(0)
    tokens_list, batches = ((16, 50), (1, 8, 32)) if not quick else ((16,), (1, 8))
    dtypes = ("float32", "bfloat16") if pytorch.cpu_has_native_bf16() else ("float32",)
    print(f"forward alone, ruri-v3-30m shape, texts/s ({os.cpu_count()} CPUs, {seconds:g}s per cell)\n")
    print("| backend | dtype | tokens | batch | 1 pass, 1 thread | 1 pass, 2 threads | 2 passes x 1 thread |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    # "torch": the server's default torch runner (linear weights prepacked); "torch unpacked": EMBEDAPI_PREPACK=0
    for backend in ("torch unpacked", "torch", "openvino"):
        for dtype in dtypes:
            if backend.startswith("torch"):  # torch threads are per calling thread: one runner serves every column
                one = two = lanes = _runner(path, "embedding", "torch", dtype, 0, 1, cache,
                                            prepack=backend == "torch")
            else:  # OpenVINO threads belong to the compiled model: one per column, as the registry compiles it
                one = _runner(path, "embedding", backend, dtype, 1, 1, cache)
                two = _runner(path, "embedding", backend, dtype, 2, 1, cache)
                lanes = _runner(path, "embedding", backend, dtype, 2, 2, cache)
            for tokens in tokens_list:
                for bs in batches:
                    batch = [[int(i) for i in rng.integers(10, 2000, tokens)] for _ in range(bs)]
                    cells = (side_by_side_rate(one, batch, 1, 1, seconds),
                             side_by_side_rate(two, batch, 2, 1, seconds),
                             side_by_side_rate(lanes, batch, 1, 2, seconds))
                    print(f"| {backend} | {dtype} | {tokens} | {bs} | " + " | ".join(f"{c:.0f}" for c in cells)
                          + " |", flush=True)


_BULK = ((32, 50), (64, 30), (32, 120), (16, 250), (128, 16))  # (texts, tokens) of one pass: over PASS_TOKENS


def _anon_mb() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("RssAnon"))


def passes(root: Path, cache: Path, seconds: float, rounds: int = 2) -> None:
    """Speed, alternated in one process; then memory, each way in its own process (buffers only grow)."""
    from embedapi.backends import openvino_runner

    path = _build(root, "embed-30m", "embedding", RURI_V3_SHAPES["ruri-v3-30m"])
    if os.environ.get("_BENCH_PASSES_MEMORY"):  # the child: run every shape twice, print RssAnon before/after
        openvino_runner.PASS_TOKENS = int(os.environ["_BENCH_PASSES_MEMORY"])
        runner = _runner(path, "embedding", "openvino", "float32", 2, 2, cache)
        before = _anon_mb()
        for rows, tokens in _BULK * 2:
            runner.run([[10 + (i * 7 + j) % 1900 for j in range(tokens)] for i in range(rows)])
        print(f"{before} {_anon_mb()}")
        return
    runner = _runner(path, "embedding", "openvino", "float32", 2, 2, cache)
    whole, split = 1 << 30, openvino_runner.PASS_TOKENS
    rng = np.random.default_rng(0)
    print(f"OpenVINO float32, ruri-v3-30m shape, 2 passes side by side x 1 thread, texts/s ({os.cpu_count()} CPUs, "
          f"{seconds:g}s per cell, {rounds} rounds alternated)\n")
    print(f"| texts x tokens | whole batch | passes of {split} tokens | ratio |")
    print("| --- | --- | --- | --- |")
    for rows, tokens in _BULK:
        batch = [[int(i) for i in rng.integers(10, 2000, tokens)] for _ in range(rows)]
        rates: dict[int, list[float]] = {whole: [], split: []}
        for _ in range(rounds):
            for budget in (whole, split):
                openvino_runner.PASS_TOKENS = budget
                rates[budget].append(side_by_side_rate(runner, batch, 1, 2, seconds))
        a, b = np.mean(rates[whole]), np.mean(rates[split])
        print(f"| {rows} x {tokens} | {a:.1f} | {b:.1f} | {b / a:.2f}x |", flush=True)
    openvino_runner.PASS_TOKENS = split
    for budget in (whole, split):
        env = {**os.environ, "_BENCH_PASSES_MEMORY": str(budget)}
        out = subprocess.run([sys.executable, __file__, "--passes", "--dir", str(root)], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        label = "whole batches" if budget == whole else f"passes of {split} tokens"
        print(f"RssAnon after loading / after every shape twice, {label}: {out[-2]} / {out[-1]} MB", flush=True)


LONG_WAYS = ("openvino bfloat16", "torch bfloat16", "torch autocast", "torch float32")


def long_batches(root: Path, cache: Path, seconds: float, shape: str, widths: list[int]) -> None:
    """One row of `width` tokens, one thread, each way in its own process (what a way keeps after its passes is
    its own): seconds per row, RssAnon growth over the passes, and cosine to torch float32. "openvino" serves
    every width (EMBEDAPI_OPENVINO_MAX_TOKENS=0); "torch autocast" is the float32 model under bfloat16 autocast,
    the way the OpenVINO runner runs batches past its limit."""
    path = _build(root, shape, "embedding", RURI_V3_SHAPES[shape])
    child = os.environ.get("_BENCH_LONG")
    if child:  # the child: one way, one width
        way, width = child.rsplit(" ", 1)
        pytorch.use_threads(1)
        spec = ModelSpec(id=path.name, source=str(path), kind="embedding", dtype="bfloat16")
        if way == "openvino bfloat16":
            runner = backends.load_runner(spec, "cpu", "openvino", trace=False, threads=1, streams=1,
                                          cache_root=str(cache), openvino_max_tokens=0).runner
        else:
            dt = pytorch.torch.bfloat16 if way == "torch bfloat16" else pytorch.torch.float32
            model = pytorch.load(spec, "cpu", dt, "sdpa")
            runner = pytorch.TorchRunner(model, "cpu", dt, "embedding", trace=False,
                                         autocast=pytorch.torch.bfloat16 if way == "torch autocast" else None)
        ids = [[1] + [100 + (i * 7) % 5000 for i in range(int(width) - 2)] + [2]]
        before = _anon_mb()
        row = runner.run(ids)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or n < 2:
            runner.run(ids)
            n += 1
        np.save(root / f"long-{way.replace(' ', '-')}-{width}.npy", row)
        print(f"{(time.perf_counter() - started) / n:.4f} {_anon_mb() - before}")
        return
    print(f"One row x tokens, 1 thread, {shape} shape, each way in its own process ({os.cpu_count()} CPUs, "
          f"native bfloat16: {pytorch.cpu_has_native_bf16()}): seconds per row / RssAnon growth MB / cosine to "
          "torch float32\n")
    print("| tokens | " + " | ".join(LONG_WAYS) + " |")
    print("|---" * (len(LONG_WAYS) + 1) + "|")
    for width in widths:
        cells = {}
        for way in LONG_WAYS:
            env = {**os.environ, "_BENCH_LONG": f"{way} {width}"}
            out = subprocess.run([sys.executable, __file__, "--long", "--shape", shape, "--seconds", str(seconds),
                                  "--dir", str(root)], env=env, check=True, capture_output=True, text=True)
            cells[way] = out.stdout.split()[-2:]
        want = np.load(root / f"long-torch-float32-{width}.npy")[0]
        row = []
        for way in LONG_WAYS:
            got = np.load(root / f"long-{way.replace(' ', '-')}-{width}.npy")[0]
            cos = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
            row.append(f"{cells[way][0]} s / +{cells[way][1]} / {cos:.7f}")
        print(f"| {width} | " + " | ".join(row) + " |", flush=True)


def fidelity(root: Path, cache: Path, quick: bool) -> None:
    """bfloat16 against float32 (sentence-transformers' own encode / predict) on each backend."""
    from sentence_transformers import CrossEncoder, SentenceTransformer

    lines = corpus()
    rng = np.random.default_rng(1)
    texts = [lines[i] * int(k) for i, k in zip(rng.integers(0, len(lines), 64), rng.integers(1, 8, 64))]
    path = _build(root, "embed-30m", "embedding", RURI_V3_SHAPES["ruri-v3-30m"])
    st = SentenceTransformer(str(path), device="cpu")
    want = st.encode(texts, batch_size=16, normalize_embeddings=False)
    ids = [st.tokenizer(t)["input_ids"] for t in texts]
    for backend in ("torch", "openvino"):
        runner = _runner(path, "embedding", backend, "bfloat16", 2, 1, cache)
        got = np.concatenate([runner.run(ids[i:i + 16]) for i in range(0, len(ids), 16)])
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        print(f"embedding 30m, {backend} bfloat16 vs float32 encode, {len(texts)} texts: "
              f"min cosine {cos.min():.6f}, mean {cos.mean():.6f}", flush=True)
    shape = RURI_V3_SHAPES["ruri-v3-30m" if quick else "ruri-v3-reranker-310m"]
    path = _build(root, "rerank-30m" if quick else "rerank-310m", "rerank", shape)
    ce = CrossEncoder(str(path), device="cpu")
    groups, per = (3, 20) if quick else (10, 20)
    queries = [lines[int(i)] for i in rng.integers(0, len(lines), groups)]
    docs = [[lines[int(i)] * int(k) for i, k in zip(rng.integers(0, len(lines), per), rng.integers(1, 10, per))]
            for _ in range(groups)]
    want = np.array([ce.predict([(q, d) for d in ds], batch_size=20) for q, ds in zip(queries, docs)])
    for backend in ("torch", "openvino"):
        runner = _runner(path, "rerank", backend, "bfloat16", 2, 1, cache) if backend == "torch" else None
        if runner is None:  # load_runner refuses a bfloat16 reranker that moves scores past 2e-3: build it directly
            from embedapi.backends import openvino_runner as ovr
            f32 = _runner(path, "rerank", "openvino", "float32", 2, 1, cache)
            import openvino as ov
            entry = next(p for p in cache.iterdir() if p.name.startswith(path.name + "-"))
            runner = ovr.OpenVINORunner(ovr._compile(ov.Core(), entry / "model.xml", pytorch.torch.bfloat16, 2, 1),
                                        "rerank", f32.names, [], f32.output_key, f32.module_output, f32.pad_id,
                                        f32.token_types, f32.max_seq_length, pytorch.torch.bfloat16, "hit")
        act = pytorch.activation(ce)
        got = []
        for q, ds in zip(queries, docs):
            enc = [ce.tokenizer(q, d)["input_ids"] for d in ds]
            got.append(act(runner.run(enc)))
        got = np.array(got)
        delta = np.abs(got - want)
        top = int((got.argmax(1) != want.argmax(1)).sum())
        print(f"rerank {'30m' if quick else '310m'}, {backend} bfloat16 vs float32 CrossEncoder.predict, "
              f"{groups * per} pairs: max |dscore| {delta.max():.4f}, mean {delta.mean():.4f}; "
              f"top document changed in {top} of {groups} groups of {per}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cells, shorter runs, smaller reranker")
    parser.add_argument("--seconds", type=float, default=0.0, help="per cell (default 3, --quick 0.5)")
    parser.add_argument("--fidelity", action="store_true", help="bfloat16 fidelity instead of the speed table")
    parser.add_argument("--passes", action="store_true", help="OpenVINO passes of PASS_TOKENS against whole batches")
    parser.add_argument("--long", action="store_true",
                        help="one long row per way: OpenVINO, torch bfloat16, torch autocast, torch float32")
    parser.add_argument("--shape", default="ruri-v3-30m", choices=sorted(RURI_V3_SHAPES), help="--long's shape")
    parser.add_argument("--widths", default="512,1024,2048,4096", help="--long's row lengths")
    parser.add_argument("--dir", type=Path, help="where the models and conversions go (kept between runs)")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="embedapi-bench-backends-"))
    cache = root / "conversion-cache"
    if args.fidelity:
        fidelity(root, cache, args.quick)
    elif args.long:
        long_batches(root, cache, args.seconds or 3.0, args.shape,
                     [int(w) for w in args.widths.split(",")])
    elif args.passes:
        passes(root, cache, args.seconds or 3.0)
    else:
        forward_table(root, cache, args.seconds or (0.5 if args.quick else 3.0), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
