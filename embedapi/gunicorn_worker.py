"""Gunicorn's gthread worker with read deadlines, so slow or stalled clients cannot hold the request threads.

Stock gthread (Gunicorn 27) waits 5 s for a new connection's first byte and then parks it on the poller, but
once a byte has come it reads the request line, headers and body in a request thread with no deadline: 64
connections that send half a request line hold all 64 threads for ever. This worker (gunicorn.conf.py's
`worker_class`) changes four things:

- The request head (line and headers) is collected by the worker's main loop without blocking and handed to a
  request thread only once complete, so a waiting head costs no thread. A head not complete within
  EMBEDAPI_HEADER_TIMEOUT seconds of the accept (on a kept-alive connection: of its next request's first
  byte) is answered 408 and the connection closed.
- A body is read in the request thread under a deadline that moves with progress: it may stall at most
  EMBEDAPI_BODY_TIMEOUT seconds, and after that grace period it must have averaged EMBEDAPI_BODY_MIN_RATE
  bytes/s. A slow but steady upload finishes; a trickle gets a 408 (the app renders it, errors.RequestTimeout).
- The graceful close after a response (FIN, then draining what the client still sends, at most 2 s) waits on
  the poller instead of blocking the main loop, where stock gthread runs it: a client that never closed its
  side stalled every connection of the worker for 2 s each.
- A request Gunicorn cannot parse (request line, headers, framing) gets Gunicorn's status in the contract's
  JSON error shape rather than Gunicorn's HTML page.

TLS connections (their handshake runs in the request thread) keep the stock path plus the head deadline.
docs/security.md describes the settings; a buffering proxy in front is still the recommended deployment.
"""

from __future__ import annotations

import errno
import html
import re
import selectors
import socket
import time
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import orjson
from gunicorn import util
from gunicorn.http.errors import NoMoreData
from gunicorn.http.unreader import SocketUnreader
from gunicorn.http2 import negotiation
from gunicorn.workers import gthread

from .config import Settings
from .engine import take_rows_ready
from .errors import RequestTimeout

# A head is collected in the main loop up to this size; a larger one (rare: Gunicorn allows ~800 KB) goes to a
# request thread, where the same deadline bounds the rest of it.
HEAD_BUFFER_LIMIT = 64 * 1024
LINGER_S = 2.0  # as gunicorn.util.close_graceful
LINGER_MAX_BYTES = 64 * 1024

_HEAD_TIMEOUT_BODY = orjson.dumps({"error": {
    "message": "The request line and headers did not arrive in time (EMBEDAPI_HEADER_TIMEOUT); send the whole "
               "request head at once", "type": "invalid_request_error", "param": None, "code": "request_timeout"}})
HEAD_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(_HEAD_TIMEOUT_BODY), _HEAD_TIMEOUT_BODY))


@dataclass(frozen=True)
class Deadlines:
    header_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    body_min_rate: int = 32768

    @classmethod
    def of(cls, app: Any) -> "Deadlines":
        """The app's settings (embedapi's create_app), else Settings' defaults."""
        state = getattr(app, "extensions", {}).get("embedapi")
        defaults = {f.name: f.default for f in fields(Settings)}
        return cls(**{f.name: getattr(getattr(state, "settings", None), f.name, defaults[f.name])
                      for f in fields(cls)})


class HeadTimeout(NoMoreData):
    """The head did not arrive in time (in a request thread). gthread's handle() takes a NoMoreData as a client
    that went away: a debug line, no traceback, and the connection closes."""


def head_complete(buf: bytes | bytearray) -> bool:
    """The head has ended, or Gunicorn's parser would refuse it already (a bare LF: 400 at once)."""
    return b"\r\n\r\n" in buf or buf.count(b"\n") != buf.count(b"\r\n")


