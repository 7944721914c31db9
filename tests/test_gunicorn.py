"""The real `gunicorn -c gunicorn.conf.py wsgi:app`: two workers, models per worker, none in the master."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .conftest import EMBED, RERANK
from .server import call


def test_two_workers_serve_and_the_master_holds_no_model(gunicorn_server):
    url = gunicorn_server.url
    workers = set(gunicorn_server.worker_pids())
    assert len(workers) == 2

    def one(i: int) -> int:
        status, _, body = call("POST", url + "/v1/embeddings", {"model": EMBED, "input": f"テスト{i}"})
        assert status == 200 and len(body["data"]) == 1
        status, _, body = call("POST", url + "/v1/rerank",
                               {"model": RERANK, "query": "温泉", "documents": ["蔵王温泉", f"文書{i}"]})
        assert status == 200 and len(body["results"]) == 2
        return i

    with ThreadPoolExecutor(16) as pool:
        assert len(list(pool.map(one, range(200)))) == 200

    # Both workers answered model requests: each logged its own access lines.
    pids = {int(m) for m in re.findall(r"\[(\d+)\] embedapi\.access: POST /v1/embeddings 200", gunicorn_server.log())}
    assert workers <= pids, (workers, pids)

    # The master imported no torch at all, so it holds no weights and no CUDA context.
    master = gunicorn_server.proc.pid
    maps = Path(f"/proc/{master}/maps").read_text()
    assert "libtorch" not in maps and "torch/lib" not in maps
    for pid in workers:
        assert "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_models_and_health_over_the_live_server(gunicorn_server):
    status, _, body = call("GET", gunicorn_server.url + "/v1/models")
    assert status == 200 and {m["id"] for m in body["data"]} >= {EMBED, RERANK}
    status, _, body = call("GET", gunicorn_server.url + "/health")
    assert status == 200 and body["status"] == "ok"
