"""bench/gpu_check.py keeps working: its CPU dry run (tiny shapes) runs the GPU-marked tests (they skip here)
and every benchmark step against a real Gunicorn worker, and prints the one table. Figures are not judged."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ROWS = [r"environment +\| torch ", r"GPU-marked tests \(pytest -m gpu\) +\| \d+ skipped",
        r"tiny \(dry run\) +\| device / dtype / attention +\| cpu / \w+ / sdpa",
        r"tiny \(dry run\) +\| 32 clients x 1 short text +\| [\d,]+ req/s",
        r"tiny \(dry run\) +\| 1 request of 16 x 300 tokens +\| ",
        r"tiny \(dry run\) +\| one 1,024-token input +\| \d+ ms \(1024 tokens\)",
        r"tiny \(dry run\) +\| a batch at the budget \(8 x 512 = 4096 tokens\)",
        r"tiny \(dry run\) +\| warm-up at the worst shapes", r"tiny \(dry run\) +\| GPU memory the worker holds",
        r"total +\| \d+ s"]


def test_gpu_check_dry_run_prints_the_table(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run",
                          "--tests", "tests/test_gpu.py", "--models-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for pattern in ROWS:
        assert re.search(rf"^\| {pattern}", out.stdout, re.M), pattern
    assert "FAILED" not in out.stdout
