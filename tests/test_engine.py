"""The batching engine with the real tiny model: coalescing, token budget, order, parity, 429, cancel.

Every engine here runs the REAL forward pass of the session app's tiny model. A spy wraps the
runner: it records each batch (which submitted sequences it held) and delegates to the real
runner. To force queueing deterministically (no sleeps, no timing) the spy can hold its next
batch at a gate until the test has queued what it wants: that is fault injection, the forward
pass itself is untouched.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from embedapi.engine import DeviceSlots, Engine
from embedapi.errors import ClientGone, QueueFull

from .conftest import EMBED, RERANK

BOUND = 30.0  # seconds: an upper bound on any wait below, never a timing assertion

TEXTS = [
    "名古屋城の金のしゃちほこは有名です。",
    "温泉",
    "熱田神宮には草薙剣が祀られています。名古屋めしといえば味噌カツやひつまぶしです。",
    "蔵王温泉の泉質は硫黄泉で、冬は樹氷が見られます。",
    "テスト",
    "名古屋大学で開発された日本語の埋め込みモデルについて教えてください。長い文章も扱えます。" * 3,
    "ひつまぶし",
    "愛知県の県庁所在地は名古屋市です。",
]
SIMILAR = [0, 1, 2, 3, 4, 6, 7]  # texts of similar lengths: one batch without hitting the padding-waste bound


class Spy:
    """Records every batch the engine runs (as ids of the submitted sequence objects), then runs it
    on the real runner. `hold(n)` makes the next n batches wait at a gate until `release()`;
    `entered` is set once all n are at the gate."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.batches: list[list[int]] = []
        self.lengths: list[list[int]] = []
        self.entered = threading.Event()
        self._gate: threading.Event | None = None
        self._held: threading.Event | None = None
        self._to_hold = 0
        self._lock = threading.Lock()

    def hold(self, n: int = 1) -> None:
        self.entered.clear()
        self._to_hold = n
        self._gate = self._held = threading.Event()

    def release(self) -> None:
        assert self._held is not None
        self._held.set()

    def run(self, batch):
        with self._lock:
            self.batches.append([id(s) for s in batch])
            self.lengths.append([len(s) for s in batch])
        with self._lock:
            gate = self._gate
            self._to_hold -= 1
            if self._to_hold <= 0:
                self._gate = None
                self.entered.set()
        if gate is not None:
            assert gate.wait(BOUND), "test never released the gate"
        return self.runner.run(batch)


@pytest.fixture(scope="module")
def embed_model(app):
    return app.extensions["embedapi"].registry.models[EMBED]


@pytest.fixture(scope="module")
def seqs(embed_model):
    """Token-id sequences of TEXTS (with special tokens), as the service makes them."""
    enc = embed_model.encoder
    return [enc.single(ids) for ids in enc.ids(TEXTS)]


@pytest.fixture(scope="module")
def singles(embed_model, seqs):
    """Each sequence run alone through the real runner: the unbatched reference."""
    return np.stack([embed_model.engine.runner.run([s])[0] for s in seqs])


@pytest.fixture
def make_engine(embed_model):
    engines: list[Engine] = []

    def make(**kwargs) -> tuple[Engine, Spy]:
        spy = Spy(embed_model.engine.runner)
        engine = Engine("spy", spy, **kwargs)
        engines.append(engine)
        return engine, spy
    yield make
    for engine in engines:
        engine.stop(drain=False, timeout=BOUND)


def fresh(seqs):
    """New list objects with the same ids, so each submission is identifiable in the spy's record."""
    return [list(s) for s in seqs]


def block(engine: Engine, spy: Spy, seq) -> object:
    """Submit one item and wait until the engine thread is inside its (held) forward pass."""
    spy.hold()
    job = engine.submit([list(seq)])
    assert spy.entered.wait(BOUND)
    return job


def test_concurrent_jobs_coalesce_into_one_batch(make_engine, seqs, singles):
    engine, spy = make_engine()
    blocker = block(engine, spy, seqs[0])
    jobs, submitted = [], []
    for i in SIMILAR:  # seven requests of one text each arrive while the model is busy
        one = fresh([seqs[i]])
        submitted.append(id(one[0]))
        jobs.append(engine.submit(one))
    spy.release()
    rows = [job.wait(BOUND) for job in jobs]
    blocker.wait(BOUND)

    assert len(spy.batches) == 2, spy.lengths
    assert sorted(spy.batches[1]) == sorted(submitted)  # all seven requests in one forward pass
    for i, row in zip(SIMILAR, rows):
        assert row.shape == (1, singles.shape[1])
        np.testing.assert_allclose(row[0], singles[i], atol=1e-5)


