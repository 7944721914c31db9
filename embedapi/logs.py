"""Logging: one line per request (text or JSON), never the request's texts."""

from __future__ import annotations

import collections
import json
import logging
import re
import sys
import threading
import time
from typing import Any

# Control characters (C0, DEL, C1) and the Unicode line separators: in a text log a client's "\n" in a path
# would start a forged line of its own and "\x1b[" would drive the operator's terminal, so they are written as
# escapes. The JSON format escapes them through json.dumps already.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """`text` with its control characters written as backslash escapes (one log line stays one line)."""
    if text.isprintable():  # every character _CONTROL matches is non-printable: nothing to escape (the usual case)
        return text
    return _CONTROL.sub(_escape_one, text)


class _SecondCache:
    """formatTime with the date and time formatted once per second (every access line asks for it)."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)  # type: ignore[misc]
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            when = self.converter(record.created)  # type: ignore[attr-defined]
            cached = self._second = (second, time.strftime(logging.Formatter.default_time_format, when))
        return logging.Formatter.default_msec_format % (cached[1], record.msecs)


_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "model", "items", "tokens")


class JsonFormatter(_SecondCache, logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "pid": record.process, "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in _FIELDS if getattr(record, k, None) is not None})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(_SecondCache, logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The message holds what clients send (method, path, model); a traceback appended after it keeps its lines.
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={escape_controls(str(getattr(record, k)))}" for k in _FIELDS[3:]
                          if getattr(record, k, None) is not None and k not in ("status",))
        rid = getattr(record, "request_id", None)
        return f"{line} {extras} rid={rid}".rstrip() if rid else line


class CombiningStreamHandler(logging.StreamHandler):
    """A StreamHandler whose callers never wait for one another: each formats its own line, queues it, and
    whoever finds the stream free writes every queued line in one write.

    logging.Handler holds one lock around format, write and flush. Under load (one access line per request, 32+
    request threads) the write system call releases the GIL while that lock is held, the other request threads
    pile up on the lock, and each of them sleeps and wakes twice, once for the lock and once for the GIL. Here a
    thread that finds another writing leaves its line to that writer, which drains the queue before it lets go,
    and looks again after letting go, so no line is left behind. Lines keep their order; under load several go
    out per write.
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._queued: collections.deque[str] = collections.deque()
        self._writing = threading.Lock()

    def handle(self, record: logging.LogRecord) -> Any:  # logging.Handler.handle without the handler's lock
        rv = self.filter(record)
        if isinstance(rv, logging.LogRecord):  # Python 3.12+: a filter may hand back a changed record
            record = rv
        if rv:
            self.emit(record)
        return rv

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._queued.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        while self._queued and self._writing.acquire(blocking=False):
            try:
                lines = []
                while self._queued:
                    lines.append(self._queued.popleft())
                self.stream.write("".join(lines))
                self.stream.flush()
            except Exception:
                self.handleError(record)
            finally:
                self._writing.release()


def configure(log_format: str = "text", level: str = "INFO") -> None:
    """Give the `embedapi` loggers one stderr handler (idempotent)."""
    logger = logging.getLogger("embedapi")
    logger.setLevel(level)
    if not any(getattr(h, "_embedapi", False) for h in logger.handlers):
        handler = CombiningStreamHandler(sys.stderr)
        handler._embedapi = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    for h in logger.handlers:
        if getattr(h, "_embedapi", False):
            h.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
