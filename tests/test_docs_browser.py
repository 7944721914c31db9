"""GET /docs in a real headless Chromium against a live Gunicorn: the operations render, nothing is external.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ending
in NUL on fds 3 and 4), so the test needs no WebSocket client and sees every request the page makes.
Name resolution is mapped away for every host but 127.0.0.1: a page that referred to a CDN would show
that request here (and fail) instead of reaching the internet.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shlex
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

from .server import call

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--remote-debugging-pipe"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium before the tests")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


class DevTools:
    """A minimal DevTools-protocol client over Chromium's pipe; every event is kept in `events`."""

    def __init__(self, binary: str, profile: str) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # fds >= 10 in the child first, so that moving them to 3 and 4 cannot overwrite one another
        high_r, high_w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        args = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
        command = " ".join(shlex.quote(a) for a in args)
        self.log = Path(profile) / "chromium.log"  # a file, not a pipe: a full pipe would stall the browser
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", f"exec {command} 3<&{high_r} 4>&{high_w}"],
                                         pass_fds=(high_r, high_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        for fd in (to_browser_r, from_browser_w, high_r, high_w):
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, "Chromium did not answer over the DevTools pipe"
            if select.select([self._from_browser], [], [], left)[0]:
                chunk = os.read(self._from_browser, 1 << 16)
                assert chunk, f"Chromium closed the DevTools pipe: {self.log.read_text(errors='replace')[-2000:]}"
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


class References(HTMLParser):
    """Every URL an HTML page refers to (src, href, action, srcset...)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and name in ("src", "href", "action", "srcset", "data", "poster", "formaction"):
                self.urls.append(value)


def is_local(url: str, server: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob", "about") or (parts.scheme, parts.netloc) == tuple(urlsplit(server)[:2])


def test_docs_page_refers_only_to_this_server(gunicorn_server):
    status, headers, html = call("GET", gunicorn_server.url + "/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    parser = References()
    parser.feed(html)
    assert parser.urls and all(is_local(urljoin(gunicorn_server.url + "/docs", u), gunicorn_server.url)
                               for u in parser.urls), parser.urls
    for url in parser.urls:
        if url.endswith(".css"):
            status, _, css = call("GET", urljoin(gunicorn_server.url + "/docs", url))
            assert status == 200
            # a stylesheet may pull in fonts or images: only inline data: URLs, no @import
            assert "@import" not in css
            assert all(u.strip("'\" ").startswith("data:") for u in re.findall(r"url\(([^)]*)\)", css))


def test_docs_page_renders_every_operation_offline(gunicorn_server, tmp_path):
    browser = DevTools(chromium(), tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": gunicorn_server.url + "/docs"}, session=session)
        paths: list[str] = []
        for _ in range(600):  # bounded: Swagger UI fetches openapi.json, then renders one block per operation
            paths = browser.send("Runtime.evaluate", {
                "expression": "[...document.querySelectorAll('.opblock-summary-path')]"
                              ".map(e => e.textContent.replace(/\\u200b/g, ''))",
                "returnByValue": True}, session=session)["result"].get("value") or []
            if "/v1/rerank" in paths:
                break
            time.sleep(0.2)
        dom = browser.send("Runtime.evaluate", {"expression": "document.documentElement.outerHTML",
                                                "returnByValue": True}, session=session)["result"]["value"]
    finally:
        browser.close()

    assert {"/v1/embeddings", "/v1/rerank", "/v2/rerank", "/v1/models", "/health"} <= set(paths), paths
    assert 'data-path="/v1/embeddings"' in dom and 'data-path="/v1/rerank"' in dom
    requested = [e["params"]["request"]["url"] for e in browser.events
                 if e.get("method") == "Network.requestWillBeSent"]
    assert gunicorn_server.url + "/openapi.json" in requested
    assert any(u.endswith("/docs/assets/swagger-ui-bundle.js") for u in requested)
    external = [u for u in requested if not is_local(u, gunicorn_server.url)]
    assert not external, external  # every request the page made went to this server
    failed = [e["params"] for e in browser.events if e.get("method") == "Network.loadingFailed"]
    assert not failed, failed
    # The browser reports a blocked resource or a script error in its log: none may appear.
    problems = [e["params"] for e in browser.events
                if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not problems, problems
