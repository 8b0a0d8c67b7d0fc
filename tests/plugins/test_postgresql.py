"""The PostgreSQL broker beyond the conformance kit: namespaces, URLs and redaction, LISTEN/NOTIFY
wake-ups, competing runners, and the transactional outbox (``eventfn_postgresql.transaction``).

Every test that needs the server works in namespaces of its own (``networked_url``), dropped
afterwards; outside CI a missing server or plug-in skips them, under ``CI=true`` it fails them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import eventfn_postgresql
import msgspec
import pytest
from eventfn_postgresql import LeaseLost, OutboxClosed, PostgresBroker
from eventfn_postgresql._wake import Waker

import eventfn
from eventfn.brokers import (
    Broker,
    Delivery,
    OutgoingMessage,
    Settlement,
    SubscriptionRef,
    from_url,
)
from eventfn.context import Context
from eventfn.events import decode_envelope
from eventfn.exceptions import BrokerUnavailable, ConfigurationError
from tests.apps import pg_outbox
from tests.conftest import drop, networked_url, require_networked

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "plugins" / "postgresql" / "README.md"
JOBS = SubscriptionRef(destination="jobs", kind="queue")
AUDIT = SubscriptionRef(destination="audit", kind="queue")


class Job(msgspec.Struct, frozen=True):
    n: int


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of an empty namespace of its own on the PostgreSQL server, dropped afterwards."""
    url = networked_url("postgresql")
    require_networked("postgresql", url)
    yield url
    anyio.run(drop, url)


def namespace(url: str) -> str:
    return PostgresBroker(url).namespace


async def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run one statement on the broker's database, outside any broker."""
    connection = await asyncpg.connect(PostgresBroker(url).settings.dsn)
    try:
        return await connection.fetch(sql, *args)
    finally:
        await connection.close()


class _WatchedWaker(Waker):
    """A waker that says when a fetch starts waiting on it."""

    __slots__ = ("_waiting", "started")

    def __init__(self) -> None:
        self._waiting = 0
        super().__init__()
        self.started = anyio.Event()

    @property
    def waiting(self) -> int:
        return self._waiting

    @waiting.setter
    def waiting(self, count: int) -> None:
        self._waiting = count
        if count:
            self.started.set()


async def waiting_fetch(broker: Broker, ref: SubscriptionRef) -> anyio.Event:
    """An event set once a fetch of ``ref`` on ``broker`` waits for a notification."""
    assert isinstance(broker, PostgresBroker)
    await broker.declare([ref])
    waker = _WatchedWaker()
    broker._listener.wakers[broker._subscriptions[ref.name]] = waker
    return waker.started


def message(destination: str, tag: str, *, delay: float = 0.0) -> OutgoingMessage:
    return OutgoingMessage(
        destination=destination, id=tag, type="test", body=f'{{"n": "{tag}"}}'.encode(), delay=delay
    )


def context_for(app: eventfn.App, delivery: Delivery) -> Context:
    """The context a handler of ``app`` would get for ``delivery``."""
    return Context(app, delivery.subscription, delivery, decode_envelope(delivery.body))


async def take(
    broker: Broker, ref: SubscriptionRef, count: int, lease: float = 60
) -> list[Delivery]:
    got: list[Delivery] = []
    with anyio.fail_after(20):
        while len(got) < count:
            got += await broker.fetch(ref, count - len(got), lease=lease, wait=0.2)
    return got


async def burst(app: eventfn.App, broker: Broker, **options: Any) -> eventfn.Summary:
    runner = eventfn.Runner(app, broker, burst=True, poll=0.05, **options)
    with anyio.fail_after(60):
        return await runner.run()


# -- URLs, namespaces, errors ---------------------------------------------------------------------


