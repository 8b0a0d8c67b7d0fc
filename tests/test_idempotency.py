"""Idempotency: the stores (memory and SQLite, one contract) and the middleware in a runner."""

from __future__ import annotations

import random
import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import eventfn
from eventfn.brokers import Broker, from_url
from eventfn.brokers.base import Delivery
from eventfn.brokers.memory import MemoryBroker
from eventfn.context import Context
from eventfn.events import decode_envelope
from eventfn.exceptions import ConfigurationError, DeadLetter, Duplicate
from eventfn.idempotency import (
    Claim,
    IdempotencyRecord,
    IdempotencyStore,
    MemoryIdempotencyStore,
    SQLiteIdempotencyStore,
    open_store,
    store_for,
)
from eventfn.middleware import Environment, Invocation, build_chain
from eventfn.middleware.idempotency import idempotency, stored_result

FP = "f" * 32
OTHER_FP = "0" * 32


class Job(msgspec.Struct, frozen=True):
    n: int
    note: str = ""


class Done(msgspec.Struct, frozen=True):
    n: int


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A broker without a store of its own gets a file in the current directory: keep it here.
    monkeypatch.chdir(tmp_path)
    yield
    MemoryIdempotencyStore.reset()


@pytest.fixture(params=["memory", "sqlite"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The embedded brokers, each with the store that goes with it (networked brokers have
    none of their own yet: they would all share the fallback file)."""
    if request.param == "memory":
        url = f"memory://{uuid.uuid4().hex}"
        yield url
        MemoryBroker.reset(url)
    else:
        yield f"sqlite:///{tmp_path / 'b.db'}"


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    async with from_url(broker_url) as connected:
        yield connected


# -- the store contract, on both stores ---------------------------------------------------------


StoreMaker = Callable[..., IdempotencyStore]


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreMaker:
    """Makes stores on one storage: each acts as another runner (or process)."""
    name = uuid.uuid4().hex

    def make(clock: FakeClock, lease: float = 30.0) -> IdempotencyStore:
        if request.param == "memory":
            return MemoryIdempotencyStore(name, clock=clock, lease=lease)
        return SQLiteIdempotencyStore(tmp_path / "keys.db", clock=clock, lease=lease)

    return make


async def test_new_key_is_acquired_then_reported_in_progress(make_store: StoreMaker) -> None:
    clock = FakeClock()
    async with make_store(clock) as store:
        claim = await store.acquire("orders/reserve", "o-1", FP, lease=10)
        assert isinstance(claim, Claim)
        assert claim.expires_at == pytest.approx(clock.now + 10)
        again = await store.acquire("orders/reserve", "o-1", FP, lease=10)
        assert isinstance(again, IdempotencyRecord)
        assert (again.state, again.token, again.fingerprint) == ("in_progress", claim.token, FP)
        # keys are scoped: the same key of another subscription is another key
        assert isinstance(await store.acquire("orders/email", "o-1", FP, lease=10), Claim)


async def test_exactly_one_of_many_concurrent_acquirers_wins(make_store: StoreMaker) -> None:
    clock = FakeClock()
    results: list[Claim | IdempotencyRecord] = []

    async def acquire(store: IdempotencyStore) -> None:
        results.append(await store.acquire("s", "contended", FP, lease=10))

    async with make_store(clock) as one, make_store(clock) as two, anyio.create_task_group() as tg:
        for n in range(100):
            tg.start_soon(acquire, one if n % 2 else two)
    winners = [r for r in results if isinstance(r, Claim)]
    assert len(winners) == 1
    assert {r.token for r in results if isinstance(r, IdempotencyRecord)} == {winners[0].token}


async def test_expiry_is_judged_from_stored_time_and_an_expired_lease_is_taken_over(
    make_store: StoreMaker,
) -> None:
    clock = FakeClock()
    async with make_store(clock) as crashed, make_store(clock) as other:
        first = await crashed.acquire("s", "k", FP, lease=10)
        assert isinstance(first, Claim)
        clock.advance(9.9)
        assert isinstance(await other.acquire("s", "k", FP, lease=10), IdempotencyRecord)
        clock.advance(0.2)  # no sweep has run: the stored expires_at alone frees the key
        second = await other.acquire("s", "k", FP, lease=10)
        assert isinstance(second, Claim) and second.token != first.token
        # the old holder has lost it: it can neither renew, complete nor release it
        assert await crashed.renew([first]) == [first]
        assert not await crashed.complete(first, ttl=60, outcome=None)
        await crashed.release(first)
        record = await other.get("s", "k")
        assert record is not None and record.token == second.token
        assert await other.complete(second, ttl=60, outcome=None)


async def test_renewal_keeps_a_long_holder_and_stops_at_take_over(make_store: StoreMaker) -> None:
    clock = FakeClock()
    async with make_store(clock) as store, make_store(clock) as other:
        claim = await store.acquire("s", "k", FP, lease=10)
        assert isinstance(claim, Claim)
        for _ in range(5):  # 40 s in all, four times the lease
            clock.advance(8)
            assert await store.renew([claim]) == []
            assert claim.expires_at == pytest.approx(clock.now + 10)
            assert isinstance(await other.acquire("s", "k", FP, lease=10), IdempotencyRecord)
        clock.advance(10)
        assert isinstance(await other.acquire("s", "k", FP, lease=10), Claim)
        assert await store.renew([claim]) == [claim]


async def test_renew_held_renews_what_is_due_and_drops_what_is_lost(
    make_store: StoreMaker,
) -> None:
    clock = FakeClock()
    store, other = make_store(clock), make_store(clock)
    store.renew_every = 3600  # this test renews by hand, on its fake clock
    async with store, other:
        claim = await store.acquire("s", "k", FP, lease=9)
        assert isinstance(claim, Claim)
        store.hold(claim)
        clock.advance(2)  # under a third of the lease: not due
        await store.renew_held()
        assert claim.expires_at == pytest.approx(clock.now + 7)
        clock.advance(2)
        await store.renew_held()
        assert claim.expires_at == pytest.approx(clock.now + 9)
        clock.advance(9)
        assert isinstance(await other.acquire("s", "k", FP, lease=9), Claim)
        await store.renew_held()
        assert claim.lost and claim.token not in store.held


async def test_release_frees_the_key_at_once(make_store: StoreMaker) -> None:
    clock = FakeClock()
    async with make_store(clock) as store:
        claim = await store.acquire("s", "k", FP, lease=30)
        assert isinstance(claim, Claim)
        await store.release(claim)
        assert await store.get("s", "k") is None
        assert isinstance(await store.acquire("s", "k", OTHER_FP, lease=30), Claim)


async def test_completed_key_keeps_fingerprint_and_outcome_until_its_ttl(
    make_store: StoreMaker,
) -> None:
    clock = FakeClock()
    async with make_store(clock) as store:
        claim = await store.acquire("s", "k", FP, lease=30)
        assert isinstance(claim, Claim)
        assert await store.complete(claim, ttl=60, outcome=b'{"result":7}')
        for fingerprint in (FP, OTHER_FP):  # the store reports; the middleware judges
            record = await store.acquire("s", "k", fingerprint, lease=30)
            assert isinstance(record, IdempotencyRecord)
            assert (record.state, record.fingerprint) == ("completed", FP)
            assert msgspec.json.decode(record.outcome or b"") == {"result": 7}
        clock.advance(59)
        assert await store.get("s", "k") is not None
        clock.advance(1)
        assert await store.get("s", "k") is None
        assert isinstance(await store.acquire("s", "k", OTHER_FP, lease=30), Claim)


async def test_completion_of_a_record_that_was_swept_is_still_written(
    make_store: StoreMaker,
) -> None:
    clock = FakeClock()
    async with make_store(clock) as store:
        claim = await store.acquire("s", "k", FP, lease=5)
        assert isinstance(claim, Claim)
        clock.advance(6)
        assert await store.sweep() == 1
        assert await store.complete(claim, ttl=60, outcome=None)
        record = await store.get("s", "k")
        assert record is not None and record.state == "completed"


async def test_sweep_removes_only_expired_records(make_store: StoreMaker) -> None:
    clock = FakeClock()
    async with make_store(clock) as store:
        for n in range(30):
            claim = await store.acquire("s", f"k{n}", FP, lease=10)
            assert isinstance(claim, Claim)
            if n % 3 == 0:
                await store.complete(claim, ttl=100, outcome=None)
        clock.advance(50)
        assert await store.sweep() == 20
        assert await store.sweep() == 0
        assert [n for n in range(30) if await store.get("s", f"k{n}")] == list(range(0, 30, 3))


async def test_sqlite_acquire_cancelled_in_flight_gives_the_key_back(tmp_path: Path) -> None:
    clock = FakeClock()
    async with SQLiteIdempotencyStore(tmp_path / "keys.db", clock=clock) as store:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(store.acquire, "s", "k", FP, lease=30.0))
            await anyio.lowlevel.checkpoint()  # the acquire is queued, its batch not yet sent
            tg.cancel_scope.cancel()

        got = await store.acquire("s", "k", FP, lease=30)
        if not isinstance(got, Claim):
            # This acquire joined the cancelled one's batch and lost to it; the give-back goes
            # in the next batch, ahead of this second try.
            got = await store.acquire("s", "k", FP, lease=30)
        assert isinstance(got, Claim)


async def test_a_closed_store_fails_fast(tmp_path: Path) -> None:
    store = SQLiteIdempotencyStore(tmp_path / "keys.db")
    with pytest.raises(eventfn.EventfnError, match="not open"):
        await store.acquire("s", "k", FP, lease=30)


# -- which store goes with which broker ---------------------------------------------------------


async def test_each_broker_gets_its_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = store_for(from_url("memory://shop"))
    assert isinstance(memory, MemoryIdempotencyStore) and memory.name == "memory://shop"
    sqlite = store_for(from_url(f"sqlite:///{tmp_path}/data/shop.db"))
    assert isinstance(sqlite, SQLiteIdempotencyStore)
    assert sqlite.path == str(tmp_path / "data" / "shop.idempotency.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EVENTFN_IDEMPOTENCY_LEASE", "2.5")
    other = store_for(_OtherBroker("other://host"))
    assert isinstance(other, SQLiteIdempotencyStore)
    assert other.path == str(tmp_path / "eventfn-idempotency.db") and other.lease == 2.5
    monkeypatch.setenv("EVENTFN_IDEMPOTENCY_LEASE", "soon")
    with pytest.raises(ConfigurationError, match="EVENTFN_IDEMPOTENCY_LEASE"):
        store_for(_OtherBroker("other://host"))


async def test_two_runners_on_one_memory_url_share_records() -> None:
    app = eventfn.App("shared")
    url = f"memory://{uuid.uuid4().hex}"
    async with open_store(app, from_url(url)) as one, open_store(app, from_url(url)) as two:
        assert isinstance(await one.acquire("s", "k", FP, lease=30), Claim)
        assert isinstance(await two.acquire("s", "k", FP, lease=30), IdempotencyRecord)


class _OtherBroker(Broker):
    """A broker of a scheme that brings no store of its own."""

    async def connect(self) -> None: ...
    async def close(self) -> None: ...
    async def declare(self, subscriptions: Any) -> None: ...
    async def publish(self, messages: Any) -> None: ...
    async def fetch(self, subscription: Any, limit: int, *, lease: float, wait: float = 0) -> Any:
        return []

    async def settle(self, settlements: Any) -> None: ...
    async def extend(self, deliveries: Any, lease: float) -> None: ...
    async def stats(self, subscription: Any) -> Any: ...
    async def dead_letters(
        self, subscription: Any = None, *, limit: int = 100, after: Any = None
    ) -> Any:
        return []

    async def dead_letter(self, record_id: str) -> Any: ...
    async def replay(self, record_ids: Any) -> int:
        return 0

    async def purge(self, subscription: Any = None) -> int:
        return 0


# -- the middleware on its own --------------------------------------------------------------------


@asynccontextmanager
async def chain_for(
    app: eventfn.App, clock: FakeClock, lease: float = 30.0
) -> AsyncIterator[tuple[Callable[[Any], Awaitable[Any]], IdempotencyStore]]:
    broker = from_url(f"memory://{uuid.uuid4().hex}", clock=clock)
    env = Environment(broker, clock)
    async with MemoryIdempotencyStore(clock=clock, lease=lease) as store:
        env.idempotency = store
        yield build_chain(app.subscriptions[0], [idempotency], env), store


def invocation(app: eventfn.App, job: Job, message_id: str) -> Invocation:
    subscription = app.subscriptions[0]
    message = app.message("jobs", job, id=message_id, now=1.0)
    delivery = Delivery(subscription="jobs", id=message.id, body=message.body, attempt=1, receipt=1)
    envelope = decode_envelope(message.body)
    ctx = Context(app, "jobs", delivery, envelope)
    return Invocation(subscription, delivery, envelope, subscription.build_args(envelope, ctx), ctx)


async def test_retry_policy_raises_retry_after_the_holders_remaining_lease() -> None:
    app = eventfn.App("unit")

    @app.on_queue("jobs", idempotent=True, on_duplicate="retry")
    async def work(job: Job) -> None: ...

    clock = FakeClock()
    async with chain_for(app, clock) as (call, store):
        holder = await store.acquire("jobs", "m-1", _fingerprint(Job(1)), lease=store.lease)
        assert isinstance(holder, Claim)
        clock.advance(12)
        with pytest.raises(eventfn.Retry) as raised:
            await call(invocation(app, Job(1), "m-1"))
        assert raised.value.after == pytest.approx(store.lease - 12)


async def test_wait_policy_sees_the_holder_complete_and_acks_a_duplicate() -> None:
    app = eventfn.App("unit")
    calls: list[str] = []

    @app.on_queue("jobs", idempotent=True)
    async def work(job: Job) -> None:
        calls.append("ran")

    clock = FakeClock()
    async with chain_for(app, clock) as (call, store):
        holder = await store.acquire("jobs", "m-1", _fingerprint(Job(1)), lease=30)
        assert isinstance(holder, Claim)
        polls = anyio.Event()
        acquire = store.acquire

        async def counting_acquire(*args: Any, **kwargs: Any) -> Claim | IdempotencyRecord:
            polls.set()  # the waiter is polling: it saw the key in progress
            return await acquire(*args, **kwargs)

        store.acquire = counting_acquire  # type: ignore[method-assign]

        async def finish_holder() -> None:
            await polls.wait()
            assert await store.complete(holder, ttl=60, outcome=None)

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish_holder)
            with pytest.raises(Duplicate):
                await call(invocation(app, Job(1), "m-1"))
        assert calls == []


async def test_wait_policy_is_bounded_by_the_lease_then_retries_later() -> None:
    app = eventfn.App("unit")

    @app.on_queue("jobs", idempotent=True)
    async def work(job: Job) -> None: ...

    clock = FakeClock()  # stands still: the holder's lease never runs out
    async with chain_for(app, clock, lease=0.2) as (call, store):
        holder = await store.acquire("jobs", "m-1", _fingerprint(Job(1)), lease=0.2)
        assert isinstance(holder, Claim)
        with anyio.fail_after(5), pytest.raises(eventfn.Retry) as raised:
            await call(invocation(app, Job(1), "m-1"))
        assert raised.value.after == pytest.approx(0.2)


async def test_different_payload_under_one_key_is_a_clear_dead_letter() -> None:
    app = eventfn.App("unit")

    @app.on_queue("jobs", idempotency_key=lambda job: f"order-{job.n}")
    async def work(job: Job) -> None: ...

    clock = FakeClock()
    async with chain_for(app, clock) as (call, _):
        await call(invocation(app, Job(1, note="first"), "m-1"))
        with pytest.raises(Duplicate):
            await call(invocation(app, Job(1, note="first"), "m-2"))
        with pytest.raises(DeadLetter, match=r"key 'order-1' of jobs was already used for a diff"):
            await call(invocation(app, Job(1, note="second"), "m-3"))


async def test_a_key_function_that_fails_dead_letters_the_event() -> None:
    app = eventfn.App("unit")

    @app.on_queue("jobs", idempotency_key=lambda job: {1: "one"}[job.n])
    async def work(job: Job) -> None: ...

    async with chain_for(app, FakeClock()) as (call, _):
        with pytest.raises(
            DeadLetter, match=r"idempotency_key of .* failed on this event: KeyError"
        ):
            await call(invocation(app, Job(2), "m-1"))


async def test_key_function_without_an_event_parameter_fails_at_start_up() -> None:
    app = eventfn.App("unit")

    @app.on_queue("jobs", idempotency_key=lambda envelope: envelope.subject)
    async def work(envelope: eventfn.Envelope) -> None: ...

    with pytest.raises(ConfigurationError, match="no event parameter"):
        async with chain_for(app, FakeClock()):
            pass


async def test_store_result_keeps_the_handlers_return_value() -> None:
    app = eventfn.App("unit")

    @app.on_queue("jobs", idempotent=True, store_result=True)
    async def work(job: Job) -> dict[str, int]:
        return {"doubled": job.n * 2}

    async with chain_for(app, FakeClock()) as (call, store):
        assert await call(invocation(app, Job(21), "m-1")) == {"doubled": 42}
        record = await store.get("jobs", "m-1")
        assert record is not None
        assert msgspec.json.decode(stored_result(record) or b"") == {"doubled": 42}


def _fingerprint(job: Job) -> str:
    from hashlib import blake2b

    return blake2b(msgspec.json.encode(job), digest_size=16).hexdigest()


# -- in a runner, on every embedded broker ---------------------------------------------------


class Effects:
    """A side effect that counts itself in SQLite: one row per key, the number of times."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("CREATE TABLE effects (key TEXT PRIMARY KEY, count INTEGER NOT NULL)")
        self.running: set[str] = set()
        self.overlaps: list[str] = []

    async def apply(self, key: str, *, hold: float = 0.0) -> None:
        if key in self.running:
            self.overlaps.append(key)
        self.running.add(key)
        try:
            await anyio.sleep(hold or random.random() / 1000)
            self.db.execute(
                "INSERT INTO effects VALUES (?, 1)"
                " ON CONFLICT (key) DO UPDATE SET count = count + 1",
                (key,),
            )
        finally:
            self.running.discard(key)

    def counts(self) -> Counter[str]:
        return Counter(dict(self.db.execute("SELECT key, count FROM effects").fetchall()))


@pytest.fixture
def effects(tmp_path: Path) -> Iterator[Effects]:
    counter = Effects(tmp_path / "effects.db")
    yield counter
    counter.db.close()


def fast_app(**options: Any) -> eventfn.App:
    return eventfn.App("idem", retry=eventfn.Retry(attempts=3, backoff=0.01, cap=0.05), **options)


async def burst(app: eventfn.App, broker: Broker, **options: Any) -> eventfn.Summary:
    options.setdefault("concurrency", 64)
    runner = eventfn.Runner(app, broker, burst=True, poll=0.05, **options)
    with anyio.fail_after(90):
        return await runner.run()


@pytest.mark.parametrize("keyed_by", ["message-id", "idempotency-key"])
async def test_each_of_1000_events_published_three_times_has_its_effect_once(
    broker_url: str, effects: Effects, keyed_by: str
) -> None:
    if keyed_by == "message-id":
        app = fast_app(idempotent=True)
    else:
        app = fast_app(idempotency_key=lambda job: f"job-{job.n}")

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        await effects.apply(f"job-{job.n}")

    copies = [(n, copy) for n in range(1000) for copy in range(3)]
    random.shuffle(copies)  # copies near each other wait for one in progress; others find it done
    async with from_url(broker_url) as broker:
        await app.connect(broker)
        await app.publish_many(
            app.message("jobs", Job(n), id=f"m-{n}" if keyed_by == "message-id" else None)
            for n, _ in copies
        )
        summary = await burst(app, broker)
        assert (await broker.stats(app.subscriptions[0].ref)).pending == 0
        assert await broker.dead_letters() == []
        await app.close()
    assert effects.counts() == Counter({f"job-{n}": 1 for n in range(1000)})
    assert effects.overlaps == []
    assert summary.handled == 1000 and summary.retried == 0


async def test_a_duplicate_in_progress_waits_and_never_runs_alongside(
    broker_url: str, effects: Effects, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lease far shorter than the handler: only renewal keeps the second runner out.
    monkeypatch.setenv("EVENTFN_IDEMPOTENCY_LEASE", "0.3")
    app = fast_app(idempotency_key=lambda job: f"job-{job.n}")
    starts: list[str] = []

    @app.on_queue("jobs")
    async def work(job: Job, ctx: eventfn.Context) -> None:
        starts.append(ctx.message_id)
        await effects.apply(f"job-{job.n}", hold=1.0)

    async with from_url(broker_url) as one, from_url(broker_url) as two:
        await app.connect(one)
        await app.publish_many(app.message("jobs", Job(7)) for _ in range(4))
        async with anyio.create_task_group() as tg:
            for broker in (one, two):
                tg.start_soon(burst, app, broker)
        await app.close()
    assert len(starts) == 1
    assert effects.counts() == Counter({"job-7": 1})
    assert effects.overlaps == []


async def test_a_different_payload_under_a_used_key_is_dead_lettered_with_the_reason(
    broker: Broker, effects: Effects
) -> None:
    app = fast_app(idempotent=True)

    @app.on_queue("orders")
    async def work(job: Job) -> None:
        await effects.apply(job.note)

    await app.connect(broker)
    await app.publish("orders", Job(1, note="first"), id="o-1")
    await app.publish("orders", Job(1, note="second"), id="o-1")
    summary = await burst(app, broker)
    assert effects.counts() == Counter({"first": 1})
    (record,) = await broker.dead_letters("orders")
    assert record.error_type == "eventfn.exceptions.DeadLetter"
    assert "idempotency key 'o-1' of orders was already used for a different payload" in (
        record.error_message
    )
    assert record.attempts == 1 and summary.dead_lettered == 1


async def test_a_handler_that_raises_releases_its_key_and_the_retry_runs(
    broker: Broker, effects: Effects
) -> None:
    app = fast_app(idempotent=True)
    attempts: list[int] = []

    @app.on_queue("jobs")
    async def work(job: Job, ctx: eventfn.Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("downstream busy")
        await effects.apply(f"job-{job.n}")

    await app.connect(broker)
    await app.publish("jobs", Job(1), id="m-1")
    summary = await burst(app, broker)
    assert attempts == [1, 2]
    assert effects.counts() == Counter({"job-1": 1})
    assert (summary.handled, summary.retried) == (1, 1)


async def test_a_duplicate_republishes_what_the_first_run_emitted_with_the_same_ids(
    broker: Broker,
) -> None:
    app = fast_app()
    received: dict[int, list[str]] = {}

    @app.on_queue("jobs", idempotent=True)
    async def work(job: Job, ctx: eventfn.Context) -> None:
        await ctx.emit(Done(job.n))

    @app.on_event(Done, group="after")
    async def after(done: Done, ctx: eventfn.Context) -> None:
        received.setdefault(done.n, []).append(ctx.message_id)

    await app.connect(broker)
    await app.publish_many(
        app.message("jobs", Job(n), id=f"m-{n}") for n in range(20) for _ in "abc"
    )
    await burst(app, broker)
    assert sorted(received) == list(range(20))
    for ids in received.values():
        assert len(ids) == 3 and len(set(ids)) == 1  # the first run's, then once per duplicate


async def test_on_duplicate_retry_comes_back_after_the_lease_and_finds_it_done(
    broker: Broker, effects: Effects, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENTFN_IDEMPOTENCY_LEASE", "0.5")
    app = fast_app(idempotency_key=lambda job: f"job-{job.n}", on_duplicate="retry")

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        await effects.apply(f"job-{job.n}", hold=0.2)

    await app.connect(broker)
    await app.publish_many(app.message("jobs", Job(3)) for _ in range(2))
    summary = await burst(app, broker, concurrency=2)  # both copies start at once
    assert effects.counts() == Counter({"job-3": 1})
    # the copy that found the key in progress was retried after the lease, then acked
    assert (summary.handled, summary.retried, summary.dead_lettered) == (1, 1, 0)


async def test_an_in_progress_key_whose_holder_died_is_taken_over_after_its_lease(
    broker: Broker, effects: Effects, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENTFN_IDEMPOTENCY_LEASE", "0.5")
    app = fast_app(idempotent=True)

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        await effects.apply(f"job-{job.n}")

    await app.connect(broker)
    message = app.message("jobs", Job(5), id="m-5")
    async with store_for(broker) as dead_runner:  # acquires, then never completes nor renews
        fingerprint = _fingerprint(Job(5))
        assert isinstance(await dead_runner.acquire("jobs", "m-5", fingerprint, lease=0.5), Claim)
    await broker.publish([message])
    summary = await burst(app, broker)
    assert effects.counts() == Counter({"job-5": 1})
    assert summary.handled == 1 and summary.retried == 0
