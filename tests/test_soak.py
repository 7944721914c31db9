"""The bounded soak (bench/soak.py): 64 concurrent clients, 60 s of mixed embeddings and rerank against a
two-worker Gunicorn it starts itself with the tiny models. No error (429s aside), bounded worker memory.

This is the suite's one deliberately slow test (about 90 s).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import EMBED, RERANK

ROOT = Path(__file__).resolve().parent.parent


def test_soak_64_clients_for_60_seconds(models_file):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "60", "--warmup", "5", "--clients", "64",
         "--models-file", str(models_file), "--embed-model", EMBED, "--rerank-model", RERANK],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = out.stdout
    print(report)  # the figures, shown with `pytest -s` or on failure
    assert out.returncode == 0, report[-4000:] + out.stderr[-4000:]
    assert "RESULT: OK" in report
    requests = int(re.search(r"^requests: (\d+)", report, re.M).group(1))
    assert requests > 0
    assert re.search(r"errors: 0$", report, re.M)
    assert re.search(r"latency \(200s\) all: p50 [\d.]+ ms, p99 [\d.]+ ms", report)
    for kind in ("embeddings", "rerank", "rerank_v2"):
        assert re.search(rf"^latency {kind}: n=[1-9]", report, re.M), kind
    assert len(re.findall(r"^worker \d+: RSS before \d+ MiB, after \d+ MiB", report, re.M)) == 2
