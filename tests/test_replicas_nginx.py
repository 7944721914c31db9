"""Two real Gunicorn replicas behind a real nginx running the shipped deploy/nginx/embedapi.conf.

Under steady load from several clients, one replica is restarted the way a rollout does it (SIGTERM,
wait for the exit, start again, wait for /ready): no request may fail. Then the other replica's worker
is killed (SIGKILL, as the OOM killer does): only requests already under way at that moment may fail.
Every 200 answer must carry the vectors sentence-transformers gives for its texts. The config is
used as shipped; only the listen address and the two upstream addresses are replaced.
Bounded: a fixed number of client threads, each request with a timeout, every wait with a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from .conftest import EMBED
from .server import ROOT, GunicornServer, call, free_port

CONF = ROOT / "deploy" / "nginx" / "embedapi.conf"
CLIENTS = 4
POOL = 48  # distinct texts; each request sends 1-3 of them


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (.ci/run installs Debian's nginx-light)")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    return found


def templated_conf(listen: int, upstreams: list[int]) -> str:
    """The shipped file with only its listen port and upstream addresses replaced (each exactly once)."""
    text = CONF.read_text(encoding="utf-8")
    text, n = re.subn(r"(?m)^(\s*)listen 8080;", rf"\g<1>listen 127.0.0.1:{listen};", text)
    assert n == 1, "deploy/nginx/embedapi.conf: expected one `listen 8080;`"
    for i, port in enumerate(upstreams, start=1):
        text, n = re.subn(rf"(?m)^(\s*)server embedapi-{i}:8000 ", rf"\g<1>server 127.0.0.1:{port} ", text)
        assert n == 1, f"deploy/nginx/embedapi.conf: expected one `server embedapi-{i}:8000` line"
    return text


class Nginx:
    """nginx in the foreground with a private prefix, pid file, logs and temp paths."""

    def __init__(self, upstreams: list[int]) -> None:
        self.binary = nginx_binary()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="embedapi-nginx-"))
        os.chmod(self.dir, 0o755)  # nginx's worker (another user when started as root) reads it
        (self.dir / "embedapi.conf").write_text(templated_conf(self.port, upstreams), encoding="utf-8")
        temp = "\n".join(f"    {kind}_temp_path {self.dir}/{kind};" for kind in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.dir / "nginx.conf").write_text(f"""
{"user root root;" if os.geteuid() == 0 else ""}
daemon off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {self.dir}/access.log;
{temp}
    # which replica answered (the test counts them); the shipped location sets no add_header of its own
    add_header X-Upstream $upstream_addr always;
    include {self.dir}/embedapi.conf;
}}
""", encoding="utf-8")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        check = subprocess.run([self.binary, "-t", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                "-e", str(self.dir / "error.log")], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen([self.binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                      "-e", str(self.dir / "error.log")])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.error_log()
            try:
                if call("GET", self.url + "/health", timeout=5)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"nginx did not answer:\n{self.error_log()}")

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | str
    upstream: str = ""
    texts: list[str] = field(default_factory=list)
    vectors: np.ndarray | None = None


class Clients:
    """CLIENTS threads, each on its own keep-alive connection to nginx, sending requests back to back."""

    def __init__(self, url: str, pool: list[str]) -> None:
        self.host, self.port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        self.pool = pool
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def run(self, index: int) -> None:
        rng = random.Random(index)
        conn = None
        for _ in range(5000):  # bound, far above what the test's phases need
            if self.stop.is_set():
                break
            texts = rng.sample(self.pool, rng.choice([1, 2, 3]))
            started = time.monotonic()
            out = Outcome(started, 0.0, "", texts=texts)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
                conn.request("POST", "/v1/embeddings", json.dumps({"model": EMBED, "input": texts}),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = resp.read()
                out.status, out.upstream = resp.status, resp.getheader("X-Upstream", "")
                if resp.status == 200:
                    out.vectors = np.array([d["embedding"] for d in json.loads(payload)["data"]], dtype=np.float32)
            except (OSError, http.client.HTTPException) as exc:
                out.status = type(exc).__name__
                if conn is not None:
                    conn.close()
                conn = None
            out.ended = time.monotonic()
            with self.lock:
                self.outcomes.append(out)
            time.sleep(0.05)  # steady, not flat out: the replicas restart on the same few cores
        if conn is not None:
            conn.close()

    def __enter__(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def wait_for(self, more: int, upstream: str | None = None, timeout: float = 120) -> None:
        """Until `more` further requests have ended (answered by `upstream`, if given)."""
        def n() -> int:
            with self.lock:
                return sum(1 for o in self.outcomes if upstream is None or o.upstream.endswith(upstream))
        target = n() + more
        deadline = time.monotonic() + timeout
        while n() < target:
            assert time.monotonic() < deadline, f"load stalled: {n()} of {target} requests"
            time.sleep(0.05)

    def between(self, start: float, end: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.started >= start and o.started < end]


def launch(server: GunicornServer) -> None:
    """GunicornServer.start() without its wait for /ready."""
    server._log = open(server.log_path, "wb")
    server.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(server.config), "wsgi:app"],
                                   cwd=ROOT, env=server.env, stdout=server._log, stderr=subprocess.STDOUT)


def test_rolling_restart_and_worker_kill_behind_nginx(model_dirs: dict[str, Path], st_model,
                                                     tmp_path: Path) -> None:
    binary = nginx_binary()
    assert binary
    rng = random.Random(17)
    words = ["名古屋", "大学", "温泉", "検索", "文書", "モデル", "日本語", "埋め込み", "東京", "京都", "山", "川"]
    pool = [f"{i} " + "".join(rng.choice(words) for _ in range(rng.choice([2, 8, 30]))) for i in range(POOL)]
    reference = dict(zip(pool, st_model.encode(pool, normalize_embeddings=True, convert_to_numpy=True)))

    # One model per replica, and no TorchScript tracing at load: what is under test is the way in and
    # out of a replica, and each restart then takes seconds instead of half a minute.
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nid = "{EMBED}"\nsource = "{model_dirs["embed"]}"\ndtype = "float32"\n',
                      encoding="utf-8")
    replicas = [GunicornServer(models, workers=1, env={"EMBEDAPI_TRACE": "false"}) for _ in range(2)]
    nginx = None
    figures: dict[str, float | int] = {}
    begun = time.monotonic()
    try:
        for r in replicas:  # both load their models at once; GunicornServer.start() would wait for each
            launch(r)
        for r in replicas:
            r.wait_ready(180)
        figures["first_ready_s"] = time.monotonic() - begun
        nginx = Nginx([r.port for r in replicas]).start()
        first, second = replicas
        with Clients(nginx.url, pool) as clients:
            clients.wait_for(20, upstream=f":{first.port}")
            clients.wait_for(20, upstream=f":{second.port}")

            # 1. rolling restart of the first replica
            t0 = time.monotonic()
            assert first.stop(timeout=90) == 0, first.log()[-3000:]
            figures["drain_s"] = time.monotonic() - t0
            clients.wait_for(20)  # served by the second alone meanwhile
            t1 = time.monotonic()
            first.start(timeout=180)
            figures["restart_ready_s"] = time.monotonic() - t1
            clients.wait_for(20, upstream=f":{first.port}")  # nginx sends to it again
            t2 = time.monotonic()
            phase1 = clients.between(t0, t2)

            # 2. SIGKILL of the second replica's worker (its master forks a new one)
            (worker,) = second.worker_pids()
            t3 = time.monotonic()
            os.kill(worker, signal.SIGKILL)
            second.wait_ready(180)
            figures["kill_ready_s"] = time.monotonic() - t3
            clients.wait_for(20, upstream=f":{second.port}")
            t4 = time.monotonic()
            clients.wait_for(10)
        phase2 = clients.between(t3, t4)
        outcomes = list(clients.outcomes)
    finally:
        if nginx is not None:
            nginx.stop()
        for r in replicas:
            r.stop()

    def failed(items: list[Outcome]) -> list[Outcome]:
        return [o for o in items if o.status != 200]

    # what the closing note reports
    figures.update(total_s=time.monotonic() - begun, requests=len(outcomes), failures=len(failed(outcomes)),
                   phase1_requests=len(phase1), phase1_failures=len(failed(phase1)),
                   phase2_requests=len(phase2), phase2_failures=len(failed(phase2)))
    print("replicas behind nginx:", json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                                for k, v in figures.items()}))

    assert failed(phase1) == [], [(o.status, o.upstream) for o in failed(phase1)]
    # Only requests under way when the worker died may fail: none that started after the kill.
    late = [o for o in failed(phase2) if o.started > t3]
    assert late == [], [(o.status, o.upstream) for o in late]
    assert len(failed(phase2)) <= CLIENTS
    assert len(failed(outcomes)) == len(failed(phase2)), [(o.status, o.upstream) for o in failed(outcomes)]
    for o in outcomes:
        if o.status == 200:
            np.testing.assert_allclose(o.vectors, np.stack([reference[t] for t in o.texts]), atol=1e-5)


def test_example_config_matches_the_server_limits() -> None:
    """The documented pairings: body size = EMBEDAPI_MAX_BODY_BYTES, read timeout > EMBEDAPI_REQUEST_TIMEOUT,
    and the compose profile runs two replicas behind this very file."""
    from embedapi.config import Settings

    text = CONF.read_text(encoding="utf-8")
    defaults = Settings.from_env({})
    size = re.search(r"(?m)^\s*client_max_body_size (\d+)m;", text)
    assert size and int(size.group(1)) * 1024 * 1024 == defaults.max_body_bytes
    read = re.search(r"(?m)^\s*proxy_read_timeout (\d+)s;", text)
    assert read and int(read.group(1)) > defaults.request_timeout_s
    assert re.search(r"(?m)^\s*least_conn;", text)
    retry = re.search(r"(?m)^\s*proxy_next_upstream (.+);", text).group(1).split()
    assert {"error", "timeout", "http_502", "http_503", "non_idempotent"} <= set(retry)

    import yaml

    services = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))["services"]
    upstreams = re.findall(r"(?m)^\s*server (embedapi-\d+):8000 ", text)
    assert upstreams == ["embedapi-1", "embedapi-2"]
    for name in upstreams:
        assert services[name]["profiles"] == ["replicas"] and "8000" in services[name]["expose"]
    nginx = services["nginx"]
    assert nginx["profiles"] == ["replicas"] and set(nginx["depends_on"]) == set(upstreams)
    assert "./deploy/nginx/embedapi.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    assert any(p.endswith(":8080") for p in nginx["ports"])
