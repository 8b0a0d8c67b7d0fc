"""What the Redis broker adds to the conformance kit: namespaces, credentials, faults, scale-out.

The contracts every broker shares run in ``test_conformance.py``. These tests need a Redis on
127.0.0.1:6379 (``shared/SERVICES.md``); each uses a namespace of its own and drops it. The
restart test runs a private ``redis-server`` with an append-only file on a free port, so that
the shared server (which keeps nothing on disk) is never restarted.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import shutil
import socket
import subprocess
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from eventfn_redis import RedisBroker
from redis.asyncio import Redis

import eventfn
from eventfn.brokers import Broker, OutgoingMessage, Settlement, SubscriptionRef, from_url
from eventfn.exceptions import BrokerUnavailable
from tests.conftest import networked_url, require_networked

JOBS = SubscriptionRef(destination="jobs", kind="queue")
HOLD = 60.0
_MAX_LEASE_MS = 604_800_000  # MAX_LEASE in lua/common.lua


class Job(msgspec.Struct, frozen=True):
    n: int


@pytest.fixture
async def url() -> AsyncIterator[str]:
    """A URL of the shared Redis with a namespace private to the test, dropped afterwards."""
    url = networked_url("redis")
    require_networked("redis", url)
    yield url
    with anyio.move_on_after(30):
        async with from_url(url) as broker:
            await broker.drop()


def _message(
    n: int, destination: str = "jobs", key: str | None = None, delay: float = 0.0
) -> OutgoingMessage:
    body = msgspec.json.encode(Job(n))
    return OutgoingMessage(
        destination=destination, id=f"m{n}", type="job", body=body, key=key, delay=delay
    )


async def _keys(pattern: str) -> list[bytes]:
    async with Redis.from_url("redis://127.0.0.1:6379/0") as client:
        return [key async for key in client.scan_iter(match=pattern, count=1000)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _everything_said(error: BaseException) -> str:
    """The error as a log line or a traceback would show it, chained causes included."""
    return str(error) + "".join(traceback.format_exception(error))


# -- namespaces ----------------------------------------------------------------------------------


async def test_namespaces_are_isolated_and_drop_deletes_only_its_own(url: str) -> None:
    # The other namespace starts like this one: a careless SCAN MATCH would take both.
    other_url = url + "2"
    ours, theirs = url.split("namespace=")[1], other_url.split("namespace=")[1]
    stream = SubscriptionRef(destination="ledger", kind="stream", group="books")
    try:
        async with from_url(url) as broker, from_url(other_url) as other:
            for each in (broker, other):
                await each.declare([JOBS, stream])
            await broker.publish([_message(1), _message(2, "ledger", key="k")])
            await broker.publish([_message(3, "ledger", key="k"), _message(4, delay=HOLD)])
            [first] = await broker.fetch(stream, 10, lease=HOLD)
            await broker.settle([Settlement(delivery=first, outcome="dead")])
            assert await other.fetch(JOBS, 10, lease=HOLD) == [], "a namespace saw another's"
            assert await other.dead_letters() == [], "a namespace saw another's dead letters"
            mine = [k for k in await _keys(f"*{ours}*") if not k.startswith(f"{theirs}:".encode())]
            assert mine, "the broker wrote nothing?"
            assert all(key.startswith(f"{ours}:".encode()) for key in mine), mine
            before = await _keys(f"{theirs}:*")
            await broker.drop()
            left = await _keys(f"*{ours}*")
            assert all(k.startswith(f"{theirs}:".encode()) for k in left), f"drop() left {left}"
            assert sorted(left) == sorted(before), "drop() touched another namespace's keys"
            await other.publish([_message(5)])
            [still] = await other.fetch(JOBS, 10, lease=HOLD)
            assert still.id == "m5", "the other namespace stopped working after a drop"
    finally:
        async with from_url(other_url) as other:
            await other.drop()


async def test_namespace_must_be_plain(url: str) -> None:
    with pytest.raises(eventfn.ConfigurationError, match="namespace"):
        RedisBroker("redis://127.0.0.1:6379/0?namespace=a*b")


async def test_fetch_declares_again_what_redis_lost(url: str) -> None:
    # As after a restart of a Redis that keeps nothing on disk: the runner goes on.
    async with from_url(url) as broker, from_url(url) as wiper:
        await broker.declare([JOBS])
        await wiper.drop()
        assert await broker.fetch(JOBS, 10, lease=HOLD) == []
        await wiper.publish([_message(1)])
        [got] = await broker.fetch(JOBS, 10, lease=HOLD)
        assert (got.id, got.attempt) == ("m1", 1)


@pytest.mark.parametrize("key", ["", "a b\t,c\n=ü", " =1 2 3"])
async def test_any_key_keeps_its_order_and_bytes(url: str, key: str) -> None:
    # The key travels at the end of the receipt token and of the fetch reply's header.
    ledger = SubscriptionRef(destination="ledger", kind="stream", group="books")
    async with from_url(url) as broker:
        await broker.declare([ledger])
        await broker.publish([_message(n, "ledger", key=key) for n in range(3)])
        for n in range(3):
            [got] = await broker.fetch(ledger, 10, lease=HOLD)
            assert (got.id, got.key) == (f"m{n}", key), "a key came back changed or out of order"
            await broker.settle([Settlement(delivery=got, outcome="ack")])
        assert (await broker.stats(ledger)).pending == 0


async def test_stale_extend_leaves_the_new_lease_alone(url: str) -> None:
    async with from_url(url) as slow, from_url(url) as fast:
        assert isinstance(slow, RedisBroker) and isinstance(fast, RedisBroker)
        await slow.declare([JOBS])
        await slow.publish([_message(1)])
        [stale] = await slow.fetch(JOBS, 1, lease=0.05)
        with anyio.fail_after(10):
            while not (taken := await fast.fetch(JOBS, 1, lease=HOLD, wait=0.2)):
                pass
        await slow.extend([stale], 0.05)  # would cut the new lease to 50 ms if not fenced
        async with Redis.from_url("redis://127.0.0.1:6379/0") as client:
            stream = f"{slow.namespace}:sub:{taken[0].receipt[0]}:stream"
            [entry] = await client.xpending_range(stream, JOBS.group, "-", "+", 10)
        assert entry["consumer"].decode() == fast.consumer, "a stale extend took the delivery"
        # Leases are kept as idle time (see the README): the new lease still has most of HOLD.
        left = (_MAX_LEASE_MS - entry["time_since_delivered"]) / 1000
        assert left > HOLD / 2, f"the new lease has {left:.2f} s left after a stale extend"


# -- credentials ---------------------------------------------------------------------------------


async def test_refused_password_is_not_shown(private_redis: _PrivateRedis) -> None:
    for userinfo in (":s3cr3t-pw", "kit:s3cr3t-pw"):  # AUTH password, AUTH user password
        broker = from_url(f"redis://{userinfo}@127.0.0.1:{private_redis.port}/0")
        with pytest.raises(BrokerUnavailable) as refused:
            await broker.connect()
        said = _everything_said(refused.value)
        assert "s3cr3t-pw" not in said, said
        assert broker.describe() in str(refused.value), f"the error does not name the URL: {said}"
        assert "***" in broker.describe()


async def test_unreachable_server_is_named_without_password() -> None:
    port = _free_port()  # closed again: nothing listens there
    broker = from_url(f"redis://:s3cr3t-pw@127.0.0.1:{port}/0?namespace=nowhere")
    with pytest.raises(BrokerUnavailable) as down:
        await broker.connect()
    said = _everything_said(down.value)
    assert "s3cr3t-pw" not in said, said
    assert f"redis://:***@127.0.0.1:{port}/0" in str(down.value), said


# -- cancellation --------------------------------------------------------------------------------


class _CancelledDuringFetch(RedisBroker):
    """Its caller gives up while the fetch script runs (the shield lets the script finish)."""

    scope: anyio.CancelScope | None = None

    async def _run(self, script: str, args: Any, doing: str) -> Any:
        if script == "fetch" and self.scope is not None:
            self.scope.cancel()
        return await super()._run(script, args, doing)


async def test_cancelled_fetch_gives_back_what_it_leased(url: str) -> None:
    async with _CancelledDuringFetch(url) as broker:
        await broker.declare([JOBS])
        await broker.publish([_message(1)])
        with anyio.CancelScope() as scope:
            broker.scope = scope
            await broker.fetch(JOBS, 10, lease=HOLD)
        assert scope.cancelled_caught
        broker.scope = None
        # Given back, not held for the lease, and with no attempt counted.
        [again] = await broker.fetch(JOBS, 10, lease=HOLD)
        assert (again.id, again.attempt) == ("m1", 1)


async def test_cancelled_wait_leases_nothing(url: str) -> None:
    async with from_url(url) as broker:
        await broker.declare([JOBS])
        with anyio.move_on_after(0.3):
            await broker.fetch(JOBS, 10, lease=HOLD, wait=30)
        await broker.publish([_message(1)])
        [got] = await broker.fetch(JOBS, 10, lease=HOLD)
        assert (got.id, got.attempt) == ("m1", 1)


# -- runners -------------------------------------------------------------------------------------


class _Tally:
    """How often each job was handled; ``reached`` is set once ``at`` handlings were seen."""

    def __init__(self, at: int = 0) -> None:
        self.seen: collections.Counter[int] = collections.Counter()
        self.total = 0
        self.at = at
        self.reached = anyio.Event()

    def add(self, n: int) -> None:
        self.seen[n] += 1
        self.total += 1
        if self.at and self.total >= self.at:
            self.reached.set()

    def assert_all_handled(self, count: int) -> None:
        lost = sorted(set(range(count)) - set(self.seen))
        assert not lost, f"{len(lost)} of {count} jobs never handled, e.g. {lost[:5]}"


def _counting_app(tally: _Tally) -> eventfn.App:
    app = eventfn.App("redis-burst")

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        tally.add(job.n)

    return app


async def _publish_jobs(url: str, count: int) -> None:
    app = _counting_app(_Tally())
    async with from_url(url) as broker:
        await app.connect(broker)
        for start in range(0, count, 1000):
            jobs = range(start, min(count, start + 1000))
            await app.publish_many(app.message("jobs", Job(n)) for n in jobs)


async def test_two_runners_handle_each_message_exactly_once(url: str) -> None:
    count = 5000
    await _publish_jobs(url, count)
    tally = _Tally()
    summaries = []

    async def run() -> None:
        # Leases (30 s) never run out here, so nothing may be handled twice.
        async with from_url(url) as broker:
            summaries.append(await eventfn.Runner(_counting_app(tally), broker, burst=True).run())

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(run)
            group.start_soon(run)
    tally.assert_all_handled(count)
    twice = {n: times for n, times in tally.seen.items() if times > 1}
    assert not twice, f"handled more than once: {dict(list(twice.items())[:5])}"
    assert all(s.handled > 0 for s in summaries), "one runner did all the work: no sharing"


async def _burst_with_fault(
    url: str, count: int, fault: Callable[[RedisBroker], Awaitable[None]], *, at: int
) -> None:
    """Drain ``count`` jobs with a runner; run ``fault`` once ``at`` of them were handled."""
    tally = _Tally(at)

    async def inject(broker: RedisBroker) -> None:
        await tally.reached.wait()
        await fault(broker)

    async with RedisBroker(url) as broker:
        # A short lease: a fetch whose reply the fault cut off comes back within seconds.
        runner = eventfn.Runner(_counting_app(tally), broker, burst=True, lease=2.0)
        with anyio.fail_after(90):
            async with anyio.create_task_group() as group:
                group.start_soon(inject, broker)
                await runner.run()
                group.cancel_scope.cancel()
        stats = await broker.stats(JOBS)
    assert stats.pending == 0, f"left behind: {stats}"
    tally.assert_all_handled(count)


async def test_runner_reconnects_after_connections_are_killed(url: str) -> None:
    count = 3000
    await _publish_jobs(url, count)
    killed: list[int] = []

    async def kill_connections(broker: RedisBroker) -> None:
        # The runner's idle, busy and blocked connections, and no one else's on the shared
        # server (as CLIENT KILL TYPE normal would, were it alone): found by client name.
        async with Redis.from_url("redis://127.0.0.1:6379/0") as admin:
            for client in await admin.client_list(_type="normal"):
                if client["name"] == f"eventfn:{broker.consumer}":
                    killed.append(await admin.client_kill_filter(_id=client["id"]))

    await _burst_with_fault(url, count, kill_connections, at=count // 3)
    assert killed, "no connection of the runner was there to kill"


# -- a private server: a password, and a real restart that keeps the data ------------------------


class _PrivateRedis:
    """A redis-server of the test's own, on a free port, with a password and an append-only
    file synced on every write, so that a restart (even after SIGKILL) keeps every message."""

    def __init__(self, directory: Path, binary: str) -> None:
        self.port = _free_port()
        self.password = f"pw{uuid.uuid4().hex[:10]}"
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0?namespace=private"
        self.command = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(directory),
            "--requirepass", self.password, "--logfile", str(directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(self.command)

    def crash(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command)

    async def ready(self) -> None:
        with anyio.fail_after(20):
            while True:
                with contextlib.suppress(BrokerUnavailable):
                    async with from_url(self.url):
                        return
                await anyio.sleep(0.05)  # polling a server that is starting, under a deadline


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[_PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary on PATH to run a private server with")
    server = _PrivateRedis(tmp_path, binary)
    try:
        await server.ready()
        yield server
    finally:
        server.crash()


class _Signal(logging.Handler):
    """Sets an event when a warning is logged (the runner logs in the event loop's thread)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.event = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.event.set()


@pytest.mark.slow
async def test_runner_survives_server_restart_with_nothing_lost(
    private_redis: _PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    count = 3000
    await _publish_jobs(private_redis.url, count)
    caplog.set_level(logging.WARNING, logger="eventfn")
    signal = _Signal()

    async def crash_and_restart(broker: RedisBroker) -> None:
        logging.getLogger("eventfn").addHandler(signal)
        try:
            private_redis.crash()
            # Down until the runner has noticed and logged it, then back with its data.
            with anyio.fail_after(20):
                await signal.event.wait()
        finally:
            logging.getLogger("eventfn").removeHandler(signal)
        private_redis.start()

    await _burst_with_fault(private_redis.url, count, crash_and_restart, at=count // 3)
    said = caplog.text
    assert "redis://:***@127.0.0.1" in said, f"the outage was not logged with the URL: {said}"
    assert private_redis.password not in said, "a log line showed the password"


def test_broker_is_registered_for_redis_urls() -> None:
    broker: Broker = from_url("rediss://127.0.0.1:6380/0?namespace=x")
    assert isinstance(broker, RedisBroker)
    assert broker.namespace == "x"


# -- de-duplication (OutgoingMessage.dedupe) ------------------------------------------------------


async def test_dedupe_record_is_one_key_that_expires_with_its_window(url: str) -> None:
    tick = OutgoingMessage(destination="jobs", id="tick", type="job", body=b"{}", dedupe=30.0)
    async with from_url(url) as broker:
        assert isinstance(broker, RedisBroker)
        await broker.declare([JOBS])
        await broker.publish([tick, tick])  # the same id twice in one batch
        await broker.publish([_message(1)])  # without dedupe: no record
        [key] = await _keys(f"{broker.namespace}:dd:*")
        async with Redis.from_url("redis://127.0.0.1:6379/0") as client:
            ttl = await client.pttl(key)
        assert 25_000 < ttl <= 30_000, f"the record's TTL is {ttl} ms, not its 30 s window"
        got = await broker.fetch(JOBS, 10, lease=HOLD, wait=0.2)
        assert sorted(d.id for d in got) == ["m1", "tick"]
