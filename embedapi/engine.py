"""Per-model dynamic batching: request threads submit token ids, inference threads run batches.

No Flask here. A request thread calls `Engine.submit(seqs)` and waits on the returned `Job`;
the engine's lane threads coalesce the items of all waiting jobs into length-sorted batches under
a padded-token budget (longest × count) and hand each job its rows. `DeviceSlots` bounds how many
forward passes run at once on a device (across its models) and how many CPU threads each may use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from .errors import ClientGone, QueueFull

log = logging.getLogger(__name__)


class Runner(Protocol):
    """The forward pass: full token-id sequences in, one float32 row per sequence out."""

    def run(self, batch: Sequence[Sequence[int]]) -> np.ndarray: ...


class BatchObserver(Protocol):
    def batch_done(self, model: str, size: int, padded_tokens: int, real_tokens: int,
                   queue_seconds: float, inference_seconds: float) -> None: ...

    def queue_depth(self, model: str, tokens: int) -> None: ...


class _NullObserver:
    def batch_done(self, *args: object, **kwargs: object) -> None:
        pass

    def queue_depth(self, *args: object, **kwargs: object) -> None:
        pass


class DeviceSlots:
    """Forward passes that may run at once on one device, shared by the engines of its models.

    On CPU, one forward pass of a small batch keeps two threads only partly busy (they meet at a
    barrier after every op, and Python runs between ops), so under load `lanes` passes run side by
    side on an equal share of the worker's `threads` each; a pass that starts with nothing else to do
    gets all of them, so an idle server answers as fast as one pass on every core. `threads` 0 leaves
    the thread count alone (GPUs).
    """

    def __init__(self, lanes: int = 1, threads: int = 0) -> None:
        self.lanes = max(1, lanes)
        self.threads = max(0, threads)
        self.share = max(1, self.threads // self.lanes) if self.threads else 0
        self._running = 0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, alone: bool) -> Iterator[int]:
        """Wait for a free lane; yield the CPU threads this pass may use (all if `alone` and no other
        pass runs, else a share; 0 = leave as is)."""
        with self._cond:
            while self._running >= self.lanes:
                self._cond.wait()
            self._running += 1
            threads = self.threads if (alone and self._running == 1) else self.share
        try:
            yield threads
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify()


@dataclass(eq=False)
class Job:
    """One request's items; `wait()` returns their rows in submission order."""

    size: int
    submitted: float = field(default_factory=time.monotonic)
    rows: np.ndarray | None = None
    error: BaseException | None = None
    cancelled: bool = False
    _left: int = 0
    _done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._left = self.size

    def _fill(self, index: int, row: np.ndarray) -> None:
        if self.rows is None:
            self.rows = np.empty((self.size, *row.shape), dtype=np.float32)
        self.rows[index] = row
        self._left -= 1
        if self._left == 0:
            self._done.set()

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._done.set()

    def wait(self, timeout: float, gone: Callable[[], bool] | None = None, poll: float = 0.1) -> np.ndarray:
        """Block until every row is computed; cancel and raise ClientGone if `gone()` turns true."""
        deadline = time.monotonic() + timeout
        while not self._done.wait(poll if gone else max(0.0, deadline - time.monotonic())):
            if gone is not None and gone():
                self.cancelled = True
                raise ClientGone()
            if time.monotonic() >= deadline:
                self.cancelled = True
                raise TimeoutError("the model did not answer in time")
        if self.error is not None:
            raise self.error
        assert self.rows is not None
        return self.rows


@dataclass(eq=False)
class _Item:
    job: Job
    index: int
    ids: Sequence[int]