def test_url_keeps_eventfn_parameters_out_of_the_dsn() -> None:
    broker = from_url(
        "postgres://app:s3cret@db.example:6432/shop"
        "?namespace=orders&sslmode=disable&pool_size=2&poll=0.5"
    )
    assert isinstance(broker, PostgresBroker)  # postgres:// is an alias
    assert broker.namespace == "orders"
    assert broker.settings.dsn == "postgres://app:s3cret@db.example:6432/shop?sslmode=disable"
    assert (broker.settings.pool_size, broker.settings.poll) == (2, 0.5)
    assert broker.describe().startswith("postgres://app:***@db.example:6432/shop?")
    assert "s3cret" not in repr(broker.settings)
    assert PostgresBroker("postgresql://db.example/shop").namespace == "eventfn"
    with pytest.raises(ConfigurationError, match="namespace 'Bad-Name'") as bad:
        PostgresBroker("postgresql://app:s3cret@db.example/shop?namespace=Bad-Name")
    assert "s3cret" not in str(bad.value)
    with pytest.raises(ConfigurationError, match="pool_size='0' must be a positive int"):
        PostgresBroker("postgresql://db.example/shop?pool_size=0")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _everything_said(error: BaseException) -> str:
    """The error's message, its traceback and every exception chained to it."""
    return "".join(traceback.format_exception(error))


async def test_unreachable_server_fails_with_the_url_but_not_its_password() -> None:
    url = f"postgresql://shop:hunter2@127.0.0.1:{_closed_port()}/test?namespace=nowhere"
    with pytest.raises(BrokerUnavailable) as failed:
        async with from_url(url):
            pytest.fail("connected to a closed port")
    assert "postgresql://shop:***@127.0.0.1" in str(failed.value)
    assert "hunter2" not in _everything_said(failed.value)


async def test_missing_database_is_named_without_the_password() -> None:
    url = "postgresql://root:hunter2@127.0.0.1:5432/eventfn_no_such_db?namespace=nowhere"
    require_networked("postgresql", url)
    with pytest.raises(BrokerUnavailable, match='"eventfn_no_such_db" does not exist') as failed:
        async with from_url(url):
            pytest.fail("connected to a database that does not exist")
    assert "root:***@127.0.0.1:5432" in str(failed.value)
    assert "hunter2" not in _everything_said(failed.value)


async def test_namespaces_are_separate_schemas_and_drop_removes_only_its_own(pg_url: str) -> None:
    other_url = networked_url("postgresql")
    try:
        async with from_url(pg_url) as one, from_url(other_url) as two:
            await one.declare([JOBS])
            await two.declare([JOBS])
            await one.publish([message("jobs", "m1")])
            assert await two.fetch(JOBS, 10, lease=30) == [], "a namespace saw another's message"
            await two.drop()
            schemas = {row[0] for row in await query(pg_url, "SELECT nspname FROM pg_namespace")}
            assert namespace(pg_url) in schemas
            assert namespace(other_url) not in schemas
            got = await one.fetch(JOBS, 10, lease=30)
            assert [d.id for d in got] == ["m1"], "drop of another namespace touched this one"
    finally:
        await drop(other_url)


async def test_runners_starting_at_once_create_the_schema_once(pg_url: str) -> None:
    brokers = [from_url(pg_url) for _ in range(4)]
    try:
        async with anyio.create_task_group() as group:
            for broker in brokers:
                group.start_soon(broker.connect)
        rows = await query(pg_url, f"SELECT version FROM {namespace(pg_url)}.meta")
        assert [row[0] for row in rows] == [1]
    finally:
        for broker in brokers:
            await broker.close()


async def test_published_at_zero_means_now_by_the_broker_clock(pg_url: str) -> None:
    async with from_url(pg_url) as broker:
        await broker.declare([JOBS])
        before = broker.clock()
        await broker.publish([message("jobs", "m1")])  # published_at defaults to 0
        [got] = await take(broker, JOBS, 1)
    assert before <= got.published_at <= broker.clock()


# -- waking fetches -------------------------------------------------------------------------------