class DeadlineConn(gthread.TConn):
    """A connection with the phase it is being read in: "head", "body" or None (no deadline of ours)."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any, deadlines: Deadlines,
                 linger: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.deadlines = deadlines
        self.linger = linger
        self.poll_head = not cfg.is_ssl and not negotiation.prior_knowledge_allowed(cfg, client)
        self.head = bytearray()  # collected by the main loop, handed to the parser in init()
        self.phase: str | None = None
        self.head_deadline = 0.0
        self.body_start = 0.0
        self.body_bytes = 0
        self.req: Any = None

    def start_head(self, now: float) -> None:
        t = self.deadlines.header_timeout_s
        self.phase, self.head_deadline = "head", (now + t if t > 0 else float("inf"))

    def init(self) -> None:
        super().init()
        parser = self.parser
        if parser is None or self.is_http2:
            return
        if not isinstance(parser.unreader, DeadlineUnreader):
            unreader = DeadlineUnreader(self.sock, self)
            unreader.unread(parser.unreader.take_buffered())
            parser.unreader = unreader
        if self.head:
            parser.unreader.unread(bytes(self.head))
            self.head = bytearray()

    def read_timeout(self) -> float | None:
        """Seconds the next socket read may wait; None: no deadline (stock behaviour)."""
        now = time.monotonic()
        if self.phase == "head":
            return self.head_deadline - now
        if self.phase == "body":
            d = self.deadlines
            if d.body_timeout_s <= 0:
                return None
            allowed = d.body_timeout_s + (self.body_bytes / d.body_min_rate if d.body_min_rate > 0 else float("inf"))
            return min(d.body_timeout_s, allowed - (now - self.body_start))
        return None

    def timed_out(self) -> None:
        phase, self.phase = self.phase, None
        if phase == "body":
            if self.req is not None:
                self.req.force_close()  # the 408 says "Connection: close"; the body's end is unknown
            raise RequestTimeout(
                f"The request body did not arrive in time: it stalled for {self.deadlines.body_timeout_s:g} s or "
                f"came slower than {self.deadlines.body_min_rate} bytes/s (EMBEDAPI_BODY_TIMEOUT, "
                "EMBEDAPI_BODY_MIN_RATE); send it at once, or through a buffering proxy")
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(HEAD_TIMEOUT_RESPONSE)
        except OSError:
            pass
        raise HeadTimeout(b"")

    def close(self, graceful: bool = False) -> None:
        if graceful and self.linger is not None:
            self.linger(self)
        else:
            super().close(graceful)


class DeadlineUnreader(SocketUnreader):
    """Socket reads bounded by the connection's current deadline."""

    def __init__(self, sock: socket.socket, conn: DeadlineConn) -> None:
        super().__init__(sock)
        self.conn = conn

    def chunk(self, size_hint: int | None = None) -> bytes:
        conn = self.conn
        timeout = conn.read_timeout()
        if timeout is None:
            return super().chunk(size_hint)
        if timeout <= 0:
            conn.timed_out()
        prior = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            data = super().chunk(size_hint)
        except TimeoutError:
            conn.timed_out()
            raise  # not reached: timed_out() raises
        finally:
            try:
                self.sock.settimeout(prior)
            except OSError:
                pass
        if conn.phase == "body":
            conn.body_bytes += len(data)
        return data


class _CoalescingSocket:
    """The client socket while one request is answered: the response head is held back and goes out with the
    body's first bytes in one send. Gunicorn sends them apart: two system calls per response, each also
    handing the GIL to another thread. Anything else done with the socket (sendfile needs its fileno) sends a
    held head first, and the worker sends it when the request ends (a response with no body)."""

    __slots__ = ("_sock", "_head", "_started")

    def __init__(self, sock: socket.socket) -> None:
        self._sock, self._head, self._started = sock, b"", False

    def sendall(self, data: Any, flags: int = 0) -> None:
        if not self._started:
            self._started = True
            if len(data) <= HEAD_BUFFER_LIMIT:
                self._head = bytes(data)
                return
        head, self._head = self._head, b""
        self._sock.sendall(head + bytes(data) if head else data, flags)

    def flush(self) -> None:
        self._started = True
        head, self._head = self._head, b""
        if head:
            self._sock.sendall(head)

    def fileno(self) -> int:
        self.flush()
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:
        self.flush()
        return getattr(self._sock, name)


