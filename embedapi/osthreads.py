"""OS-level thread names (Linux prctl; elsewhere nothing), so `top -H`, py-spy and /proc/<pid>/task/*/comm tell
the forward passes' threads (the engine's lanes, OpenVINO's streams) from request threads; bench/request_path.py
splits the worker's CPU by them. A thread started by a named thread inherits its name."""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import Iterator

_PR_SET_NAME, _PR_GET_NAME = 15, 16


def name_os_thread(name: bytes) -> bytes | None:
    """Name the calling thread (at most 15 bytes are kept); the name it had, or None where naming is not possible."""
    try:
        prctl = ctypes.CDLL(None).prctl
        old = ctypes.create_string_buffer(16)
        prctl(_PR_GET_NAME, old, 0, 0, 0)
        prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        return None
    return old.value


@contextmanager
def os_thread_name(name: bytes) -> Iterator[None]:
    """The calling thread named `name` for a while; threads it starts meanwhile keep the name."""
    old = name_os_thread(name)
    try:
        yield
    finally:
        if old is not None:
            name_os_thread(old)
