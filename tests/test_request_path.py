"""The request path's cuts (issue 15) keep what they replace: every log line, every response byte, the same ids.

Each cut removes a system call, and with it a hand-off of the GIL, from what every request does; these tests
hold each one to the behaviour of the code it replaced.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import EMBED
from .server import call, poll, status_kb


class SlowStream(io.StringIO):
    """A stream whose writes take a while and release the GIL, as a write to a pipe or a terminal does."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        time.sleep(0.001)
        return super().write(text)


def test_the_combining_log_handler_writes_every_line_once_and_in_each_threads_order():
    from embedapi.logs import CombiningStreamHandler

    stream = SlowStream()
    handler = CombiningStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("embedapi.test-combining")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    threads, lines = 8, 200

    def emit(t: int) -> None:
        for i in range(lines):
            logger.info("thread %d line %d", t, i)

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(emit, range(threads)))
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue().splitlines()
    assert sorted(written) == sorted(f"thread {t} line {i}" for t in range(threads) for i in range(lines))
    for t in range(threads):
        mine = [int(m.group(1)) for m in (re.fullmatch(rf"thread {t} line (\d+)", w) for w in written) if m]
        assert mine == list(range(lines))
    assert stream.writes <= threads * lines


def test_the_combining_log_handler_reports_a_failing_stream_and_goes_on(monkeypatch):
    from embedapi.logs import CombiningStreamHandler

    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    handler = CombiningStreamHandler(Broken())
    seen = []
    monkeypatch.setattr(handler, "handleError", lambda record: seen.append(record.getMessage()))
    handler.handle(logging.LogRecord("embedapi", logging.INFO, "", 0, "first", None, None))
    handler.setStream(io.StringIO())
    handler.handle(logging.LogRecord("embedapi", logging.INFO, "", 0, "second", None, None))
    assert seen == ["first"]
    assert handler.stream.getvalue() == "second\n"


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: bytes, flags: int = 0) -> None:
        self.sent.append(bytes(data))

    def fileno(self) -> int:
        return 99

    def getpeername(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)


def test_the_response_head_goes_out_with_the_body_in_one_send():
    from embedapi.gunicorn_worker import HEAD_BUFFER_LIMIT, _CoalescingSocket

    real = RecordingSocket()
    sock = _CoalescingSocket(real)
    sock.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    assert real.sent == []
    sock.sendall(b"{}")
    sock.sendall(b"more")
    assert real.sent == [b"HTTP/1.1 200 OK\r\n\r\n{}", b"more"]

    real = RecordingSocket()  # no body (HEAD, 204): the head goes out when the request ends
    sock = _CoalescingSocket(real)
    sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    sock.flush()
    sock.flush()
    assert real.sent == [b"HTTP/1.1 204 No Content\r\n\r\n"]

    real = RecordingSocket()  # sendfile and anything else that touches the socket: the head first
    sock = _CoalescingSocket(real)
    sock.sendall(b"HEAD")
    assert sock.fileno() == 99 and real.sent == [b"HEAD"]
    sock = _CoalescingSocket(real)
    sock.sendall(b"HEAD2")
    assert sock.getpeername() == ("127.0.0.1", 1) and real.sent == [b"HEAD", b"HEAD2"]

    real = RecordingSocket()  # a first write too large to be a head is sent as it is
    sock = _CoalescingSocket(real)
    big = b"x" * (HEAD_BUFFER_LIMIT + 1)
    sock.sendall(big)
    assert real.sent == [big]


def test_a_lone_short_text_gets_the_ids_a_batch_gives(app):
    from embedapi.tokenization import SINGLE_ENCODE_CHARS

    encoder = app.extensions["embedapi"].registry.models[EMBED].encoder
    texts = ["", "a", "検索クエリ: 日本語の質問", "テスト 😀 " * 40, "長い文書" * (SINGLE_ENCODE_CHARS // 4),
             "長い文書" * (SINGLE_ENCODE_CHARS // 4 + 1)]
    together = encoder.ids(texts + ["padding text"])
    for text, ids in zip(texts, together):
        assert encoder.ids([text]) == [ids]


def test_concurrent_requests_each_leave_one_access_line_with_their_request_id(gunicorn_server):
    n = 96

    def one(i: int) -> int:
        status, _, _ = call("POST", f"{gunicorn_server.url}/v1/embeddings", {"model": EMBED, "input": f"行 {i}"},
                            headers={"X-Request-ID": f"combined-{i}"})
        return status

    with ThreadPoolExecutor(24) as pool:
        assert set(pool.map(one, range(n))) == {200}
    ids = poll(lambda: (found := re.findall(r"rid=combined-(\d+)\b", gunicorn_server.log())) and len(found) >= n
               and found, "every access line")
    assert sorted(map(int, ids)) == list(range(n))
    for line in gunicorn_server.log().splitlines():  # whole lines: none interleaved with another
        if "combined-" in line:
            assert re.fullmatch(r".* embedapi\.access: POST /v1/embeddings 200 .* rid=combined-\d+", line), line


def test_generated_request_ids_are_32_hex_digits_and_distinct(client):
    ids = {client.get("/health").headers["X-Request-ID"] for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_long_lived_request_threads_do_not_grow_with_distinct_texts(app):
    """tokenizers 0.23 keeps a BPE model's word cache per thread (10,000 words each): a worker's request threads
    live as long as it does, and distinct texts grew it by hundreds of MB. The encoder turns that cache off."""
    encoder = app.extensions["embedapi"].registry.models[EMBED].encoder
    rng = random.Random(7)
    alphabet = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん日本語検索文書"
    texts = ["".join(rng.choice(alphabet) for _ in range(30)) for _ in range(24_000)]  # one word each, all distinct

    def encode(part: list[str]) -> None:
        for text in part:
            encoder.ids([text])

    with ThreadPoolExecutor(8) as pool:  # the same 8 threads throughout, as a worker's request threads are
        list(pool.map(encode, [texts[:800]] * 8))  # warm: each thread's first allocations
        before = status_kb(os.getpid(), "RssAnon")
        list(pool.map(encode, [texts[i::8] for i in range(8)]))
        grown = status_kb(os.getpid(), "RssAnon") - before
    # With the per-thread cache on, these 24,000 words grew the process by ~70 MB (~3 KB a word of 30 characters).
    assert grown < 6 * 1024, f"anonymous RSS grew by {grown} KiB"
