"""GET /metrics: what is counted (in-process app), and one scrape summing a real two-worker Gunicorn."""

from __future__ import annotations

import os
import re
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from embedapi import create_app

from .conftest import EMBED, EMBED_ALIAS, RERANK
from .server import call


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of every sample `name` whose labels include `labels` (so: over all workers and label values)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def scrape(client) -> list[tuple[str, dict[str, str], float]]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return parse(resp.get_data(as_text=True))


def test_requests_batches_and_tokens_are_counted(client):
    before = scrape(client)
    tokens = items = 0
    for texts in (["一つ目"], ["二つ目", "三つ目の文"], "四つ目"):
        resp = client.post("/v1/embeddings", json={"model": EMBED, "input": texts})
        assert resp.status_code == 200
        tokens += resp.json["usage"]["total_tokens"]
        items += len(resp.json["data"])
    resp = client.post("/rerank", json={"model": RERANK, "query": "温泉", "documents": ["蔵王温泉", "名古屋"]})
    assert resp.status_code == 200
    rerank_tokens = resp.json["usage"]["total_tokens"]
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": ""}).status_code == 400
    assert client.get("/no/such/path/12345").status_code == 404
    assert client.get(f"/v1/models/{EMBED}").status_code == 200
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # Requests by route (the URL rule, never the raw path) and status.
    assert delta("embedapi_requests_total", route="/v1/embeddings", method="POST", status="200") == 3
    assert delta("embedapi_requests_total", route="/v1/embeddings", status="400") == 1
    assert delta("embedapi_requests_total", route="/rerank", status="200") == 1
    assert delta("embedapi_requests_total", route="<unmatched>", status="404") == 1
    assert delta("embedapi_requests_total", route="/v1/models/<path:model_id>", status="200") == 1
    assert not any("/no/such/path" in str(lab) or EMBED in lab.get("route", "") for _, lab, _ in after)
    assert delta("embedapi_request_duration_seconds_count", route="/v1/embeddings") == 4

    # Batches: every computed input is in exactly one batch; tokens are the usage the client saw.
    assert delta("embedapi_batch_size_sum", model=EMBED) == items
    assert delta("embedapi_items_total", model=EMBED) == items
    assert delta("embedapi_tokens_total", model=EMBED) == tokens
    assert delta("embedapi_tokens_total", model=RERANK) == rerank_tokens
    batches = delta("embedapi_batch_size_count", model=EMBED)
    assert 1 <= batches <= 3
    for name in ("embedapi_queue_seconds_count", "embedapi_inference_seconds_count", "embedapi_batch_tokens_count"):
        assert delta(name, model=EMBED) == batches
    # Padded tokens are at least the real ones; padding is their difference.
    padded = delta("embedapi_batch_tokens_sum", model=EMBED)
    assert padded >= tokens and delta("embedapi_padding_tokens_total", model=EMBED) == padded - tokens

    # Nothing queued once every request has its answer.
    assert total(after, "embedapi_queue_tokens", model=EMBED) == 0


def test_model_loading_metrics(client, app):
    samples = scrape(client)
    configured = [m.id for m in app.extensions["embedapi"].settings.models]
    loaded = {lab["model"]: v for n, lab, v in samples if n == "embedapi_model_load_seconds"}
    assert set(loaded) == set(configured) and all(v > 0 for v in loaded.values())
    assert total(samples, "embedapi_models_loaded", device="cpu") == len(configured)
    assert EMBED_ALIAS not in loaded  # aliases are names, not models


def test_metrics_need_no_key_and_count_unready_503(models_file):
    app = create_app({"models_file": str(models_file), "load_models": "off", "api_keys": "k1"})
    client = app.test_client()
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": "x"}).status_code == 401
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": "x"},
                       headers={"Authorization": "Bearer k1"}).status_code == 503
    samples = scrape(client)  # no Authorization header
    assert total(samples, "embedapi_requests_total", route="/v1/embeddings", status="401") == 1
    assert total(samples, "embedapi_requests_total", route="/v1/embeddings", status="503") == 1
    # A fresh app has its own registry (outside Gunicorn): nothing from other apps leaks in.
    assert total(samples, "embedapi_requests_total") == 2
    assert total(samples, "embedapi_models_loaded") == 0


