"""Fair scheduling between requests and models on a device's lanes (docs/scheduling.md).

The order of forward passes is what these tests check, so the runner is a scripted stand-in
(injected, as a fault test would inject one): each pass blocks until the test lets it finish and
returns, for every sequence, its first id, so a row tells which item it was computed for. The real
model's parity with batching is tested in test_engine.py and, end to end, in the live test below.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from embedapi.engine import DeviceSlots, Engine

from .conftest import EMBED
from .server import GunicornServer, call

BOUND = 30.0  # seconds: an upper bound on any wait, never a timing assertion
LONG, SHORT = 100, 5  # tokens per item
BUDGET = 4 * LONG  # a batch holds four long items


class Stepper:
    """A runner whose passes each wait for their own release; records which tags each pass held."""

    def __init__(self, on_pass=None) -> None:
        self.passes: list[list[int]] = []
        self.released_before: list[set[int]] = []  # per pass: the passes already let go when it started
        self._gates: list[threading.Event] = []
        self._entered = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.on_pass = on_pass
        self.free = False

    def run(self, batch):
        gate = threading.Event()
        with self._lock:
            self.passes.append([int(s[0]) for s in batch])
            self.released_before.append({i for i, g in enumerate(self._gates) if g.is_set()})
            self._gates.append(gate)
            n = len(self.passes)
            if self.free:
                gate.set()
        if self.on_pass is not None:
            self.on_pass(n)
        self._entered.release()
        assert gate.wait(BOUND), "the test never let the pass finish"
        return np.array([[float(s[0]), float(len(s))] for s in batch], dtype=np.float32)

    def entered(self, n: int = 1) -> None:
        for _ in range(n):
            assert self._entered.acquire(timeout=BOUND), "no forward pass started"

    def release(self, index: int) -> None:
        """Let pass number `index` (0-based, in start order) finish."""
        with self._lock:
            self._gates[index].set()

    def run_free(self) -> None:
        """Let every pass, running or to come, finish at once."""
        with self._lock:
            self.free = True
            for gate in self._gates:
                gate.set()


def items(tag: int, count: int, length: int) -> list[list[int]]:
    """`count` sequences of `length` ids whose first id is tag*1000 + their index."""
    return [[tag * 1000 + i] + [7] * (length - 1) for i in range(count)]


def owner(t: int) -> int:
    return t // 1000


@pytest.fixture
def engines():
    made: list[Engine] = []

    def make(stepper: Stepper, slots: DeviceSlots | None = None, name: str = "m", **kwargs) -> Engine:
        engine = Engine(name, stepper, max_batch_tokens=BUDGET, batch_wait_ms=0, slots=slots, **kwargs)
        made.append(engine)
        return engine
    yield make
    for engine in made:
        engine.runner.run_free()
        engine.stop(drain=False, timeout=BOUND)


def check_rows(job, tag: int, count: int, length: int) -> None:
    rows = job.wait(BOUND)
    np.testing.assert_array_equal(rows[:, 0], [tag * 1000 + i for i in range(count)])
    np.testing.assert_array_equal(rows[:, 1], [length] * count)


def test_a_query_behind_a_bulk_request_is_served_within_one_of_its_batches(engines):
    stepper = Stepper()
    engine = engines(stepper)  # one lane
    bulk = engine.submit(items(1, 40, LONG))
    stepper.entered()  # the bulk's first batch is in the model
    query = engine.submit(items(2, 1, SHORT))
    stepper.run_free()
    check_rows(query, 2, 1, SHORT)
    check_rows(bulk, 1, 40, LONG)
    served = next(i for i, p in enumerate(stepper.passes) if any(owner(t) == 2 for t in p))
    assert served <= 2, stepper.passes  # the running batch, then at most one more of the bulk's
    assert len(stepper.passes) <= 12  # the bulk still ran in full batches (40 items / 4 per batch)


def test_a_spare_lane_runs_a_query_while_bulk_work_holds_every_other(engines):
    stepper = Stepper()
    engine = engines(stepper, slots=DeviceSlots(lanes=2, threads=2, spare=1))
    bulk = engine.submit(items(1, 40, LONG))
    stepper.entered(2)  # bulk work holds both regular lanes, at full speed
    assert all(owner(t) == 1 for p in stepper.passes for t in p)
    query = engine.submit(items(2, 1, SHORT))
    stepper.entered()  # a third pass started while both bulk passes are still held...
    assert [owner(t) for t in stepper.passes[2]] == [2]  # ...and it is the query's
    stepper.release(2)
    check_rows(query, 2, 1, SHORT)  # answered while the bulk passes are still in the model
    stepper.run_free()
    check_rows(bulk, 1, 40, LONG)
    assert max(len(p) for p in stepper.passes) <= 4


def test_the_spare_lane_never_takes_bulk_work(engines):
    stepper = Stepper()
    engine = engines(stepper, slots=DeviceSlots(lanes=1, threads=2, spare=1))
    first = engine.submit(items(1, 12, LONG))
    stepper.entered()
    second = engine.submit(items(2, 12, LONG))  # a second bulk request finds only the spare lane free
    query = engine.submit(items(3, 1, SHORT))
    stepper.entered()
    assert [owner(t) for t in stepper.passes[1]] == [3]  # the spare lane ran the query, not bulk work
    stepper.run_free()
    check_rows(query, 3, 1, SHORT)
    check_rows(first, 1, 12, LONG)
    check_rows(second, 2, 12, LONG)


def test_beside_running_bulk_work_queries_are_batched_instead_of_run_one_by_one(engines):
    stepper = Stepper()
    engine = engines(stepper, slots=DeviceSlots(lanes=1, threads=2, spare=1, busy_wait_ms=BOUND * 1000))
    bulk = engine.submit(items(1, 5, LONG))  # over one batch budget: bulk
    stepper.entered()
    first = engine.submit(items(2, 1, SHORT))
    stepper.entered()  # the first query beside the bulk pass runs at once, on the spare lane
    stepper.release(1)
    check_rows(first, 2, 1, SHORT)
    later = [engine.submit(items(3, 1, SHORT)), engine.submit(items(4, 1, SHORT))]
    stepper.release(0)  # the bulk pass ends; the two queries waited for it instead of a pass each
    stepper.run_free()
    check_rows(later[0], 3, 1, SHORT)
    check_rows(later[1], 4, 1, SHORT)
    check_rows(bulk, 1, 5, LONG)
    served = [i for i, p in enumerate(stepper.passes) if {3, 4} & {owner(t) for t in p}]
    assert len(served) == 1 and {3, 4} <= {owner(t) for t in stepper.passes[served[0]]}, stepper.passes
    assert 0 in stepper.released_before[served[0]]


def test_two_bulk_requests_progress_together(engines):
    stepper = Stepper()
    engine = engines(stepper)
    first = engine.submit(items(1, 32, LONG))
    stepper.entered()
    second = engine.submit(items(2, 32, LONG))
    stepper.run_free()
    check_rows(first, 1, 32, LONG)
    check_rows(second, 2, 32, LONG)
    owners = [owner(p[0]) for p in stepper.passes]
    assert all(len({owner(t) for t in p}) == 1 for p in stepper.passes)
    # after the second arrives, neither gets more than one batch ahead of its share
    for n in range(2, len(owners)):
        ones, twos = owners[1:n].count(1), owners[1:n].count(2)
        if twos < 8:  # while both still have work
            assert abs(ones - twos) <= 1, owners


def test_a_stream_of_queries_does_not_starve_a_bulk_request(engines):
    pending: list = []
    engine: Engine | None = None

    def feed(n: int) -> None:  # a new query arrives during every pass: one is always waiting
        if n < 200:
            pending.append(engine.submit(items(100 + n, 1, SHORT)))

    stepper = Stepper(on_pass=feed)
    engine = engines(stepper)
    bulk = engine.submit(items(1, 20, LONG))
    stepper.run_free()
    check_rows(bulk, 1, 20, LONG)
    bulk_passes = [i for i, p in enumerate(stepper.passes) if any(owner(t) == 1 for t in p)]
    assert bulk_passes[0] == 0 and len(bulk_passes) <= 7  # whole batches (queries may ride along)
    gaps = [b - a for a, b in zip(bulk_passes, bulk_passes[1:])]
    assert max(gaps) <= 2, stepper.passes  # the bulk request gets every other pass at worst
    for job in pending:
        job.wait(BOUND)


def test_a_stream_of_bulk_requests_does_not_starve_a_query(engines):
    bulks: list = []
    engine: Engine | None = None

    def feed(n: int) -> None:  # a new bulk request arrives during every pass
        if n < 30:
            bulks.append(engine.submit(items(100 + n, 8, LONG)))

    stepper = Stepper(on_pass=feed)
    engine = engines(stepper)
    first = engine.submit(items(1, 8, LONG))
    stepper.entered()
    stepper.release(0)
    stepper.entered()  # the stream is running: bulk requests queued ahead
    query = engine.submit(items(2, 1, SHORT))
    stepper.run_free()
    check_rows(query, 2, 1, SHORT)
    check_rows(first, 1, 8, LONG)
    arrived = 1  # the query was submitted while pass index 1 ran
    served = next(i for i, p in enumerate(stepper.passes) if any(owner(t) == 2 for t in p))
    waiting_ahead = 2  # requests queued before it that had not had a turn yet
    assert served - arrived <= waiting_ahead + 1, stepper.passes
    for job in bulks:
        job.wait(BOUND)


def test_models_on_one_device_take_turns(engines):
    stepper = Stepper()
    slots = DeviceSlots(lanes=1)
    big = engines(stepper, slots=slots, name="big")
    small = engines(stepper, slots=slots, name="small")
    bulk = big.submit(items(1, 40, LONG))
    stepper.entered()
    query = small.submit(items(2, 1, SHORT))
    stepper.run_free()
    check_rows(query, 2, 1, SHORT)
    check_rows(bulk, 1, 40, LONG)
    served = next(i for i, p in enumerate(stepper.passes) if any(owner(t) == 2 for t in p))
    assert served <= 2
    assert all(len({owner(t) for t in p}) == 1 for p in stepper.passes)  # models never share a pass


def test_rows_land_in_input_order_across_interleaved_batches(engines):
    stepper = Stepper()
    engine = engines(stepper, slots=DeviceSlots(lanes=2, threads=2))
    lengths = [LONG if i % 3 else SHORT + i % 7 for i in range(30)]
    seqs = [[1000 + i] + [7] * (n - 1) for i, n in enumerate(lengths)]
    other = engine.submit(items(2, 12, LONG))
    job = engine.submit(seqs)
    stepper.run_free()
    rows = job.wait(BOUND)
    np.testing.assert_array_equal(rows[:, 0], [1000 + i for i in range(30)])
    np.testing.assert_array_equal(rows[:, 1], lengths)
    check_rows(other, 2, 12, LONG)


def test_each_request_reports_its_wait_for_a_first_pass(engines):
    seen: list[tuple[str, float]] = []

    class Observer:
        def batch_done(self, *args, **kwargs):
            pass

        def queue_depth(self, *args, **kwargs):
            pass

        def request_queued(self, model, seconds):
            seen.append((model, seconds))

    stepper = Stepper()
    engine = engines(stepper, observer=Observer())
    bulk = engine.submit(items(1, 12, LONG))
    stepper.entered()
    query = engine.submit(items(2, 1, SHORT))
    stepper.run_free()
    query.wait(BOUND)
    bulk.wait(BOUND)
    assert [m for m, _ in seen] == ["m", "m"]  # one report per request, not per batch
    assert all(s >= 0 for _, s in seen)


# -- the per-request token limit (service) ---------------------------------------------------------
@pytest.fixture
def token_limit(app):
    from dataclasses import replace

    st = app.extensions["embedapi"]
    before = st.settings

    def set_limit(n: int) -> None:
        st.settings = replace(before, max_request_tokens=n)
    yield set_limit
    st.settings = before


def test_a_request_over_the_token_limit_is_a_400_that_says_how_to_split_it(client, token_limit):
    ok = client.post("/v1/embeddings", json={"model": EMBED, "input": ["名古屋城", "温泉"], "input_type": "query"})
    used = ok.get_json()["usage"]["total_tokens"]
    token_limit(used)
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": ["名古屋城", "温泉"],
                                              "input_type": "query"}).status_code == 200  # at the limit
    token_limit(used - 1)  # the prefixes count: without them the request would fit
    resp = client.post("/v1/embeddings", json={"model": EMBED, "input": ["名古屋城", "温泉"], "input_type": "query"})
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["param"] == "input" and "EMBEDAPI_MAX_REQUEST_TOKENS" in error["message"]
    assert f"{used} tokens" in error["message"] and "split" in error["message"]


def test_a_rerank_over_the_token_limit_is_a_400(client, token_limit):
    from .conftest import RERANK

    token_limit(10)
    resp = client.post("/v1/rerank", json={"model": RERANK, "query": "名古屋の観光", "documents": ["名古屋城"] * 4})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "documents"


# -- live: a bulk request in flight and concurrent queries on real Gunicorn ---------------------
BULK_TEXT = "名古屋大学で開発された日本語の埋め込みモデルについて、長い文書を索引に入れています。"
QUERIES = ["名古屋城", "ひつまぶしの食べ方", "蔵王温泉の泉質", "熱田神宮", "味噌カツ", "金のしゃちほこ"]


def test_live_queries_are_answered_while_a_bulk_request_runs(models_file, st_model):
    # One lane and small batches: the bulk request needs hundreds of passes, a query one or two.
    server = GunicornServer(models_file, workers=1, env={"EMBEDAPI_MAX_BATCH_TOKENS": "1024"}).start()
    try:
        bulk_texts = [f"{i}番目: " + BULK_TEXT * 6 for i in range(1200)]
        done: list[str] = []
        lock = threading.Lock()

        def bulk():
            out = call("POST", server.url + "/v1/embeddings", {"model": EMBED, "input": bulk_texts}, timeout=600)
            with lock:
                done.append("bulk")
            return out

        def query(text: str):
            out = call("POST", server.url + "/v1/embeddings",
                       {"model": EMBED, "input": text, "input_type": "query"}, timeout=600)
            with lock:
                done.append("query")
            return text, out

        with ThreadPoolExecutor(1 + len(QUERIES)) as pool:
            bulk_future = pool.submit(bulk)
            for _ in range(int(BOUND / 0.01)):  # bounded: until the bulk request is being computed
                status, _, text = call("GET", server.url + "/metrics", timeout=BOUND)
                if f'embedapi_queue_tokens{{model="{EMBED}"}}' in text and \
                        f'embedapi_queue_tokens{{model="{EMBED}"}} 0.0' not in text:
                    break
                threading.Event().wait(0.01)
            answers = [f.result(600) for f in [pool.submit(query, q) for q in QUERIES]]
            status, _, body = bulk_future.result(600)
        assert status == 200 and len(body["data"]) == len(bulk_texts)
        assert done[-1] == "bulk" and done.count("query") == len(QUERIES)  # every query answered first
        want = st_model.encode(["検索クエリ: " + q for q in QUERIES], normalize_embeddings=True)
        for (text, (qstatus, _, qbody)), row in zip(answers, want):
            assert qstatus == 200
            np.testing.assert_allclose(qbody["data"][0]["embedding"], row, atol=1e-5)
        some = st_model.encode(bulk_texts[:3] + bulk_texts[-2:], normalize_embeddings=True)
        got = np.array([body["data"][i]["embedding"] for i in (0, 1, 2, -2, -1)])
        np.testing.assert_allclose(got, some, atol=1e-5)
        _, _, metrics = call("GET", server.url + "/metrics", timeout=BOUND)
        assert f'embedapi_request_queue_seconds_count{{model="{EMBED}"}} ' in metrics
    finally:
        server.stop()


def test_a_pass_that_fails_some_items_fails_only_their_requests(engines):
    """A runner that computed part of a batch (the GPU guard's BatchOutOfMemory: an item that cannot fit
    alone) names the failed rows: their request fails, the others in the same batch get their rows."""

    class PartFailure(Exception):
        def __init__(self, rows, failed):
            super().__init__("item too large (injected)")
            self.rows, self.failed = rows, failed

    class FailsLongItems:
        seen: list[set[int]] = []

        def run(self, batch):
            self.seen.append({owner(int(s[0])) for s in batch})
            rows = np.array([[float(s[0]), float(len(s))] for s in batch], dtype=np.float32)
            failed = [i for i, s in enumerate(batch) if len(s) > 2 * SHORT]
            if failed:
                rows[failed] = np.nan
                raise PartFailure(rows, failed)
            return rows

        def run_free(self):
            pass

    stepper = Stepper()
    engine = engines(stepper)
    blocker = engine.submit(items(9, 1, SHORT))
    stepper.entered()  # the queries below meet in one batch behind this pass
    ok = [engine.submit(items(tag, 1, SHORT)) for tag in (2, 3)]
    doomed = engine.submit(items(4, 1, 3 * SHORT))
    engine.runner = FailsLongItems()  # the next pass gets the fault; the held one finishes on the stepper
    stepper.run_free()
    blocker.wait(BOUND)
    for tag, job in zip((2, 3), ok):
        check_rows(job, tag, 1, SHORT)
    with pytest.raises(PartFailure):
        doomed.wait(BOUND)
    assert FailsLongItems.seen == [{2, 3, 4}]  # one batch held all three
