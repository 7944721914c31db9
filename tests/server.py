"""A real `gunicorn -c gunicorn.conf.py wsgi:app` on a loopback port, for live-server tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 60, raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    """One HTTP request; returns (status, headers, parsed JSON or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, payload = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        status, hdrs, payload = err.code, dict(err.headers), err.read()
    try:
        return status, hdrs, json.loads(payload)
    except ValueError:
        return status, hdrs, payload.decode("utf-8", "replace")


def status_kb(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in kB (VmRSS, RssAnon, VmHWM)."""
    return int(Path(f"/proc/{pid}/status").read_text().split(f"{field}:")[1].split()[0])


def poll(predicate, what: str, timeout: float = 120):
    """Call `predicate` every 50 ms until it returns something true (returned); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class GunicornServer:
    """Starts Gunicorn with the repository's config; stop() sends SIGTERM and waits."""

    def __init__(self, models_file: Path, workers: int = 2, env: dict[str, str] | None = None,
                 config: str | Path = "gunicorn.conf.py") -> None:
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_dir = tempfile.mkdtemp(prefix="embedapi-metrics-")
        self.log_path = Path(tempfile.mkdtemp(prefix="embedapi-log-")) / "server.log"
        self.env = {
            **os.environ,
            "EMBEDAPI_MODELS_FILE": str(models_file),
            "EMBEDAPI_HOST": "127.0.0.1",
            "APP_PORT": str(self.port),
            "EMBEDAPI_WORKERS": str(workers),
            "EMBEDAPI_THREADS": "16",
            "EMBEDAPI_DEVICE": "cpu",
            "EMBEDAPI_TORCH_THREADS": "1",
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
            "HF_HUB_OFFLINE": "1",
            **(env or {}),
        }
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "GunicornServer":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(self.config), "wsgi:app"],
                                     cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 180, workers: int | None = None) -> set[int]:
        """Poll /ready until `workers` distinct worker pids have answered 200."""
        want = workers or self.workers
        ready: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _, body = call("GET", self.url + "/ready", timeout=5)
                if status == 200:
                    ready.add(body["pid"])
                    if len(ready & set(self.worker_pids())) >= want:
                        return ready
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gunicorn did not get ready in {timeout}s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        """The master's live children, read from /proc."""
        assert self.proc is not None
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        return pids

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        try:
            if self.proc.poll() is not None:
                return self.proc.returncode
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        finally:
            self._log.close()
