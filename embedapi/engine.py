"""Per-model dynamic batching on a device's shared forward lanes, scheduled fairly between requests.

No Flask here. A request thread calls `Engine.submit(seqs)` and waits on the returned `Job`. Every
model on a device shares one `DeviceSlots`: its lane threads run one forward pass each at a time and
take turns between the waiting jobs of all those models by deficit round-robin on padded tokens, so
a request of a thousand long texts gets about one batch per turn while a one-text query waits for at
most one batch of it. A batch is still cut from length-sorted items under the token budget and may
carry several requests' items. Bulk work (a request over one batch's budget) never takes the `spare`
lanes, which on CPU keep a pass free for queries. docs/scheduling.md has the rules.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from .errors import ClientGone, QueueFull
from .osthreads import name_os_thread

log = logging.getLogger(__name__)

LANE_THREAD_NAME = b"embedapi-lane"  # what `top -H`, py-spy and /proc/<pid>/task/*/comm show for a lane


class Runner(Protocol):
    """The forward pass: full token-id sequences in, one float32 row per sequence out."""

    def run(self, batch: Sequence[Sequence[int]]) -> np.ndarray: ...


class BatchObserver(Protocol):
    def batch_done(self, model: str, size: int, padded_tokens: int, real_tokens: int,
                   queue_seconds: float, inference_seconds: float) -> None: ...

    def queue_depth(self, model: str, tokens: int) -> None: ...

    def request_queued(self, model: str, seconds: float) -> None: ...


class _NullObserver:
    def batch_done(self, *args: object, **kwargs: object) -> None:
        pass

    def queue_depth(self, *args: object, **kwargs: object) -> None:
        pass

    def request_queued(self, *args: object, **kwargs: object) -> None:
        pass


_waiter = threading.local()  # per request thread: the last job it waited for, for the hand-off metric


def take_rows_ready() -> tuple[str, float] | None:
    """(model, monotonic time its rows were all computed) of the last job the calling thread waited for, once;
    the Gunicorn worker turns it into the hand-off time after writing the response (embedapi_handoff_seconds)."""
    ready = getattr(_waiter, "ready", None)
    _waiter.ready = None
    return ready


class _Signal:
    """A one-shot event on one lock, held until `set()`: a set is one C-level release that wakes the waiter.

    threading.Event runs Python code under a Condition on both sides, and its woken waiter must then take
    that condition's lock back, which the setter may still hold: a second sleep and wake-up per request.
    """

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        self._set = True
        try:
            self._lock.release()
        except RuntimeError:  # set twice (a failure racing a shutdown): already released
            pass

    def wait(self, timeout: float) -> bool:
        if self._set:
            return True
        if self._lock.acquire(timeout=max(0.0, timeout)):
            self._lock.release()  # for any other waiter
            return True
        return self._set


@dataclass(eq=False)
class _Item:
    job: "Job"
    index: int
    ids: Sequence[int]


@dataclass(eq=False)
class Job:
    """One request's items; `wait()` returns their rows in submission order."""

    size: int
    submitted: float = field(default_factory=time.monotonic)
    rows: np.ndarray | None = None
    error: BaseException | None = None
    cancelled: bool = False
    # scheduling state, owned by the device's lock
    engine: "Engine | None" = None
    pending: list[_Item] = field(default_factory=list)  # not yet in a batch, shortest first
    bulk: bool = False
    deficit: int = 0
    first_pass: float | None = None
    ready_at: float | None = None  # when the last row was filled
    _left: int = 0
    _done: _Signal = field(default_factory=_Signal)

    def __post_init__(self) -> None:
        self._left = self.size

    def _fill(self, index: int, row: np.ndarray) -> None:
        if self.rows is None:
            self.rows = np.empty((self.size, *row.shape), dtype=np.float32)
        self.rows[index] = row
        self._left -= 1
        if self._left == 0:
            self.ready_at = time.monotonic()
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
        if self.ready_at is not None and self.engine is not None:
            _waiter.ready = (self.engine.name, self.ready_at)
        return self.rows


@dataclass
class _Pick:
    engine: "Engine"
    batch: list[_Item]
    bulk: bool
    threads: int
    first: list[Job]  # jobs whose first pass this is (their queue time is reported)


