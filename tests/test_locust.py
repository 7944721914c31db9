"""locustfile.py drives both endpoints: a few seconds headless against the live server, no failures."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from .conftest import EMBED, RERANK

ROOT = Path(__file__).resolve().parent.parent


def test_locustfile_runs_headless_without_failures(gunicorn_server, tmp_path):
    env = {**os.environ, "EMBEDAPI_LOCUST_EMBED_MODEL": EMBED, "EMBEDAPI_LOCUST_RERANK_MODEL": RERANK}
    prefix = tmp_path / "locust"
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"), "--headless", "-u", "8", "-r", "8",
         "-t", "5s", "--host", gunicorn_server.url, "--only-summary", "--csv", str(prefix), "--stop-timeout", "30"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(f"{prefix}_stats.csv", newline="", encoding="utf-8") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total
    # Every task ran at least once: both endpoints (and both rerank APIs) were exercised.
    assert {"embeddings: 1 query", "rerank"} <= set(rows), sorted(rows)