async def test_waiting_fetch_wakes_on_a_publish_from_another_instance(pg_url: str) -> None:
    url = f"{pg_url}&poll=60"  # only a notification can end the wait early
    async with from_url(url) as consumer, from_url(url) as publisher:
        started = await waiting_fetch(consumer, JOBS)
        got: list[Delivery] = []

        async def consume() -> None:
            got.extend(await consumer.fetch(JOBS, 10, lease=30, wait=30))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(consume)
                await started.wait()
                published = time.monotonic()
                await publisher.publish([message("jobs", "m1")])
        woke_after = time.monotonic() - published
    assert [d.id for d in got] == ["m1"]
    assert woke_after < 5, f"the fetch took {woke_after:.2f}s to notice the publish"


async def test_waiting_fetch_wakes_when_a_delayed_message_comes_due(pg_url: str) -> None:
    url = f"{pg_url}&poll=60"
    async with from_url(url) as broker:
        await broker.declare([JOBS])
        published = time.monotonic()
        await broker.publish([message("jobs", "later", delay=0.5)])
        with anyio.fail_after(20):
            got = await broker.fetch(JOBS, 10, lease=30, wait=30)
        waited = time.monotonic() - published
    assert [d.id for d in got] == ["later"]
    assert 0.45 <= waited < 5, f"a message due in 0.5s came after {waited:.2f}s"


async def test_fetch_keeps_working_after_its_listen_connection_is_killed(pg_url: str) -> None:
    url = f"{pg_url}&poll=60"  # only the loss of the connection can end the wait early
    async with from_url(url) as consumer, from_url(url) as publisher:
        assert isinstance(consumer, PostgresBroker)
        started = await waiting_fetch(consumer, JOBS)
        got: list[Delivery] = []

        async def consume() -> None:
            got.extend(await consumer.fetch(JOBS, 10, lease=30, wait=30))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(consume)
                await started.wait()
                listener = consumer._listener._connection
                assert listener is not None
                await query(url, "SELECT pg_terminate_backend($1)", listener.get_server_pid())
                await publisher.publish([message("jobs", "m1")])
        assert [d.id for d in got] == ["m1"]
        assert await consumer.fetch(JOBS, 10, lease=30, wait=0.01) == []
        assert consumer._listener.listening, "the LISTEN connection was not made again"


# -- competing runners and streams ----------------------------------------------------------------


async def test_two_runners_share_a_burst_and_handle_each_message_once(pg_url: str) -> None:
    app = eventfn.App("two-runners")
    handled: Counter[int] = Counter()
    attempts: Counter[int] = Counter()

    @app.on_queue("jobs")
    async def work(job: Job, ctx: eventfn.Context) -> None:
        handled[job.n] += 1
        attempts[ctx.attempt] += 1
        await anyio.lowlevel.checkpoint()

    async with from_url(pg_url) as one, from_url(pg_url) as two:
        await app.connect(one)
        await app.publish_many(app.message("jobs", Job(n)) for n in range(2000))
        summaries: list[eventfn.Summary] = []

        async def run(broker: Broker) -> None:
            summaries.append(await burst(app, broker, concurrency=16))

        async with anyio.create_task_group() as group:
            group.start_soon(run, one)
            group.start_soon(run, two)
        await app.close()
    assert handled == Counter(range(2000)), "a message was handled twice, or never"
    assert attempts == Counter({1: 2000})
    assert all(s.handled > 0 for s in summaries), f"one runner did all the work: {summaries}"