def test_token_budget_splits_a_request_and_rows_come_back_in_order(make_engine, seqs, singles):
    budget = 96
    engine, spy = make_engine(max_batch_tokens=budget)
    many = [seqs[i % len(seqs)] for i in range(40)]
    job = engine.submit(fresh(many))
    rows = job.wait(BOUND)

    assert len(spy.batches) > 1  # one request had to be split
    for lengths in spy.lengths:
        assert len(lengths) == 1 or len(lengths) * max(lengths) <= budget, lengths
    assert sum(len(b) for b in spy.batches) == len(many)  # every item computed exactly once
    np.testing.assert_allclose(rows, singles[[i % len(seqs) for i in range(40)]], atol=1e-5)


def test_a_single_item_over_the_budget_still_runs_alone(make_engine, embed_model, seqs):
    engine, spy = make_engine(max_batch_tokens=8)
    long = seqs[5]
    assert len(long) > 8
    rows = engine.submit(fresh([long, seqs[4]])).wait(BOUND)
    assert [len(b) for b in spy.batches] == [1, 1]
    np.testing.assert_allclose(rows[0], embed_model.engine.runner.run([long])[0], atol=1e-5)


def test_interleaved_requests_share_batches_and_each_gets_its_own_rows(make_engine, seqs, singles):
    engine, spy = make_engine(max_batch_tokens=160)
    blocker = block(engine, spy, seqs[1])
    plans = [[(k + j) % len(seqs) for j in range(3 + k)] for k in range(6)]
    owners: dict[int, int] = {}
    jobs = []
    for k, plan in enumerate(plans):
        items = fresh([seqs[i] for i in plan])
        owners.update({id(s): k for s in items})
        jobs.append(engine.submit(items))
    spy.release()
    for plan, job in zip(plans, jobs):
        np.testing.assert_allclose(job.wait(BOUND), singles[plan], atol=1e-5)
    blocker.wait(BOUND)
    later = spy.batches[1:]
    assert sum(len(b) for b in later) == sum(len(p) for p in plans)
    assert any(len({owners[i] for i in batch}) > 1 for batch in later)  # requests shared a batch
    spread = {k: sum(1 for batch in later if any(owners[i] == k for i in batch)) for k in range(len(plans))}
    assert max(spread.values()) > 1  # a request was split across batches
    for lengths in spy.lengths[1:]:
        assert len(lengths) == 1 or len(lengths) * max(lengths) <= 160


def test_queue_full_is_a_429_with_retry_after(make_engine, seqs):
    engine, spy = make_engine(max_queue_tokens=2 * len(seqs[0]))
    blocker = block(engine, spy, seqs[0])  # taken off the queue: the queue is empty again
    waiting = engine.submit(fresh([seqs[0], seqs[0]]))  # fills the queue exactly
    with pytest.raises(QueueFull) as caught:
        engine.submit(fresh([seqs[4]]))
    error = caught.value
    assert error.status == 429 and error.code == "queue_full" and error.type == "rate_limit_error"
    assert error.headers.get("Retry-After") == "1"
    assert engine.queued_tokens == 2 * len(seqs[0])
    spy.release()
    assert waiting.wait(BOUND).shape[0] == 2 and blocker.wait(BOUND).shape[0] == 1
    assert engine.submit(fresh([seqs[4]])).wait(BOUND).shape[0] == 1  # room again once drained


def test_a_request_larger_than_the_queue_is_taken_when_the_queue_is_empty(make_engine, seqs):
    engine, spy = make_engine(max_queue_tokens=4)
    rows = engine.submit(fresh(seqs[:3])).wait(BOUND)
    assert rows.shape[0] == 3


def test_a_cancelled_job_is_not_computed(make_engine, seqs, singles):
    engine, spy = make_engine()
    blocker = block(engine, spy, seqs[0])
    gone_items = fresh([seqs[2], seqs[3]])
    gone_job = engine.submit(gone_items)
    kept = engine.submit(fresh([seqs[1]]))
    with pytest.raises(ClientGone):  # the client hangs up while its job waits in the queue
        gone_job.wait(BOUND, gone=lambda: True, poll=0.001)
    spy.release()
    np.testing.assert_allclose(kept.wait(BOUND)[0], singles[1], atol=1e-5)
    blocker.wait(BOUND)
    computed = {i for batch in spy.batches for i in batch}
    assert not computed & {id(s) for s in gone_items}
    assert engine.queued_tokens == 0


def test_batching_off_never_mixes_requests(make_engine, seqs, singles):
    engine, spy = make_engine(batching=False)
    blocker = block(engine, spy, seqs[0])
    owners: dict[int, int] = {}
    jobs = []
    for k in range(4):
        items = fresh([seqs[k], seqs[k + 1]])
        owners.update({id(s): k for s in items})
        jobs.append(engine.submit(items))
    spy.release()
    for k, job in enumerate(jobs):
        np.testing.assert_allclose(job.wait(BOUND), singles[[k, k + 1]], atol=1e-5)
    blocker.wait(BOUND)
    later = spy.batches[1:]
    assert len(later) == 4
    for batch in later:
        assert len({owners[i] for i in batch}) == 1