class DeviceSlots:
    """The forward lanes of one device, shared by the engines of its models.

    `lanes` passes may run at once, each on its own thread; on CPU a pass that starts with nothing
    else to run gets all of the worker's `threads`, else an equal share (`threads` 0 leaves the
    count alone, as on GPUs). Jobs of every model take turns in one ring (deficit round-robin, a
    quantum of one batch budget per turn). A job over one batch budget is bulk: bulk passes use the
    `lanes` only, and `spare` more lanes run other work (at most `lanes` such passes) while bulk work
    holds them, so a query never waits for a long pass to end. While bulk work runs, other passes start
    at most every `busy_wait_ms` and batch together meanwhile, so a stream of queries costs the bulk
    work little and each still waits a fraction of a second.
    """

    def __init__(self, lanes: int = 1, threads: int = 0, spare: int = 0, busy_wait_ms: float = 200.0) -> None:
        self.lanes = max(1, lanes)
        self.spare = max(0, spare)
        self.threads = max(0, threads)
        self.share = max(1, self.threads // self.lanes) if self.threads else 0
        self.busy_wait = max(0.0, busy_wait_ms) / 1000.0
        self._last_beside_bulk = float("-inf")  # when a pass last started beside running bulk work
        self._cond = threading.Condition()
        self._ring: deque[Job] = deque()
        self._engines: list[Engine] = []
        self._running = 0
        self._running_bulk = 0
        self._waiting = 0  # lanes in wait() on the condition
        self._live = 0
        self._threads: list[threading.Thread] = []

    # -- engines -----------------------------------------------------------------------
    def attach(self, engine: "Engine") -> None:
        with self._cond:
            self._engines.append(engine)
            if self._live == 0:  # first engine (or again after all stopped): start the lanes
                self._live = self.lanes + self.spare
                self._threads = [threading.Thread(target=self._lane, name=f"engine:{engine.name}:{i}", daemon=True)
                                 for i in range(self._live)]
                for thread in self._threads:
                    thread.start()

    def _detach(self, engine: "Engine") -> list[threading.Thread]:
        """Lock held. Forget `engine`; the lanes end once no engine is left (returned to join)."""
        if engine in self._engines:
            self._engines.remove(engine)
        self._cond.notify_all()
        return [] if self._engines else list(self._threads)

    # -- the lanes ---------------------------------------------------------------------
    def _lane(self) -> None:
        name_os_thread(LANE_THREAD_NAME)
        done: _Pick | None = None
        while True:
            with self._cond:
                if done is not None:  # the pass just run, accounted in the same lock section as the next pick
                    self._finished(done)
                while True:
                    if not self._engines and not self._ring:
                        self._live -= 1
                        return
                    pick = self._pick()
                    if isinstance(pick, _Pick):
                        break
                    self._waiting += 1
                    self._cond.wait(pick)  # None: until notified; a float: for company
                    self._waiting -= 1
            now = time.monotonic()
            for job in pick.first:
                job.engine.observer.request_queued(job.engine.name, now - job.submitted)  # type: ignore[union-attr]
            try:
                pick.engine._run(pick.batch, pick.threads)
            except BaseException:
                with self._cond:
                    self._finished(pick)
                raise
            done = pick

    def _finished(self, pick: _Pick) -> None:
        """Lock held: a pass has ended. The lane that ran it picks the next one itself, so no other lane is
        woken for the slot it frees; only a stopping engine (waiting for its passes to end) is told."""
        self._running -= 1
        self._running_bulk -= pick.bulk
        pick.engine._running -= 1
        if pick.engine._stopping or not self._engines:
            self._cond.notify_all()

    def wake_for(self, bulk: bool) -> None:
        """Lock held: new work of this kind arrived; wake one waiting lane if a pass of it may start now
        (a lane waiting for company wakes at its deadline anyway, a busy one picks when its pass ends)."""
        if self._waiting and self._allowed()[0 if bulk else 1]:
            self._cond.notify()

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._ring if j.cancelled]:
            self._ring.remove(job)
            engine = job.engine
            assert engine is not None
            engine._forget(job.pending)
            job.pending = []

    def _allowed(self) -> tuple[bool, bool]:
        """Lock held: whether a bulk pass, and whether another pass, may start now."""
        others = self._running - self._running_bulk
        return (self._running < self.lanes,
                others < self.lanes and self._running < self.lanes + self.spare)

    def _anchor(self, bulk_ok: bool, other_ok: bool) -> Job | None:
        """The job whose turn it is (deficit round-robin): the first in the ring with credit left;
        a job out of credit gets a quantum and, if still out (it rode along in others' batches),
        goes to the back. Jobs of a kind that may not start a pass now are passed over."""
        ring = self._ring
        i, visits = 0, 0
        while i < len(ring) and visits <= 2 * len(ring):
            job = ring[i]
            if not (bulk_ok if job.bulk else other_ok):
                i += 1
                continue
            if job.deficit <= 0:
                job.deficit += job.engine.max_batch_tokens  # type: ignore[union-attr]
                if job.deficit <= 0:
                    del ring[i]
                    ring.append(job)
                    visits += 1
                    continue
            return job
        return None

    def _pick(self) -> _Pick | float | None:
        """Lock held. The next batch to run; else seconds to wait for company, or None (nothing to do)."""
        self._drop_cancelled()
        bulk_ok, other_ok = self._allowed()
        anchor = self._anchor(bulk_ok, other_ok)
        if anchor is None:
            return None
        engine = anchor.engine
        assert engine is not None
        batch = engine._select(anchor, self._ring, bulk_ok)
        now = time.monotonic()
        if engine.batching and engine._last_jobs > 1 and not engine._full(batch):
            left = anchor.submitted + engine.batch_wait - now
            if left > 0:
                return left
        beside_bulk = self._running_bulk > 0 and not any(it.job.bulk for it in batch)
        if beside_bulk:
            left = self._last_beside_bulk + self.busy_wait - now
            if left > 0:
                return left
            self._last_beside_bulk = now
        jobs = engine._take(batch)
        for job in jobs:
            if not job.pending and job in self._ring:
                self._ring.remove(job)
        if anchor.deficit <= 0 and anchor in self._ring:
            self._ring.remove(anchor)
            self._ring.append(anchor)
        bulk = any(job.bulk for job in jobs)
        self._running += 1
        self._running_bulk += bulk
        engine._running += 1
        more = self._runnable()
        if more:
            self._cond.notify()  # work left for another lane
        threads = self.threads if (self._running == 1 and not more) else self.share  # a lone pass: every thread
        first = [job for job in jobs if job.first_pass is None]
        for job in first:
            job.first_pass = now
        return _Pick(engine, batch, bulk, threads, first)

    def _runnable(self) -> bool:
        """Lock held: could another lane start a pass now?"""
        bulk_ok, other_ok = self._allowed()
        return any(job.pending and (bulk_ok if job.bulk else other_ok) for job in self._ring)