async def test_runner_loses_nothing_when_its_connections_are_killed(pg_url: str) -> None:
    # Every connection of the runner's broker (pool and LISTEN) carries this name.
    name = f"eventfn_{namespace(pg_url)}"
    url = f"{pg_url}&application_name={name}"
    app = eventfn.App("killed-connections", retry=eventfn.Retry(attempts=10, backoff=0.01))
    handled: Counter[int] = Counter()

    @app.on_queue("jobs")
    async def work(job: Job, ctx: eventfn.Context) -> None:
        if job.n == 50 and ctx.attempt == 1:
            await query(
                url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = $1 AND pid <> pg_backend_pid()",
                name,
            )
        handled[job.n] += 1

    async with from_url(url) as broker:
        await app.connect(broker)
        await app.publish_many(app.message("jobs", Job(n)) for n in range(200))
        await burst(app, broker, concurrency=8)
        stats = await broker.stats(JOBS)
        await app.close()
    assert set(handled) == set(range(200)), "a message was lost when the connections died"
    assert (stats.pending, stats.dead) == (0, 0)


async def test_stream_keys_leave_nothing_behind_once_drained(pg_url: str) -> None:
    ref = SubscriptionRef(destination="clicks", kind="stream", group="g")
    async with from_url(pg_url) as one, from_url(pg_url) as two:
        await one.declare([ref])

        async def publish(broker: Broker, tag: str) -> None:
            for start in range(0, 100, 10):
                await broker.publish(
                    [
                        OutgoingMessage(
                            destination="clicks",
                            id=f"{tag}{n}",
                            type="t",
                            body=b"{}",
                            key=f"k{n % 4}",
                        )
                        for n in range(start, start + 10)
                    ]
                )

        async with anyio.create_task_group() as group:  # two publishers on the same keys
            group.start_soon(publish, one, "a")
            group.start_soon(publish, two, "b")
        order: dict[str | None, list[str]] = {}
        with anyio.fail_after(30):
            while sum(len(ids) for ids in order.values()) < 200:
                batch = await one.fetch(ref, 50, lease=60, wait=0.2)
                keys = [d.key for d in batch]
                assert len(keys) == len(set(keys)), f"two heads of one key leased: {keys}"
                for delivery in batch:
                    order.setdefault(delivery.key, []).append(delivery.id)
                await one.settle([Settlement(delivery=d, outcome="ack") for d in batch])
        ns = namespace(pg_url)
        for key, ids in order.items():  # each publisher's records of a key stay in its order
            for tag in "ab":
                mine = [int(i[1:]) for i in ids if i.startswith(tag)]
                assert mine == sorted(mine), f"key {key} of publisher {tag}: {mine}"
        left = await query(pg_url, f"SELECT count(*) FROM {ns}.stream_keys")
        assert left[0][0] == 0, "stream_keys kept counts of settled keys"


# -- the transactional outbox ---------------------------------------------------------------------


@pytest.fixture
async def outbox(pg_url: str) -> AsyncIterator[tuple[Broker, str]]:
    """A connected broker with queues ``jobs`` and ``audit``, and a table for handlers' rows."""
    table = f"{namespace(pg_url)}.rows"
    async with from_url(pg_url) as broker:
        await broker.declare([JOBS, AUDIT])
        await query(pg_url, f"CREATE TABLE {table} (n integer NOT NULL, attempt integer NOT NULL)")
        yield broker, table


async def rows(broker: Broker, table: str) -> list[tuple[int, int]]:
    found = await query(broker.url, f"SELECT n, attempt FROM {table} ORDER BY n, attempt")
    return [(row[0], row[1]) for row in found]


async def audited(broker: Broker, count: int, ref: SubscriptionRef = AUDIT) -> list[int]:
    """The ``n`` of every event on ``ref`` (expecting ``count``), checking there are no more."""
    got = await take(broker, ref, count)
    assert await broker.fetch(ref, 10, lease=60) == [], "more events were emitted than handled"
    return sorted(msgspec.json.decode(decode_envelope(d.body).data)["n"] for d in got)


def outbox_app(name: str) -> eventfn.App:
    return eventfn.App(name, retry=eventfn.Retry(attempts=3, backoff=0.01, cap=0.05))


