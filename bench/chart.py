#!/usr/bin/env python
"""bench/benchmark.py's results file, and the chart of throughput drawn from one.

`save_results` writes what a run printed (the table's rows and notes, with the date, commit and machine)
as JSON next to the same table as text, in bench/out/. `python bench/chart.py RESULTS.json OUT.svg` draws
every texts/s row of that file as horizontal bars (raw sentence-transformers and the server, each with
its figure), titled with the run's date and commit: docs/benchmarks.md shows the committed image.

The SVG is written by hand (a few dozen elements) rather than with a plotting library: the chart needs
only bars and text, and the project should not pull matplotlib into its test requirements for that.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
FORMAT = "embedapi-benchmark/1"


def commit() -> str:
    """The checkout's commit, `+dirty` when tracked files differ from it; `unknown` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def save_results(out_dir: Path, mode: str, header: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                 notes: Sequence[str], table: str, started: datetime) -> Path:
    """Write `benchmark-<mode>-<UTC time>.json` and `.md` (the printed table) into `out_dir`; return the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = datetime.now(timezone.utc)
    stem = out_dir / f"benchmark-{mode}-{finished:%Y%m%dT%H%M%SZ}"
    results = {
        "format": FORMAT, "mode": mode, "commit": commit(),
        "started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
        "header": header, "rows": [dict(zip(columns, r)) for r in rows], "notes": list(notes),
    }
    stem.with_suffix(".json").write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(table, encoding="utf-8")
    return stem.with_suffix(".json")


def number(cell: str) -> float | None:
    """The figure a cell starts with ("126.4 (bs 64)" -> 126.4); None for an empty or non-numeric cell."""
    match = re.match(r"\s*(\d+(?:\.\d+)?)", cell or "")
    return float(match.group(1)) if match else None


def throughput_rows(results: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(label, raw, server) for every texts/s row (the paired rows are texts/s too): the workloads and
    configurations the run compared. A cell of two figures ("a / b") is left out."""
    out = []
    for r in results["rows"]:
        what = r["measurement"]
        if not ("texts/s" in what or what.startswith("(2) paired")) or " / " in r["raw"] + r["server"]:
            continue
        raw, server = number(r["raw"]), number(r["server"])
        if raw is not None or server is not None:
            out.append((what.removesuffix(", texts/s"), raw, server))
    return out


def svg(results: dict[str, Any]) -> str:
    bars = throughput_rows(results)
    if not bars:
        raise ValueError("the results file has no texts/s rows to draw")
    width, left, right, bar, gap, label = 960, 12, 90, 14, 2, 18
    top = 64
    scale = (width - left - right) / max(v for _, raw, server in bars for v in (raw, server) if v is not None)
    parts = []
    y = top
    for name, raw, server in bars:
        parts.append(f'<text x="{left}" y="{y + 12}" class="label">{escape(name)}</text>')
        y += label
        for value, cls in ((raw, "raw"), (server, "server")):
            if value is None:
                continue
            w = max(1.0, value * scale)
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar}" class="{cls}">'
                         f'<title>{cls} {value:g} texts/s</title></rect>')
            parts.append(f'<text x="{left + w + 4:.1f}" y="{y + bar - 3}" class="value">{value:g}</text>')
            y += bar + gap
        y += 10
    title = (f"embedapi benchmark ({results['mode']} run), {results['finished'][:16].replace('T', ' ')} UTC, "
             f"commit {results['commit']}: texts per second")
    legend = (f'<rect x="{left}" y="36" width="12" height="12" class="raw"/>'
              f'<text x="{left + 16}" y="46" class="value">raw sentence-transformers (in process)</text>'
              f'<rect x="{left + 290}" y="36" width="12" height="12" class="server"/>'
              f'<text x="{left + 306}" y="46" class="value">embedapi server (HTTP, Gunicorn)</text>')
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 30}" viewBox="0 0 {width} {y + 30}" '
        f'font-family="sans-serif">',
        "<style>.label{font-size:12px;fill:#222}.value{font-size:11px;fill:#444}"
        ".raw{fill:#9aa5b1}.server{fill:#2f6fb3}.title{font-size:14px;font-weight:bold;fill:#111}</style>",
        f'<rect width="{width}" height="{y + 30}" fill="#fff"/>',
        f'<text x="{left}" y="22" class="title">{escape(title)}</text>',
        legend, *parts,
        f'<text x="{left}" y="{y + 16}" class="value">{escape(results["header"])}</text>',
        "</svg>", ""])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Draw a bench/benchmark.py results file as an SVG bar chart.")
    ap.add_argument("results", type=Path, help="a bench/out/benchmark-*.json file")
    ap.add_argument("output", type=Path, help="the SVG to write, e.g. docs/benchmark-throughput.svg")
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text(encoding="utf-8"))
    if results.get("format") != FORMAT:
        ap.error(f"{args.results} is not a {FORMAT} results file")
    args.output.write_text(svg(results), encoding="utf-8")
    print(f"wrote {args.output} from {args.results} ({results['mode']} run, commit {results['commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