def test_a_failing_forward_fails_only_its_batch(make_engine, seqs, singles):
    engine, spy = make_engine()
    real = spy.runner

    class Broken:
        def run(self, batch):
            raise RuntimeError("injected fault")
    spy.runner = Broken()
    with pytest.raises(RuntimeError, match="injected fault"):
        engine.submit(fresh([seqs[0]])).wait(BOUND)
    spy.runner = real
    np.testing.assert_allclose(engine.submit(fresh([seqs[0]])).wait(BOUND)[0], singles[0], atol=1e-5)


def test_rerank_pairs_batch_like_predict(app, ce_model):
    """Pairs of several requests in one batch score as CrossEncoder.predict scores each alone."""
    model = app.extensions["embedapi"].registry.models[RERANK]
    enc = model.encoder
    spy = Spy(model.engine.runner)
    engine = Engine("spy-rerank", spy)
    try:
        query = "名古屋の観光名所"
        docs = [TEXTS[i] for i in SIMILAR]
        q, *ds = enc.ids([query, *docs])
        blocker = block(engine, spy, enc.pair(q, ds[0]))
        jobs = [engine.submit([enc.pair(q, d)]) for d in ds]
        spy.release()
        logits = np.concatenate([job.wait(BOUND) for job in jobs])
        blocker.wait(BOUND)
        assert len(spy.batches) == 2 and len(spy.batches[1]) == len(docs)
        expected = ce_model.predict([(query, d) for d in docs], activation_fn=torch.nn.Identity(),
                                     convert_to_numpy=True)
        np.testing.assert_allclose(logits, expected, atol=1e-5)
    finally:
        engine.stop(drain=False, timeout=BOUND)


def test_concurrent_http_requests_coalesce_in_the_app_engine(app, embed_model, st_model):
    """Through Flask and the service: requests that arrive while the model is busy share a forward pass."""
    engine = embed_model.engine
    spy = Spy(engine.runner)
    engine.runner = spy
    n = len(SIMILAR)
    try:
        lanes = engine.slots.lanes  # every lane busy, so the requests below have to queue
        spy.hold(lanes)
        blocker_seq = list(embed_model.encoder.single(embed_model.encoder.ids(["待機"])[0]))
        blockers = []
        for i in range(lanes):  # one at a time, or the first lane would take them all in one batch
            blockers.append(engine.submit([blocker_seq]))
            for _ in range(int(BOUND / 0.01)):
                if len(spy.batches) > i:
                    break
                threading.Event().wait(0.01)
        assert spy.entered.wait(BOUND)

        def post(i: int):
            with app.test_client() as c:
                return c.post("/v1/embeddings", json={"model": EMBED, "input": TEXTS[SIMILAR[i]]})

        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(post, i) for i in range(n)]
            for _ in range(int(BOUND / 0.01)):  # bounded: until every request is queued
                if engine.pending_items >= n:
                    break
                threading.Event().wait(0.01)
            assert engine.pending_items == n
            spy.release()
            responses = [f.result(BOUND) for f in futures]
        for blocker in blockers:
            blocker.wait(BOUND)
    finally:
        engine.runner = spy.runner
    assert [r.status_code for r in responses] == [200] * n
    assert len(spy.batches) == lanes + 1 and len(spy.batches[lanes]) == n
    got = np.array([r.get_json()["data"][0]["embedding"] for r in responses], dtype=np.float32)
    expected = st_model.encode([TEXTS[i] for i in SIMILAR], normalize_embeddings=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_two_lanes_run_batches_side_by_side_and_one_request_gets_rows_from_both(make_engine, seqs, singles):
    """With two lanes a second forward pass starts while the first is still running, and a request split
    over both passes still gets every row, in order, equal to the model's own."""
    used: list[int] = []
    engine, spy = make_engine(max_batch_size=2, slots=DeviceSlots(lanes=2, threads=2), set_threads=used.append)
    spy.hold(2)  # both lanes stop at the gate: two passes are inside the model at once
    job = engine.submit(fresh(seqs[:4]))
    assert spy.entered.wait(BOUND), "the second lane never started a pass while the first was running"
    spy.release()
    rows = job.wait(BOUND)
    assert len(spy.batches) == 2 and all(len(b) == 2 for b in spy.batches)
    np.testing.assert_allclose(rows, singles[:4], atol=1e-5)
    assert used == [1, 1]  # side by side: each pass on its share of the two threads


def test_a_lone_pass_gets_every_thread(make_engine, seqs, singles):
    used: list[int] = []
    engine, spy = make_engine(slots=DeviceSlots(lanes=2, threads=2), set_threads=used.append)
    rows = engine.submit(fresh(seqs[:1])).wait(BOUND)
    np.testing.assert_allclose(rows, singles[:1], atol=1e-5)
    assert used == [2]