class _ErrorCapture:
    """Stands for the client socket while Gunicorn writes its HTML error page (gunicorn.util.write_error)."""

    def __init__(self, sock: Any) -> None:
        self.sock, self.data = sock, b""

    def gettimeout(self) -> float | None:
        return 0.0  # write_nonblock: no blocking-mode dance on the real socket

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def json_error_response(page: bytes) -> bytes:
    """Gunicorn's HTML error response rewritten as the contract's JSON error (same status, Connection: close)."""
    head, _, body = page.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    _, status, reason = (status_line.split(" ", 2) + ["", ""])[:3]
    found = re.search(rb"</h1>(.*)</body>", body, re.S)
    detail = " ".join(html.unescape(found.group(1).decode("latin-1")).split()) if found else ""
    code = int(status) if status.isdigit() else 400
    message = f"{reason}: {detail}" if detail else reason
    payload = orjson.dumps({"error": {
        "message": message + ("; the request could not be parsed as HTTP/1.1" if code < 500 else ""),
        "type": "invalid_request_error" if code < 500 else "server_error", "param": None,
        "code": "bad_request" if code < 500 else "internal_error"}})
    return (f"HTTP/1.1 {code} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode("latin-1") + payload


class DeadlineThreadWorker(gthread.ThreadWorker):
    """gthread with read deadlines (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadlines = Deadlines()
        self.heads: dict[DeadlineConn, None] = {}  # connections whose head the main loop is collecting
        self.lingering: dict[socket.socket, float] = {}  # closing sockets -> drain deadline
        self.metrics: Any = None  # the app's Metrics (embedapi_handoff_seconds), once the app is loaded
        self._notified = float("-inf")

    def notify(self) -> None:
        """The heartbeat (the tmp file's mtime the arbiter watches), at most about once a second: stock gthread
        touches it on every turn of the main loop, a system call per request under load."""
        now = time.monotonic()
        if now - self._notified >= min(1.0, self.timeout / 4):
            self._notified = now
            super().notify()

    def run(self) -> None:
        self.deadlines = Deadlines.of(self.wsgi)
        self.metrics = getattr(self.wsgi, "extensions", {}).get("embedapi.metrics")
        super().run()

    # -- the head, collected by the main loop ---------------------------------------------------
    def accept(self, listener: socket.socket) -> None:
        try:
            sock, client = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = DeadlineConn(self.cfg, sock, client, listener.getsockname(), self.deadlines, self._linger)
        if conn.poll_head:
            self._await_head(conn)
        else:
            self.enqueue_req(conn)

    def _await_head(self, conn: DeadlineConn) -> None:
        conn.start_head(time.monotonic())
        conn.sock.setblocking(False)
        self.heads[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_readable, conn))

    def _on_head_readable(self, conn: DeadlineConn, _fileobj: Any = None) -> None:
        try:
            data = conn.sock.recv(HEAD_BUFFER_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client left before its head was complete
            self._end_head_wait(conn)
            self.nr_conns -= 1
            conn.close()
            return
        conn.head += data
        if head_complete(conn.head) or len(conn.head) >= HEAD_BUFFER_LIMIT:
            self._end_head_wait(conn)
            conn.data_ready = True
            self.enqueue_req(conn)

    def _end_head_wait(self, conn: DeadlineConn) -> None:
        self.heads.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def on_client_socket_readable(self, conn: DeadlineConn, client: Any) -> None:
        """A kept-alive connection's next request starts: collect its head in the main loop too.

        The socket stays registered while its head is read (its callback swapped in place), so a head that
        comes in one read, the usual case, costs one poller change (the unregister) instead of three: each is
        a system call that also hands the GIL to another thread."""
        if not conn.poll_head:
            return super().on_client_socket_readable(conn, client)
        self.keepalived_conns.remove(conn)
        conn.start_head(time.monotonic())
        self.heads[conn] = None
        self.poller.modify(client, selectors.EVENT_READ, partial(self._on_head_readable, conn))
        self._on_head_readable(conn)

    def finish_request(self, conn: DeadlineConn, fs: Any) -> None:
        # Bytes of the next request already read with this one: stock gthread hands them to a request thread
        # at once, which would then wait there for the rest of that head.
        if (conn.poll_head and self.alive and not fs.cancelled() and fs.exception() is None
                and fs.result() is True and conn.parser is not None and conn.parser.unreader.buf.getvalue()):
            conn.head = bytearray(conn.parser.unreader.take_buffered())
            self._await_head(conn)
            if head_complete(conn.head):
                self._end_head_wait(conn)
                conn.data_ready = True
                self.enqueue_req(conn)
            return
        super().finish_request(conn, fs)

    # -- request threads -----------------------------------------------------------------------
    def handle(self, conn: DeadlineConn) -> Any:
        if not conn.poll_head:  # TLS: the head is read here, under the same deadline
            conn.start_head(time.monotonic())
        try:
            return super().handle(conn)
        finally:
            conn.phase = None

    def handle_request(self, req: Any, conn: DeadlineConn) -> Any:
        conn.phase, conn.body_start, conn.body_bytes, conn.req = "body", time.monotonic(), 0, req
        take_rows_ready()  # nothing left over from an earlier request of this thread
        real = conn.sock
        if conn.poll_head:
            conn.sock = _CoalescingSocket(real)  # type: ignore[assignment]
        try:
            return super().handle_request(req, conn)
        finally:
            if conn.sock is not real:
                try:
                    conn.sock.flush()
                finally:
                    conn.sock = real
            conn.phase, conn.req = None, None
            ready = take_rows_ready()  # the response is written (or failed): the hand-off time
            if ready is not None and self.metrics is not None:
                self.metrics.handoff(ready[0], time.monotonic() - ready[1])

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Gunicorn's answer to a request it could not parse (bad request line, headers, framing), in the
        contract's JSON error shape instead of its HTML page; status, logging and closing stay Gunicorn's."""
        capture = _ErrorCapture(client)
        super().handle_error(req, capture, addr, exc)
        if capture.data:
            try:
                client.sendall(json_error_response(capture.data))
            except OSError:
                pass

    # -- deadlines and closing, from the main loop -------------------------------------------------
    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.heads if c.head_deadline <= now or (not self.alive and not c.head)]:
            self._end_head_wait(conn)
            if conn.head:  # a started head: tell the client why (a connection that sent nothing just closes)
                try:
                    conn.sock.send(HEAD_TIMEOUT_RESPONSE)
                except OSError:
                    pass
            self.log.debug("closing %s: request head not complete in %gs", conn.client,
                           self.deadlines.header_timeout_s)
            self.nr_conns -= 1
            conn.close()
        for sock in [s for s, deadline in self.lingering.items() if deadline <= now]:
            self._end_linger(sock)

    def _linger(self, conn: DeadlineConn) -> None:
        """gunicorn.util.close_graceful without blocking: FIN now, drain on the poller, close at EOF or 2 s."""
        sock = conn.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, partial(self._on_linger_readable, [0]))
        except (OSError, ValueError, KeyError):
            util.close(sock)
            return
        self.lingering[sock] = time.monotonic() + LINGER_S

    def _on_linger_readable(self, drained: list[int], sock: socket.socket) -> None:
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        drained[0] += len(data)
        if not data or drained[0] >= LINGER_MAX_BYTES:
            self._end_linger(sock)

    def _end_linger(self, sock: socket.socket) -> None:
        self.lingering.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        util.close(sock)
