#!/usr/bin/env python
"""The request path's cost: worker CPU per request split into the forward passes and the rest (issue 15).

Starts the real server (1 worker, defaults) on a synthetic model, drives it with wrk (`-t2 -c32`, one
distinct ~14-token text per request, keep-alive) and reads, before and after, the CPU time of every
thread of the worker from /proc/<pid>/task: threads named `embedapi-lane` (the forward lanes and the
OpenMP threads they start) and `embedapi-ov` (OpenVINO's) are the forward passes, everything else
(Gunicorn's main loop, the request threads, the tokenizer) is "the rest". It also reads `embedapi_handoff_seconds` (rows computed ->
response written) from /metrics, and measures raw float32 `SentenceTransformer.encode` (bs 32) of the
same texts in this process for the ratio, the idle single-request p50 against a raw single encode, and
the worker's RSS over the run.

    .venv/bin/python bench/request_path.py                       # 30m shape and the tiny test model
    .venv/bin/python bench/request_path.py --shape tiny --seconds 5
    .venv/bin/python bench/request_path.py --also EMBEDAPI_THREADS=16   # A/B, alternated (--rounds)
    .venv/bin/python bench/request_path.py --profile bench/out/flame   # py-spy record --gil / --idle too
    .venv/bin/python bench/request_path.py --shape 30m --ceiling       # and the forward pass alone, no HTTP

Needs `wrk` (apt-get install wrk) and, for --profile, py-spy (pip). Nothing is asserted: figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bm  # noqa: E402  (its models, texts, server and raw-encode helpers)
from fairness import cpu_name  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.server import call  # noqa: E402

CLIENTS = 32
TOKENS = 14
TICK = os.sysconf("SC_CLK_TCK")
LANE = "embedapi-"  # the engine's lanes (embedapi-lane, with the OpenMP threads they start) and OpenVINO's (embedapi-ov)
SHAPES = {"30m": ("embedding", bm.RURI_V3_SHAPES["ruri-v3-30m"]), "tiny": ("embedding", bm.SMOKE_SHAPE)}
WRK_LUA = """
local bodies = {}
local n = 0
for line in io.lines("%s") do n = n + 1; bodies[n] = line end
local i = 0
request = function()
  i = i %% n + 1
  return wrk.format("POST", "/v1/embeddings", {["Content-Type"] = "application/json"}, bodies[i])