class Engine:
    """One model's queue on its device's lanes: token budget, bounded queue (429), order of rows."""

    def __init__(self, name: str, runner: Runner, *, max_batch_tokens: int = 16384, max_batch_size: int = 256,
                 batch_wait_ms: float = 2.0, max_queue_tokens: int = 1 << 20, batching: bool = True,
                 observer: BatchObserver | None = None, slots: DeviceSlots | None = None,
                 set_threads: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.runner = runner
        self.max_batch_tokens = max(1, max_batch_tokens)
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_queue_tokens = max_queue_tokens
        self.batching = batching
        self.observer = observer or _NullObserver()
        self.slots = slots or DeviceSlots()  # the registry shares one per device across its models
        self.set_threads = set_threads
        self._queued_tokens = 0
        self._pending_items = 0
        self._running = 0
        self._stopping = False
        self._last_jobs = 1
        self._fill_lock = threading.Lock()  # a request split over batches gets rows from several lanes
        self.slots.attach(self)

    # -- request side ------------------------------------------------------------------
    def submit(self, seqs: Sequence[Sequence[int]]) -> Job:
        """Queue one request's sequences; QueueFull (429) at once if the token queue is full."""
        job = Job(size=len(seqs))
        tokens = sum(len(s) for s in seqs)
        job.engine = self
        job.pending = sorted((_Item(job, i, s) for i, s in enumerate(seqs)), key=lambda it: len(it.ids))
        job.bulk = self.batching and tokens > self.max_batch_tokens
        cond = self.slots._cond
        with cond:
            if self._stopping:
                raise QueueFull("the server is shutting down; retry on another instance",
                                headers={"Retry-After": "1"})
            # A request larger than the whole queue is still taken when nothing else waits.
            if self._pending_items and self._queued_tokens + tokens > self.max_queue_tokens:
                raise QueueFull(
                    f"model {self.name} is busy ({self._queued_tokens} tokens queued); retry in a second "
                    "or send smaller requests", headers={"Retry-After": "1"})
            if not job.pending:
                job._done.set()
                job.rows = np.empty((0, 0), dtype=np.float32)
                return job
            self.slots._ring.append(job)
            self._queued_tokens += tokens
            self._pending_items += len(job.pending)
            self.observer.queue_depth(self.name, self._queued_tokens)
            self.slots.wake_for(job.bulk)
        return job

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def pending_items(self) -> int:
        """Items queued and not yet in a forward pass."""
        return self._pending_items

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Refuse new work; with `drain`, finish what is queued first. The device's lanes end with
        its last engine."""
        slots = self.slots
        deadline = time.monotonic() + timeout
        with slots._cond:
            self._stopping = True
            if not drain:
                for job in [j for j in slots._ring if j.engine is self]:
                    slots._ring.remove(job)
                    self._forget(job.pending)
                    job.pending = []
                    job._fail(QueueFull("the server is shutting down", headers={"Retry-After": "1"}))
            slots._cond.notify_all()
            while (self._pending_items or self._running) and time.monotonic() < deadline:
                slots._cond.wait(max(0.0, deadline - time.monotonic()))
            threads = slots._detach(self)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    # -- batch forming (device lock held) -------------------------------------------------
    def _forget(self, items: Sequence[_Item]) -> None:
        self._pending_items -= len(items)
        self._queued_tokens -= sum(len(it.ids) for it in items)
        self.observer.queue_depth(self.name, self._queued_tokens)

    def _full(self, batch: list[_Item]) -> bool:
        padded = len(batch) * max(len(it.ids) for it in batch)
        return len(batch) >= self.max_batch_size or padded >= self.max_batch_tokens // 2

    def _select(self, anchor: Job, ring: Sequence[Job], bulk_ok: bool) -> list[_Item]:
        """The batch around the anchor job's shortest waiting item: candidates of this model (the anchor's
        first, then the other jobs in turn order) sorted by length and cut greedily under the token
        budget and a padding-waste bound. Batching off: the anchor's items only, one request per pass."""
        limit = self.max_batch_size * 8
        if self.batching:
            candidates: list[_Item] = []
            for job in itertools.chain((anchor,), (j for j in ring if j is not anchor)):
                if job.engine is self and (bulk_ok or not job.bulk):
                    candidates.extend(job.pending[: limit - len(candidates)])
                    if len(candidates) >= limit:
                        break
        else:
            candidates = list(anchor.pending[:limit])
        first = anchor.pending[0]
        candidates.sort(key=lambda it: len(it.ids))
        batch: list[_Item] = []
        real = 0
        has_first = False
        for item in candidates:
            n = len(item.ids)
            padded = (len(batch) + 1) * n
            fits = (len(batch) < self.max_batch_size and padded <= self.max_batch_tokens
                    and padded - (real + n) <= max(0.25 * padded, 256))
            if batch and not fits:
                if has_first:
                    return batch
                batch, real = [], 0
            batch.append(item)
            real += n
            has_first = has_first or item is first
        return batch

    def _take(self, batch: list[_Item]) -> list[Job]:
        """Take `batch`'s items off their jobs and charge each job its padded tokens; return the jobs."""
        width = max(len(it.ids) for it in batch)
        by_job: dict[int, tuple[Job, set[int]]] = {}
        for item in batch:
            by_job.setdefault(id(item.job), (item.job, set()))[1].add(id(item))
        for job, taken in by_job.values():
            job.pending = [it for it in job.pending if id(it) not in taken]
            job.deficit -= len(taken) * width
        self._forget(batch)
        self._last_jobs = len(by_job)
        return [job for job, _ in by_job.values()]

    # -- the forward pass (no lock) ------------------------------------------------------
    def _run(self, batch: list[_Item], threads: int) -> None:
        jobs = {id(it.job): it.job for it in batch}
        try:
            started = time.monotonic()
            if threads and self.set_threads is not None:
                self.set_threads(threads)
            rows = self.runner.run([it.ids for it in batch])
        except Exception as exc:  # a failed forward fails this batch's requests, not the worker
            # A runner that computed part of the batch (backend.BatchOutOfMemory: items that cannot fit
            # even alone) says which rows failed: only their requests fail, the others get their rows.
            failed, partial = getattr(exc, "failed", None), getattr(exc, "rows", None)
            bad = {id(batch[i].job) for i in failed} if failed is not None and partial is not None else set(jobs)
            log.exception("forward pass failed for model %s (batch of %d, %d of its %d requests fail)",
                          self.name, len(batch), len(bad), len(jobs))
            with self._fill_lock:
                for key in bad:
                    jobs[key]._fail(exc)
                    jobs[key].cancelled = True  # its items still queued are dropped, not computed for nothing
                if len(bad) < len(jobs):
                    for item, row in zip(batch, partial):
                        if id(item.job) not in bad and item.job.error is None:
                            item.job._fill(item.index, row)
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