class Engine:
    """A bounded queue and `slots.lanes` inference threads for one model."""

    def __init__(self, name: str, runner: Runner, *, max_batch_tokens: int = 16384, max_batch_size: int = 256,
                 batch_wait_ms: float = 2.0, max_queue_tokens: int = 1 << 20, batching: bool = True,
                 observer: BatchObserver | None = None, slots: DeviceSlots | None = None,
                 set_threads: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.runner = runner
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_queue_tokens = max_queue_tokens
        self.batching = batching
        self.observer = observer or _NullObserver()
        self.slots = slots or DeviceSlots()  # the registry shares one per device across its models
        self.set_threads = set_threads
        self._pending: deque[_Item] = deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._fill_lock = threading.Lock()  # a request split over batches gets rows from several lanes
        self._stopping = False
        self._last_jobs = 1
        self._threads = [threading.Thread(target=self._loop, name=f"engine:{name}:{i}", daemon=True)
                         for i in range(self.slots.lanes)]
        for thread in self._threads:
            thread.start()

    # -- request side ------------------------------------------------------------------
    def submit(self, seqs: Sequence[Sequence[int]]) -> Job:
        """Queue one request's sequences; QueueFull (429) at once if the token queue is full."""
        job = Job(size=len(seqs))
        tokens = sum(len(s) for s in seqs)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down; retry on another instance",
                                headers={"Retry-After": "1"})
            # A request larger than the whole queue is still taken when nothing else waits.
            if self._pending and self._queued_tokens + tokens > self.max_queue_tokens:
                raise QueueFull(
                    f"model {self.name} is busy ({self._queued_tokens} tokens queued); retry in a second "
                    "or send smaller requests", headers={"Retry-After": "1"})
            self._pending.extend(_Item(job, i, s) for i, s in enumerate(seqs))
            self._queued_tokens += tokens
            self.observer.queue_depth(self.name, self._queued_tokens)
            self._cond.notify()
        return job

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Refuse new work; with `drain`, finish what is queued before the thread ends."""
        with self._cond:
            self._stopping = True
            if not drain:
                for item in self._pending:
                    item.job._fail(QueueFull("the server is shutting down", headers={"Retry-After": "1"}))
                self._pending.clear()
                self._queued_tokens = 0
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- engine side -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending and self._stopping:
                    return
                batch = self._take_batch()
                alone = not self._pending
                if not alone:
                    self._cond.notify()  # work left: wake an idle lane
            if batch:
                self._run(batch, alone)

    def _take_batch(self) -> list[_Item]:
        """Pick the batch holding the oldest live item (lock held).

        When recent batches served several requests (so idle latency is untouched), wait up to
        `batch_wait` after the oldest item's arrival for company, unless the batch is already full.
        """
        self._drop_cancelled()
        if not self._pending:
            return []
        batch = self._select()
        if self.batching and self._last_jobs > 1:
            deadline = self._pending[0].job.submitted + self.batch_wait
            while not self._stopping and not self._full(batch):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
                self._drop_cancelled()
                if not self._pending:
                    return []
                batch = self._select()
        chosen = set(map(id, batch))
        self._pending = deque(it for it in self._pending if id(it) not in chosen)
        self._queued_tokens -= sum(len(it.ids) for it in batch)
        self.observer.queue_depth(self.name, self._queued_tokens)
        return batch

    def _full(self, batch: list[_Item]) -> bool:
        padded = len(batch) * max(len(it.ids) for it in batch)
        return len(batch) >= self.max_batch_size or padded >= self.max_batch_tokens // 2

    def _drop_cancelled(self) -> None:
        if any(it.job.cancelled for it in self._pending):
            dropped = [it for it in self._pending if it.job.cancelled]
            self._pending = deque(it for it in self._pending if not it.job.cancelled)
            self._queued_tokens -= sum(len(it.ids) for it in dropped)

    def _select(self) -> list[_Item]:
        """Sort candidates by length and cut them greedily into batches under the token budget and a
        padding-waste bound; return the batch that holds the oldest item (FIFO fairness)."""
        anchor = self._pending[0]
        if self.batching:
            candidates = list(self._pending)[: self.max_batch_size * 8]
        else:  # one request per batch: the seeds' design, kept for comparison
            candidates = [it for it in self._pending if it.job is anchor.job]
        candidates.sort(key=lambda it: len(it.ids))
        batch: list[_Item] = []
        real = 0
        for item in candidates:
            n = len(item.ids)
            padded = (len(batch) + 1) * n
            fits = (len(batch) < self.max_batch_size and padded <= self.max_batch_tokens
                    and padded - (real + n) <= max(0.25 * padded, 256))
            if batch and not fits:
                if any(it is anchor for it in batch):
                    return batch
                batch, real = [], 0
            batch.append(item)
            real += n
        return batch

    def _run(self, batch: list[_Item], alone: bool) -> None:
        jobs = {id(it.job): it.job for it in batch}
        self._last_jobs = len(jobs)
        try:
            with self.slots.slot(alone) as threads:
                started = time.monotonic()
                if threads and self.set_threads is not None:
                    self.set_threads(threads)
                rows = self.runner.run([it.ids for it in batch])
        except Exception as exc:  # a failed forward fails this batch's requests, not the worker
            log.exception("forward pass failed for model %s (batch of %d)", self.name, len(batch))
            with self._fill_lock:
                for job in jobs.values():
                    job._fail(exc)
            return
        finished = time.monotonic()
        with self._fill_lock:
            for item, row in zip(batch, rows):
                if item.job.error is None:
                    item.job._fill(item.index, row)
        queue_s = started - min(job.submitted for job in jobs.values())
        lengths = [len(it.ids) for it in batch]
        self.observer.batch_done(self.name, len(batch), len(batch) * max(lengths), sum(lengths),
                                 queue_s, finished - started)
