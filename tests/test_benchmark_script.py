"""bench/benchmark.py keeps working: its smoke mode (tiny shapes, one repetition) runs every measurement
against real Gunicorn servers and prints the whole table. Figures are not judged here (no timed asserts);
only that each row is there, that the server's vectors and scores equal the raw model's, and that the
results file it saves draws as a chart with bench/chart.py (the command docs/benchmarks.md documents).

Slow on purpose (about 80 s on 2 cores): the script is the issue's proof and should not rot unseen.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ROWS = [
    r"\(1\) baseline: best raw float32 / bfloat16",
    r"\(2\) server, 32 clients x 1 text/request, float32",
    r"\(2\) paired: raw fp32 \(bs \d+, [^)]+\) and server alternated, 1 rounds, float32",
    r"\(3\) server, batching off",
    r"\(2\) ceiling: the server's forward alone, .* float32",
    r"\(2\) ceiling: the server's forward alone, .* bfloat16",
    r"\(2\) paired: .* dtype auto",
    r"\(4\) one request of \d+ mixed texts",
    r"\(5\) idle latency, one 12-token text, p50 ms",
    r"\(6\) rerank 1 query x 100 docs",
    r"\(7\) worker RSS before/after \d+ requests",
    r"\(2\) server, 32 clients, dtype auto \(\w+\), 2 workers x 1 thread",
]


def test_benchmark_smoke_prints_every_row(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "benchmark.py"), "--quick", "--smoke",
                          "--models-dir", str(tmp_path), "--out", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout
    print(table)
    for pattern in ROWS:
        assert re.search(rf"^\| {pattern}", table, re.M), pattern
    vec = float(re.search(r"server vs raw vector \(float32\): max abs diff (\S+)", table).group(1))
    logits = float(re.search(r"rerank logits server vs raw sigmoid-inverse: max abs diff (\S+)", table).group(1))
    assert vec < 1e-5 and logits < 1e-5, (vec, logits)
    assert re.search(r"one 8,192-token input: HTTP 200, \d+ tokens fed", table)

    # The results file holds exactly the printed table, and bench/chart.py draws it.
    (saved,) = (tmp_path / "out").glob("benchmark-smoke-*.json")
    results = json.loads(saved.read_text(encoding="utf-8"))
    assert results["mode"] == "smoke" and results["commit"] and results["finished"].startswith("20")
    assert saved.with_suffix(".md").read_text(encoding="utf-8") in table
    for r in results["rows"]:
        assert re.search(rf"^\| {re.escape(r['measurement'])} +\| {re.escape(r['raw'])} ", table, re.M), r
    chart = tmp_path / "chart.svg"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "chart.py"), str(saved), str(chart)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    svg = ET.parse(chart).getroot()
    ns = {"s": "http://www.w3.org/2000/svg"}
    labels = [t.text for t in svg.iterfind("s:text[@class='label']", ns)]
    assert "(2) server, 32 clients x 1 text/request, float32" in labels
    for start in ("(1) raw encode, ~50-token texts/s, float32", "(2) paired: raw fp32", "(3) server, batching off",
                  "(2) ceiling", "(4) one request of"):
        assert any(label.startswith(start) for label in labels), start
    bars = svg.findall("s:rect[@class='server']", ns)
    assert len(bars) >= 6 and all(float(b.get("width")) > 0 for b in bars)
    assert results["commit"] in svg.find("s:text[@class='title']", ns).text