async def test_outbox_commits_row_ack_and_event_together_even_if_handler_fails_after(
    outbox: tuple[Broker, str],
) -> None:
    broker, table = outbox
    app = outbox_app("outbox-after")
    calls: Counter[int] = Counter()

    @app.on_queue("jobs")
    async def store(job: Job, ctx: eventfn.Context) -> None:
        calls[job.n] += 1
        async with eventfn_postgresql.transaction(ctx) as conn:
            await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", job.n, ctx.attempt)
            await ctx.publish("audit", {"n": job.n})
        raise RuntimeError("failed after the outbox committed")

    await app.connect(broker)
    await app.publish_many(app.message("jobs", Job(n)) for n in range(20))
    await burst(app, broker)
    assert await rows(broker, table) == [(n, 1) for n in range(20)]
    assert calls == Counter(range(20)), "a committed message was delivered again"
    stats = await broker.stats(JOBS)
    assert (stats.pending, stats.dead) == (0, 0), f"the runner's retry settled it anyway: {stats}"
    assert await audited(broker, 20) == list(range(20))


async def test_outbox_commits_nothing_when_the_handler_fails_inside(
    outbox: tuple[Broker, str],
) -> None:
    broker, table = outbox
    app = outbox_app("outbox-inside")
    calls: Counter[int] = Counter()

    @app.on_queue("jobs")
    async def store(job: Job, ctx: eventfn.Context) -> None:
        calls[job.n] += 1
        async with eventfn_postgresql.transaction(ctx) as conn:
            await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", job.n, ctx.attempt)
            await ctx.publish("audit", {"n": job.n})
            if ctx.attempt == 1:
                raise RuntimeError("failed inside the outbox transaction")

    await app.connect(broker)
    await app.publish_many(app.message("jobs", Job(n)) for n in range(20))
    summary = await burst(app, broker)
    assert summary.retried == 20
    assert await rows(broker, table) == [(n, 2) for n in range(20)], "attempt 1 left rows"
    assert calls == Counter({n: 2 for n in range(20)})
    assert await audited(broker, 20) == list(range(20)), "attempt 1 emitted its event"


async def test_outbox_refuses_a_delivery_whose_lease_was_taken_over(
    outbox: tuple[Broker, str], pg_url: str
) -> None:
    slow, table = outbox
    app = outbox_app("outbox-fence")
    await slow.publish([app.message("jobs", Job(7))])
    [stale] = await take(slow, JOBS, 1, lease=0.2)
    async with from_url(pg_url) as fast:
        [current] = await take(fast, JOBS, 1)  # once the slow runner's lease ran out
        with pytest.raises(LeaseLost, match="taken over"):
            async with eventfn_postgresql.transaction(context_for(app, stale)) as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (7, 1)")
        async with eventfn_postgresql.transaction(context_for(app, current)) as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (7, 2)")
        await slow.settle([Settlement(delivery=stale, outcome="retry")])  # a late settle
        await fast.settle([Settlement(delivery=current, outcome="ack")])  # the runner's own
    assert await rows(slow, table) == [(7, 2)]
    stats = await slow.stats(JOBS)
    assert (stats.pending, stats.dead) == (0, 0), f"after the outbox ack: {stats}"


async def test_outbox_takes_events_emitted_before_it_and_refuses_them_after(
    outbox: tuple[Broker, str],
) -> None:
    broker, table = outbox
    app = outbox_app("outbox-seal")
    await broker.publish([app.message("jobs", Job(1))])
    [delivery] = await take(broker, JOBS, 1)
    ctx = context_for(app, delivery)
    ctx.emitted.append(app.message("audit", {"n": 1}))  # what ctx.emit does while handling
    async with eventfn_postgresql.transaction(ctx) as conn:
        await conn.execute(f"INSERT INTO {table} VALUES (1, 1)")
    assert list(ctx.emitted) == [], "the runner would publish the events a second time"
    with pytest.raises(OutboxClosed, match="emit inside the block"):
        ctx.emitted.append(app.message("audit", {"n": 2}))
    with pytest.raises(OutboxClosed, match="one transaction per message"):
        eventfn_postgresql.transaction(ctx)
    assert await audited(broker, 1) == [1]


