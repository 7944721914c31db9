"""bench/fairness.py keeps working: its smoke mode (tiny shape, a small bulk request) runs the idle and
the busy measurements against a real Gunicorn server and prints every row. Figures are not judged here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fairness_smoke_prints_every_row(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "fairness.py"), "--smoke", "--only-default",
                          "--models-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout
    print(table)
    assert re.search(r"^\| default: 8 query clients, idle server, p50 / p99 ms +\| [\d.]+ / [\d.]+", table, re.M)
    assert re.search(r"^\| default: 8 query clients while the bulk runs, p50 / p99 ms +\| [\d.]+ / [\d.]+", table, re.M)
    assert re.search(r"^\| default: bulk request alone / with the queries, tokens/s +\| \d+ / \d+ .*kept [\d.]+x",
                     table, re.M)