def test_one_scrape_sums_both_gunicorn_workers(gunicorn_server, models_file):
    configured = len(tomllib.loads(models_file.read_text(encoding="utf-8"))["models"])
    url = gunicorn_server.url
    workers = set(gunicorn_server.worker_pids())
    assert len(workers) == 2
    before = parse(call("GET", url + "/metrics")[2])
    n = 120
    prefix = "metrics-test-"

    def one(i: int) -> int:
        status, headers, body = call("POST", url + "/v1/embeddings", {"model": EMBED, "input": f"数える{i}"},
                                     headers={"X-Request-ID": f"{prefix}{i}"})
        assert status == 200 and headers["X-Request-ID"] == f"{prefix}{i}"
        return body["usage"]["total_tokens"]

    with ThreadPoolExecutor(12) as pool:
        tokens = sum(pool.map(one, range(n)))
    status, headers, text = call("GET", url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    after = parse(text)

    # Which worker served which of these requests: the access log line carries the pid and the id.
    served: dict[int, int] = {}
    for pid, rid in re.findall(r"\[(\d+)\] embedapi\.access: POST /v1/embeddings 200 .* rid=(\S+)",
                               gunicorn_server.log()):
        if rid.startswith(prefix):
            served[int(pid)] = served.get(int(pid), 0) + 1
    assert sum(served.values()) == n and set(served) == workers, served

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # One scrape, answered by one worker, counts both workers' requests, batches and tokens.
    assert delta("embedapi_requests_total", route="/v1/embeddings", method="POST", status="200") == n
    assert delta("embedapi_request_duration_seconds_count", route="/v1/embeddings") == n
    assert delta("embedapi_batch_size_sum", model=EMBED) == n
    # Every answered embedding request reports its hand-off (rows computed -> response written) once.
    assert delta("embedapi_handoff_seconds_count", model=EMBED) == n
    assert delta("embedapi_tokens_total", model=EMBED) == tokens
    # Per-worker gauges carry a pid label: one series per live worker.
    loaded = {lab["pid"]: v for name, lab, v in after if name == "embedapi_models_loaded"}
    assert set(map(int, loaded)) == workers and all(v == configured for v in loaded.values())
    queued = [lab for name, lab, _ in after if name == "embedapi_queue_tokens"]
    assert queued and all("pid" not in lab for lab in queued)  # livesum: one series per model


def test_gunicorn_conf_prepares_and_cleans_the_metrics_directory(monkeypatch, tmp_path):
    """gunicorn.conf.py's metrics hooks, run with stand-in server/worker objects (nothing is started)."""
    import logging
    import runpy
    from types import SimpleNamespace

    from .server import ROOT

    server = SimpleNamespace(log=logging.getLogger("test.gunicorn"))
    for name in ("PROMETHEUS_MULTIPROC_DIR", "EMBEDAPI_OWNS_METRICS_DIR", "EMBEDAPI_LOAD_MODELS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMBEDAPI_DEVICE", "cpu")

    # Unset: a fresh private directory, removed when the master exits.
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    made = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert made.is_dir() and os.environ["EMBEDAPI_OWNS_METRICS_DIR"] == str(made)
    conf["on_exit"](server)
    assert not made.exists()

    # Given: kept, stale files dropped at start; a dead worker's live gauges go, its counters stay.
    given = tmp_path / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    monkeypatch.delenv("EMBEDAPI_OWNS_METRICS_DIR")
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert given.is_dir() and "EMBEDAPI_OWNS_METRICS_DIR" not in os.environ
    (given / "counter_111.db").write_bytes(b"old run")
    conf["on_starting"](server)
    assert list(given.iterdir()) == []
    for name in ("counter_222.db", "gauge_liveall_222.db", "gauge_livesum_222.db", "gauge_liveall_333.db"):
        (given / name).write_bytes(b"")
    conf["child_exit"](server, SimpleNamespace(pid=222))
    assert sorted(p.name for p in given.iterdir()) == ["counter_222.db", "gauge_liveall_333.db"]
    conf["on_exit"](server)
    assert given.is_dir()  # not ours to remove