async def test_outbox_uses_a_connection_of_yours_when_given(outbox: tuple[Broker, str]) -> None:
    broker, table = outbox
    app = outbox_app("outbox-own")
    await broker.publish([app.message("jobs", Job(3))])
    [delivery] = await take(broker, JOBS, 1)
    ctx = context_for(app, delivery)
    mine = await asyncpg.connect(PostgresBroker(broker.url).settings.dsn)
    try:
        async with mine.transaction():
            with pytest.raises(ConfigurationError, match="in a transaction already"):
                async with eventfn_postgresql.transaction(ctx, connection=mine):
                    pass
        async with eventfn_postgresql.transaction(ctx, connection=mine) as conn:
            assert conn is mine
            await conn.execute(f"INSERT INTO {table} VALUES (3, 1)")
        assert not mine.is_closed(), "the outbox closed a connection it does not own"
    finally:
        await mine.close()
    assert await rows(broker, table) == [(3, 1)]
    assert (await broker.stats(JOBS)).pending == 0


async def test_outbox_needs_a_postgresql_delivery() -> None:
    app = outbox_app("outbox-memory")
    body = app.message("jobs", Job(1)).body
    delivery = Delivery(subscription="jobs", id="m", body=body, attempt=1, receipt=(1, 1))
    with pytest.raises(ConfigurationError, match="delivered by the postgresql broker"):
        eventfn_postgresql.transaction(context_for(app, delivery))


