#!/usr/bin/env python
"""One prepared run for a machine with a CUDA GPU: the GPU-marked tests, then a short benchmark, one table.

    python bench/gpu_check.py              # one GPU: well under 8 minutes (30m and 310m Ruri v3 shapes)
    python bench/gpu_check.py --dry-run    # CPU, tiny shapes, a minute: proves the script works (CI runs it)

For each shape (random weights, tests/synthetic_models.py RURI_V3_SHAPES; dtype auto) a real Gunicorn
worker on the GPU serves: 32 clients x one short text, one bulk request of 256 x 300 tokens, one
8,192-token input, one request that fills a batch at the token budget; the table adds the dtype and
attention in use, the warm-up's peak allocation and the GPU memory the worker holds afterwards. Nothing
is asserted beyond every request answering 200: the figures are for the closing note of a GPU run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the GPU image sets it

from bench.benchmark import SMOKE_SHAPE, TextMaker, body, build_models, load_run  # noqa: E402
from tests.server import GunicornServer, call  # noqa: E402
from tests.synthetic_models import RURI_V3_SHAPES  # noqa: E402

MODEL = "bench/embed"
DEADLINE_S = 470  # under 8 minutes in all; a step that would start past it is reported as not run


def sh(*cmd: str, timeout: float = 20) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def gpu_memory_used_mib() -> float | None:
    """Memory in use on the first visible GPU, as the driver reports it (what a worker really holds)."""
    if not shutil.which("nvidia-smi"):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    out = sh(*cmd, *(["-i", visible] if visible else []))
    try:
        return float(out.splitlines()[0])
    except (ValueError, IndexError):
        return None


def environment(dry_run: bool) -> list[str]:
    import torch

    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        driver = (sh("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").splitlines() or ["?"])[0]
        lines.append(f"GPU {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB, driver {driver}")
    else:
        lines.append("no CUDA GPU" + (" (dry run: CPU, tiny shapes)" if dry_run else ": the benchmark runs on CPU"))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    lines.append(f"CPU {cpu}, {os.cpu_count()} cores")
    return lines


def run_gpu_tests(tests: str, timeout: float) -> str:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", tests]
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f}s"
    tail = (out.stdout + out.stderr).strip().splitlines()
    summary = next((ln for ln in reversed(tail) if re.search(r"\d+ (passed|failed|skipped|error)", ln)), "")
    summary = summary.strip("= ")
    if out.returncode not in (0, 5):  # 5: nothing collected
        print("\n".join(tail[-60:]), file=sys.stderr)
        return f"FAILED (exit {out.returncode}): {summary}"
    return summary or f"exit {out.returncode}"


def bench_shape(name: str, path: Path, device: str, sizes: dict[str, int]) -> dict[str, str]:
    from transformers import AutoTokenizer

    toml = Path(tempfile.mkstemp(prefix="embedapi-gpu-check-", suffix=".toml")[1])
    toml.write_text(f'[[models]]\nid = "{MODEL}"\nsource = "{path}"\nkind = "embedding"\ndtype = "auto"\n',
                    encoding="utf-8")
    texts = TextMaker(AutoTokenizer.from_pretrained(str(path)))
    before = gpu_memory_used_mib()
    server = GunicornServer(toml, workers=1, env={
        "EMBEDAPI_DEVICE": device, "EMBEDAPI_THREADS": "64", "EMBEDAPI_MAX_INPUTS": "2048",
        "EMBEDAPI_TORCH_THREADS": "2" if device == "cpu" else "1"}).start(timeout=600)
    out: dict[str, str] = {}
    try:
        _, _, models = call("GET", server.url + "/v1/models")
        info = models["data"][0]
        out["device / dtype / attention"] = f"{info['device']} / {info['dtype']} / {info['attention']}"
        budget = int(re.search(r"batch budget (\d+) tokens", server.log()).group(1))

        short = [body({"model": MODEL, "input": texts.make(24)}) for _ in range(32 * sizes["rounds"])]
        load_run(server.port, short[:32], 32)  # warm the connections and the batch shapes once
        seconds = load_run(server.port, short, 32)
        out["32 clients x 1 short text"] = f"{len(short) / seconds:,.0f} req/s"

        def one(inputs: list[str]) -> tuple[float, dict]:
            started = time.perf_counter()
            status, _, answer = call("POST", server.url + "/v1/embeddings", {"model": MODEL, "input": inputs},
                                     timeout=600)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {str(answer)[:300]}")
            return time.perf_counter() - started, answer

        bulk = [texts.make(300) for _ in range(sizes["bulk"])]
        seconds, _ = one(bulk)
        out[f"1 request of {len(bulk)} x 300 tokens"] = f"{seconds:.2f} s ({len(bulk) / seconds:,.0f} texts/s)"
        seconds, answer = one([texts.make(sizes["long"])])
        used = answer["usage"]["total_tokens"]
        out[f"one {sizes['long']:,}-token input"] = f"{seconds * 1000:.0f} ms ({used} tokens)"
        width = 512
        fill = [texts.make(width) for _ in range(max(1, budget // width))]
        seconds, _ = one(fill)
        out[f"a batch at the budget ({len(fill)} x {width} = {budget} tokens)"] = f"{seconds * 1000:.0f} ms"
        warm = re.search(r"warm-up at (.+?) \(rows x tokens\) fits; peak (\d+) MiB", server.log())
        out["warm-up at the worst shapes: peak allocated"] = (f"{warm.group(2)} MiB ({warm.group(1)})" if warm
                                                              else "n/a (CPU warms on one short text)")
        after = gpu_memory_used_mib()
        out["GPU memory the worker holds (driver)"] = (f"{after - before:,.0f} MiB" if after is not None
                                                       and before is not None else "n/a (no nvidia-smi)")
    finally:
        server.stop()
        toml.unlink(missing_ok=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU and tiny shapes: only proves the script works")
    ap.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "embedapi-gpu-check"))
    ap.add_argument("--tests", default="tests", help="where pytest looks for the GPU-marked tests")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    started = time.monotonic()

    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        print("no CUDA GPU here: run with --dry-run, or on a GPU machine", file=sys.stderr)
        return 2
    device = "auto" if gpu else "cpu"
    if gpu:
        shapes = {"ruri-v3-30m": RURI_V3_SHAPES["ruri-v3-30m"], "ruri-v3-310m": RURI_V3_SHAPES["ruri-v3-310m"]}
        sizes = {"rounds": 20, "bulk": 256, "long": 8192}
    else:
        shapes = {"tiny (dry run)": SMOKE_SHAPE}
        sizes = {"rounds": 1, "bulk": 16, "long": 1024}

    rows: list[tuple[str, str, str]] = [("environment", line, "") for line in environment(args.dry_run)]
    if args.skip_tests:
        rows.append(("GPU-marked tests", "skipped (--skip-tests)", ""))
    else:
        rows.append(("GPU-marked tests (pytest -m gpu)", run_gpu_tests(args.tests, timeout=240), ""))
    root = Path(args.models_dir) / ("gpu" if gpu else "dry-run")
    for name, shape in shapes.items():
        if time.monotonic() - started > DEADLINE_S:
            rows.append((name, "not run: the 8-minute budget is spent", ""))
            continue
        print(f"benchmark: {name} on {device} ...", file=sys.stderr, flush=True)
        key = name.split()[0]
        path = build_models(root, {key: ("embedding", shape)})[key]
        try:
            for what, figure in bench_shape(name, path, device, sizes).items():
                rows.append((name, what, figure))
        except Exception as exc:  # one table whatever happens: the failure is a row
            rows.append((name, "FAILED", f"{type(exc).__name__}: {str(exc)[:300]}"))
    rows.append(("total", f"{time.monotonic() - started:.0f} s", ""))

    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"\n| {'shape':<{widths[0]}} | {'measure':<{widths[1]}} | {'figure':<{widths[2]}} |")
    print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * (widths[2] + 2)}|")
    for r in rows:
        print(f"| {r[0]:<{widths[0]}} | {r[1]:<{widths[1]}} | {r[2]:<{widths[2]}} |")
    failed = any("FAILED" in " ".join(r) for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