end
"""


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the worker's threads so far: {"lanes": s, "rest": s}."""
    out = {"lanes": 0.0, "rest": 0.0, "rest_sys": 0.0, "main": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        seconds = (int(fields[11]) + int(fields[12])) / TICK
        out["lanes" if comm.startswith(LANE) else "rest"] += seconds
        if not comm.startswith(LANE):
            out["rest_sys"] += int(fields[12]) / TICK
        if task.name == str(pid):  # Gunicorn's main loop: accepting, collecting heads, keep-alive
            out["main"] += seconds
    return out


def exited_threads_cpu(pid: int) -> float:
    """CPU of the process as a whole (includes threads that have ended), to check the per-thread sum."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def batch_sizes(text: str, model: str) -> tuple[float, float]:
    """(passes, sequences) so far: embedapi_batch_size's count and sum for `model`."""
    out = [0.0, 0.0]
    for line in text.splitlines():
        if line.startswith(("embedapi_batch_size_count", "embedapi_batch_size_sum")) and f'model="{model}"' in line:
            out[line.startswith("embedapi_batch_size_sum")] = float(line.rsplit(" ", 1)[1])
    return out[0], out[1]


def handoff(url: str, model: str) -> tuple[float, float, dict[float, float], tuple[float, float]]:
    """(count, sum, cumulative buckets) of embedapi_handoff_seconds for `model`, and its batch_sizes."""
    text = call("GET", url + "/metrics")[2]
    if isinstance(text, bytes):
        text = text.decode()
    count = total = 0.0
    buckets: dict[float, float] = {}
    for line in str(text).splitlines():
        if not line.startswith("embedapi_handoff_seconds") or f'model="{model}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("embedapi_handoff_seconds_count"):
            count = value
        elif line.startswith("embedapi_handoff_seconds_sum"):
            total = value
        elif "_bucket" in line:
            le = re.search(r'le="([^"]+)"', line).group(1)  # type: ignore[union-attr]
            buckets[float(le)] = value
    return count, total, buckets, batch_sizes(str(text), model)


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile `q` of what was observed between two scrapes."""
    edges = sorted(after)
    n = after[edges[-1]] - before.get(edges[-1], 0.0)
    for le in edges:
        if after[le] - before.get(le, 0.0) >= q * n:
            return le
    return float("inf")


def wrk(port: int, lua: Path, seconds: float, clients: int = CLIENTS) -> tuple[int, int]:
    """Run wrk; (requests completed, non-2xx or socket errors)."""
    out = subprocess.run(["wrk", "-t2", f"-c{clients}", f"-d{seconds:g}s", "--latency", "-s", str(lua),
                          f"http://127.0.0.1:{port}"], capture_output=True, text=True, check=True).stdout
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errs:
        bad += sum(int(x) for x in errs.groups())
    return done, bad


def measure(server: Any, lua: Path, seconds: float, model: str, profile: str | None) -> dict[str, float]:
    """One wrk run against a warm server: throughput and the worker's CPU split, per request."""
    pid = server.worker_pids()[0]
    rss0 = bm.proc_status(pid)["VmRSS"]
    h0 = handoff(server.url, model)
    c0, p0 = thread_cpu(pid), exited_threads_cpu(pid)
    spy = None
    if profile:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        spy = [subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", f"{int(seconds)}",
                                 "--rate", "250", "--format", "raw", "--output", f"{profile}-{kind}.txt",
                                 *flags, "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for kind, flags in (("gil", ["--gil"]), ("idle", ["--idle"]))]
    started = time.perf_counter()
    done, bad = wrk(server.port, lua, seconds)
    wall = time.perf_counter() - started
    c1, p1 = thread_cpu(pid), exited_threads_cpu(pid)
    h1 = handoff(server.url, model)
    rss1 = bm.proc_status(pid)["VmRSS"]
    for proc in spy or []:
        proc.wait(60)
    lanes, rest = c1["lanes"] - c0["lanes"], c1["rest"] - c0["rest"]
    ended = max(0.0, (p1 - p0) - (lanes + rest))  # threads that ended during the run: not a lane
    n = max(1, done)
    hn = max(1.0, h1[0] - h0[0])
    return {"requests": done, "errors": bad, "rps": done / wall, "cpu_ms": 1000 * (p1 - p0) / n,
            "forward_ms": 1000 * lanes / n, "rest_ms": 1000 * (rest + ended) / n,
            "rest_sys_ms": 1000 * (c1["rest_sys"] - c0["rest_sys"]) / n,
            "main_ms": 1000 * (c1["main"] - c0["main"]) / n,
            "handoff_mean_ms": 1000 * (h1[1] - h0[1]) / hn,
            "handoff_p50_le_ms": 1000 * bucket_quantile(h0[2], h1[2], 0.5),
            "handoff_p99_le_ms": 1000 * bucket_quantile(h0[2], h1[2], 0.99),
            "rss_start_mb": rss0 / 2**20, "rss_end_mb": rss1 / 2**20,
            "mean_batch": (h1[3][1] - h0[3][1]) / max(1.0, h1[3][0] - h0[3][0])}


def idle_p50(port: int, bodies: list[bytes], n: int = 200) -> float:
    conn = bm.Conn(port)
    times = []
    for i in range(n):
        t = time.perf_counter()
        status, _ = conn.post("/v1/embeddings", bodies[i % len(bodies)])
        times.append(time.perf_counter() - t)
        assert status == 200
    conn.close()
    return 1000 * bm.percentile(times[20:], 50)


class Raw:
    """Raw float32 `SentenceTransformer.encode` in this process, the ratios' reference. Its rate is measured again
    before every round (no server running), so each server run is compared with the raw rate of the same minutes:
    on a shared machine the raw rate moved by 20 % within an hour (docs/benchmarks.md, 9th run)."""

    def __init__(self, model_dir: Path, texts: list[str]) -> None:
        from sentence_transformers import SentenceTransformer
        torch.set_num_threads(bm.TORCH_THREADS)
        self.st = SentenceTransformer(str(model_dir), device="cpu")
        self.texts = texts[:2048]
        self.st.encode(self.texts[:32], batch_size=32)

    def rate(self, reps: int = 1) -> float:
        """texts/s at bs 32 (best of `reps` passes over 2048 texts)."""
        return len(self.texts) / bm.best_of(reps, lambda: bm.timed(lambda: self.st.encode(self.texts, batch_size=32)))

    def single_p50(self) -> float:
        """p50 ms of one text encoded alone."""
        single = []
        for text in self.texts[:220]:
            t = time.perf_counter()
            self.st.encode([text], batch_size=1)
            single.append(time.perf_counter() - t)
        return 1000 * bm.percentile(single[20:], 50)


def forward_ceiling(model_dir: Path, tok: Any, texts: list[str], dtype: str, env: dict[str, str], batches: list[int],
                    seconds: float = 3.0) -> dict[int, float]:
    """texts/s of the server's own forward pass alone, as the default worker runs it under load: the runner
    embedapi.backends.load_runner builds for this configuration (its backend, the dtype, the conversion cache
    the server used), two passes side by side on one thread each, no HTTP and no queue, at each batch size
    (the server's mean batch and larger), on the same texts' ids."""
    from backends import side_by_side_rate  # bench/backends.py: passes side by side, as the engine's lanes
    from embedapi import backends
    from embedapi.config import ModelSpec, Settings
    settings = Settings.from_env({**os.environ, **env})
    spec = ModelSpec(id="ceiling", source=str(model_dir), kind="embedding", dtype=dtype)
    # streams: OpenVINO's, one per pass the default worker may run at once (2 lanes and the query lane)
    before = dict(os.environ)
    loaded = backends.load_runner(spec, "cpu", settings.backend, trace=settings.trace, threads=bm.TORCH_THREADS,
                                  streams=3, cache_root=settings.conversion_cache_root, prepack=settings.prepack,
                                  openvino_max_tokens=settings.openvino_max_tokens)
    # the oneDNN cache bounds a load sets (pytorch.bound_onednn_caches) are the server's to set, not its children's
    os.environ.clear()
    os.environ.update(before)
    out = {}
    for bs in batches:
        ids = [tok(t)["input_ids"] for t in texts[:bs]]
        out[bs] = side_by_side_rate(loaded.runner, ids, 1, 2, seconds)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["30m", "tiny", "both"], default="both")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each wrk run")
    ap.add_argument("--rounds", type=int, default=1, help="wrk runs per configuration (alternated with --also)")
    ap.add_argument("--also", action="append", default=[], metavar="VAR=VAL",
                    help="a second server configuration, measured alternately with the default")
    ap.add_argument("--profile", metavar="PREFIX", help="py-spy raw stacks (--gil, --idle) of the first run")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="tokens per text (special tokens included)")
    ap.add_argument("--ceiling", action="store_true",
                    help="also the forward pass alone per configuration (no HTTP): what the server could reach")
    ap.add_argument("--models-dir", default=os.environ.get("EMBEDAPI_BENCH_MODELS",
                                                            str(Path(tempfile.gettempdir()) / "embedapi-bench")))
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench/request_path.py needs wrk: apt-get install wrk")

    shapes = ["30m", "tiny"] if args.shape == "both" else [args.shape]
    names = {"30m": "ruri-v3-30m", "tiny": "smoke-embed"}
    paths = bm.build_models(Path(args.models_dir) / "real",
                            {names[s]: SHAPES[s] for s in shapes if s == "30m"}) if "30m" in shapes else {}
    if "tiny" in shapes:
        paths.update(bm.build_models(Path(args.models_dir) / "smoke", {names["tiny"]: SHAPES["tiny"]}))
    configs: list[tuple[str, dict[str, str]]] = [("default", {})]
    for extra in args.also:
        env = dict(kv.split("=", 1) for kv in extra.split(","))
        configs.append((extra, env))

    print(f"embedapi request-path benchmark: 1 worker, {bm.TORCH_THREADS} torch threads, dtype {args.dtype}, "
          f"{os.cpu_count()} CPUs ({cpu_name()}), torch {torch.__version__}, Python {sys.version.split()[0]}; "
          f"wrk -t2 -c{CLIENTS}, one distinct ~{args.tokens}-token text per request, {args.seconds:g} s per run")
    rows = []
    ceilings: list[tuple[str, str, dict[str, float], float, int, dict[int, float]]] = []
    for shape in shapes:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(paths[names[shape]]))
        maker = bm.TextMaker(tok)
        texts = [maker.make(args.tokens) for _ in range(20000)]
        lengths = maker.length(texts[:500])
        bodies = [json.dumps({"model": "bench/embed", "input": t}, ensure_ascii=False) for t in texts]
        with tempfile.TemporaryDirectory(prefix="embedapi-rp-") as tmp:
            data = Path(tmp) / "bodies.txt"
            data.write_text("\n".join(bodies) + "\n", encoding="utf-8")
            lua = Path(tmp) / "bodies.lua"
            lua.write_text(WRK_LUA % data)
            raw = Raw(paths[names[shape]], texts)
            raw_single = raw.single_p50()
            raw_rates: list[float] = []
            toml = bm.models_toml(paths, names[shape], None, args.dtype)
            results: dict[str, list[dict[str, float]]] = {c: [] for c, _ in configs}
            idle: dict[str, float] = {}
            for r in range(args.rounds):
                raw_rates.append(raw.rate(2))
                for label, env in configs:
                    server = bm.start_server(toml, **env)
                    try:
                        if r == 0:
                            idle[label] = idle_p50(server.port, [b.encode() for b in bodies[:200]])
                        wrk(server.port, lua, 3)  # warm: threads started, caches filled
                        prof = f"{args.profile}-{shape}-{label.replace('=', '_')}" if args.profile and r == 0 else None
                        results[label].append({**measure(server, lua, args.seconds, "bench/embed", prof),
                                               "raw": raw_rates[-1]})
                    finally:
                        server.stop()
            toml.unlink()
            del raw
        raw_rate = float(np.median(raw_rates))
        for label, runs in results.items():
            best = max(runs, key=lambda m: m["rps"] / m["raw"])  # the best ratio to the raw rate of its round
            rows.append((shape, label, best, raw_rate, raw_single, idle[label], np.mean(lengths), runs))
            if args.ceiling:
                mean_batch = max(1, round(float(np.mean([m["mean_batch"] for m in runs]))))
                rates = forward_ceiling(paths[names[shape]], tok, texts, args.dtype, dict(configs)[label],
                                        sorted({mean_batch, 32}))
                ceilings.append((shape, label, best, raw_rate, mean_batch, rates))

    print("Each round measures raw float32 encode (bs 32) first, then each configuration; 'x raw' is a run's req/s over "
          "its round's raw rate: the best run, then every run in round order. Other columns are the best run's.")
    print("| shape | config | req/s | x raw fp32 bs32 | worker CPU ms/req | forward | rest (kernel; main loop) | "
          "hand-off mean / p50<= / "
          "p99<= ms | idle p50 ms (raw single) | RSS start -> end MB | mean batch | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, label, m, raw_rate, raw_single, idle_ms, tokens, runs in rows:
        each = "/".join(f"{x['rps']:.0f}" for x in runs)
        ratios = "/".join(f"{x['rps'] / x['raw']:.2f}" for x in runs)
        raws = "/".join(f"{x['raw']:.0f}" for x in runs)
        print(f"| {shape} (~{tokens:.0f} tok) | {label} | {m['rps']:.0f} ({each}) | {m['rps'] / m['raw']:.2f}x "
              f"({ratios}; raw {raws}/s) | {m['cpu_ms']:.2f} | {m['forward_ms']:.2f} | "
              f"{m['rest_ms']:.2f} ({m['rest_sys_ms']:.2f}; {m['main_ms']:.2f}) | "
              f"{m['handoff_mean_ms']:.2f} / {m['handoff_p50_le_ms']:.1f} / {m['handoff_p99_le_ms']:.1f} | "
              f"{idle_ms:.2f} ({raw_single:.2f}) | {m['rss_start_mb']:.0f} -> {m['rss_end_mb']:.0f} | {m['mean_batch']:.1f} | {m['errors']} |")
    if ceilings:
        print()
        print("Forward pass alone (--ceiling): the same runner, 2 passes side by side x 1 thread, no HTTP. 'bound' is "
              "the server's best run if its 2 CPUs did nothing but these passes and its measured rest per request")
        print("| shape | config | forward alone, texts/s at the server's mean batch (x median raw) | at batch 32 (x median raw) | "
              "server / forward alone | bound at the mean batch: 2 CPUs / (forward + rest) (x median raw) |")
        print("|---|---|---|---|---|---|")
        for shape, label, m, raw_rate, mean_batch, rates in ceilings:
            at = rates[mean_batch]
            per_text = 2.0 / at  # CPU-seconds per text of the two 1-thread passes
            bound = 2.0 / (per_text + m["rest_ms"] / 1000)
            print(f"| {shape} | {label} | {at:.0f} at {mean_batch} ({at / raw_rate:.2f}x) | {rates[32]:.0f} "
                  f"({rates[32] / raw_rate:.2f}x) | {m['rps'] / at:.0%} | {bound:.0f} ({bound / raw_rate:.2f}x) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