async def test_readme_outbox_example_runs_as_written(pg_url: str, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (tmp_path / "orders.py").write_text(next(b for b in blocks if b.startswith("# orders.py")))
    spec = importlib.util.spec_from_file_location("readme_orders", tmp_path / "orders.py")
    assert spec is not None and spec.loader is not None
    orders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(orders)
    url = f"{pg_url}&search_path={namespace(pg_url)}"  # the example's table is unqualified
    async with from_url(url) as broker:
        await query(url, "CREATE TABLE orders (id text PRIMARY KEY, total_cents integer)")
        await orders.app.connect(broker)
        await orders.app.publish_many(
            orders.app.message("place-order", orders.PlaceOrder(order_id=f"o{n}", total_cents=n))
            for n in range(5)
        )
        summary = await burst(orders.app, broker)
        await orders.app.close()
    assert (summary.handled, summary.retried, summary.dead_lettered) == (10, 0, 0)
    placed = await query(url, "SELECT id, total_cents FROM orders ORDER BY id")
    assert [(row[0], row[1]) for row in placed] == [(f"o{n}", n) for n in range(5)]


@pytest.mark.slow
def test_sigkill_mid_burst_leaves_every_row_and_event_exactly_once(
    pg_url: str, tmp_path: Path
) -> None:
    count = 1500
    table = f"{namespace(pg_url)}.outbox_rows"
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "PG_OUTBOX_TABLE": table}
    audit = SubscriptionRef(destination=pg_outbox.AUDIT, kind="queue")

    async def prepare() -> None:
        async with from_url(pg_url) as broker:
            await query(pg_url, f"CREATE TABLE {table} (n integer, attempt integer, pid integer)")
            await pg_outbox.app.connect(broker)
            await broker.declare([audit])
            await pg_outbox.app.publish_many(
                pg_outbox.app.message(pg_outbox.JOBS, pg_outbox.Job(n)) for n in range(count)
            )
            await pg_outbox.app.close()

    def runner(*args: str, log: str, **env: str) -> subprocess.Popen[bytes]:
        with (tmp_path / log).open("wb") as sink:
            return subprocess.Popen(
                [
                    *(sys.executable, "-m", "eventfn", "--log-level", "warning", "run"),
                    *("tests.apps.pg_outbox:app", "--broker", pg_url, "--lease", "2", *args),
                ],
                cwd=ROOT,
                env={**environ, **env},
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def committed() -> int:
        return int(anyio.run(query, pg_url, f"SELECT count(*) FROM {table}")[0][0])

    anyio.run(prepare)
    first = runner("--concurrency", "16", log="killed.log", HANDLER_SLEEP="0.005")
    deadline = time.monotonic() + 60
    while committed() < 300:
        assert first.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline, "the first runner made no progress"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert committed() < count, "the burst finished before the kill; make it longer"

    second = runner("--concurrency", "32", "--burst", log="burst.log")
    assert second.wait(timeout=120) == 0, (tmp_path / "burst.log").read_text()
    found = anyio.run(query, pg_url, f"SELECT n, count(*), max(attempt) FROM {table} GROUP BY n")
    per_n = {row[0]: row[1] for row in found}
    assert set(per_n) == set(range(count)), "a job's row is missing"
    twice = {n: c for n, c in per_n.items() if c != 1}
    assert not twice, f"rows committed more than once: {twice}"
    # the killed runner's leased jobs (open transactions among them) came back, attempt raised
    assert any(row[2] >= 2 for row in found), "no job was redelivered after the kill"

    async def events() -> list[int]:
        async with from_url(pg_url) as broker:
            await broker.declare([audit])
            return await audited(broker, count, audit)

    assert anyio.run(events) == list(range(count)), "an event was lost or duplicated"


# -- de-duplication (OutgoingMessage.dedupe) ------------------------------------------------------


class _Clock:
    """Virtual epoch seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def tick(tag: str, window: float, message_id: str = "tick") -> OutgoingMessage:
    return OutgoingMessage(
        destination="jobs", id=message_id, type="test", body=tag.encode(), dedupe=window
    )


async def test_dedupe_table_is_added_to_a_namespace_made_before_it(pg_url: str) -> None:
    async with from_url(pg_url) as broker:
        await broker.declare([JOBS])
    schema = namespace(pg_url)
    await query(pg_url, f'DROP TABLE "{schema}".dedupe')  # as an older eventfn left it
    async with from_url(pg_url) as broker:
        await broker.publish([tick("first", 60), tick("copy", 60)])
        await broker.publish([tick("later", 60)])
        got = await take(broker, JOBS, 1)
        assert [d.body for d in got] == [b"first"]
        assert await broker.fetch(JOBS, 10, lease=60, wait=0.2) == []
    rows = await query(pg_url, f'SELECT version FROM "{schema}".meta')
    assert [row[0] for row in rows] == [1], "older runners must still accept the schema"


async def test_dedupe_by_the_broker_clock_with_expired_records_swept(pg_url: str) -> None:
    clock = _Clock()
    table = f'"{namespace(pg_url)}".dedupe'
    async with PostgresBroker(pg_url, clock=clock) as broker:
        await broker.declare([JOBS])
        await broker.publish([tick("t", 10, f"t{n}") for n in range(100)])
        clock.now += 9.9
        await broker.publish([tick("copy", 10, "t0")])  # within the window: dropped
        clock.now += 0.2
        # the window has ended: stored again, and each publish with dedupe deletes up to
        # 2 * 1 + 64 records whose windows ended (of other ids)
        await broker.publish([tick("again", 10, "t0")])
        assert [row[0] for row in await query(pg_url, f"SELECT count(*) FROM {table}")] == [34]
        clock.now += 100
        await broker.publish([tick("new", 10, "new")])
        assert [row[0] for row in await query(pg_url, f"SELECT count(*) FROM {table}")] == [1]
        await broker.publish([tick("new", 10, "newer")])
        assert [row[0] for row in await query(pg_url, f"SELECT count(*) FROM {table}")] == [2]
        got = await take(broker, JOBS, 103)
        assert Counter(d.id for d in got)["t0"] == 2
