"""What the SQLite broker adds to the conformance kit: files, durability, processes, its SQL.

The contracts every broker shares are checked in ``test_conformance.py``; these tests cover what
only a durable, multi-process broker can get wrong.
"""

from __future__ import annotations

import collections
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import anyio
import msgspec
import pytest

from eventfn.brokers.base import (
    Delivery,
    Failure,
    Outcome,
    OutgoingMessage,
    Settlement,
    SubscriptionRef,
)
from eventfn.brokers.sqlite import _CLAIM, SQLiteBroker
from eventfn.exceptions import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    UnknownDestination,
)

JOBS = SubscriptionRef(destination="jobs", kind="queue")
DONE = SubscriptionRef(destination="done", kind="queue")
LEDGER = SubscriptionRef(destination="ledger", kind="stream", group="books")
HOLD = 60.0


class FakeClock:
    """Virtual epoch seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'broker.db'}"


@pytest.fixture
async def broker(url: str, clock: FakeClock) -> AsyncIterator[SQLiteBroker]:
    broker = SQLiteBroker(url, clock=clock)
    await broker.connect()
    await broker.declare([JOBS, DONE, LEDGER])
    yield broker
    await broker.close()


def message(
    destination: str, message_id: str, *, key: str | None = None, delay: float = 0.0
) -> OutgoingMessage:
    return OutgoingMessage(
        destination=destination,
        id=message_id,
        type="test.event",
        body=f'{{"id": "{message_id}"}}'.encode(),
        key=key,
        delay=delay,
    )


async def settle(
    broker: SQLiteBroker,
    outcome: Outcome,
    *deliveries: Delivery,
    delay: float = 0.0,
    failure: Failure | None = None,
    emitted: tuple[OutgoingMessage, ...] = (),
) -> None:
    await broker.settle(
        [
            Settlement(delivery=d, outcome=outcome, delay=delay, failure=failure, emitted=emitted)
            for d in deliveries
        ]
    )


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.id for d in deliveries]


# -- the URL and the file ------------------------------------------------------------------------


async def test_relative_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    broker = SQLiteBroker("sqlite:///data/nested/events.db")
    assert broker.path == str(tmp_path / "data" / "nested" / "events.db")
    await broker.connect()
    await broker.close()
    assert (tmp_path / "data" / "nested" / "events.db").is_file()


async def test_absolute_url_creates_missing_directories(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "events.db"
    url = f"sqlite:///{target}"
    assert url.startswith("sqlite:////")
    broker = SQLiteBroker(url)
    await broker.connect()
    await broker.close()
    await broker.close()  # idempotent
    assert target.is_file()
    with closing(sqlite3.connect(target)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("bad_url", ["sqlite://dbhost/events.db", "sqlite://", "sqlite:///"])
def test_url_without_a_local_file_is_refused(bad_url: str) -> None:
    with pytest.raises(ConfigurationError, match="sqlite:///"):
        SQLiteBroker(bad_url)


async def test_unopenable_path_is_unavailable_with_the_url_redacted(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    broker = SQLiteBroker(f"sqlite://user:s3cret@/{blocker}/sub/events.db")
    with pytest.raises(BrokerUnavailable) as caught:
        await broker.connect()
    assert "s3cret" not in str(caught.value)
    assert broker.describe() in str(caught.value)
    assert "***" in broker.describe()


async def test_file_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"definitely not SQLite " * 100)
    with pytest.raises(BrokerUnavailable, match=r"garbage\.db"):
        await SQLiteBroker(f"sqlite:///{path}").connect()


async def test_schema_from_a_newer_eventfn_is_refused(url: str, tmp_path: Path) -> None:
    broker = SQLiteBroker(url)
    await broker.connect()
    await broker.close()
    with closing(sqlite3.connect(tmp_path / "broker.db")) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(BrokerUnavailable, match="upgrade eventfn"):
        await SQLiteBroker(url).connect()


async def test_operations_before_connect_say_how_to_connect(url: str) -> None:
    with pytest.raises(BrokerError, match="not connected"):
        await SQLiteBroker(url).declare([JOBS])


# -- durability ----------------------------------------------------------------------------------


async def test_messages_attempts_and_dead_letters_survive_a_reopen(
    broker: SQLiteBroker, url: str, clock: FakeClock
) -> None:
    await broker.publish([message("jobs", f"m{n}") for n in range(4)])
    first = await broker.fetch(JOBS, 3, lease=10)
    await settle(broker, "dead", first[0], failure=Failure(error_type="E", message="x", at=5.0))
    await settle(broker, "retry", first[1], delay=0, failure=Failure(error_type="E", message="y"))
    await broker.close()  # first[2] stays leased, as after a crash

    clock.advance(11)
    reopened = SQLiteBroker(url, clock=clock)
    await reopened.connect()
    try:
        again = await reopened.fetch(JOBS, 10, lease=10)
        assert {d.id: d.attempt for d in again} == {"m1": 2, "m2": 2, "m3": 1}
        assert [r.message_id for r in await reopened.dead_letters("jobs")] == ["m0"]
    finally:
        await reopened.close()


async def test_times_come_back_as_floats(broker: SQLiteBroker) -> None:
    whole = msgspec.structs.replace(message("jobs", "m1"), published_at=1_700_000_000.0)
    await broker.publish([whole])
    [first] = await broker.fetch(JOBS, 1, lease=0)
    await settle(broker, "retry", first, failure=Failure(error_type="E", message="x", at=5.0))
    [again] = await broker.fetch(JOBS, 1, lease=HOLD)
    assert type(again.published_at) is float and again.published_at == 1_700_000_000.0
    assert type(again.first_failed_at) is float and again.first_failed_at == 5.0


async def test_publish_to_a_destination_another_instance_declared(
    broker: SQLiteBroker, url: str, clock: FakeClock
) -> None:
    publisher = SQLiteBroker(url, clock=clock)  # never declares anything itself
    await publisher.connect()
    try:
        await publisher.publish([message("ledger", "r1", key="k")])
        with pytest.raises(UnknownDestination, match="nowhere"):
            await publisher.publish([message("nowhere", "r2")])
    finally:
        await publisher.close()
    assert ids(await broker.fetch(LEDGER, 10, lease=HOLD)) == ["r1"]


async def test_redeclaring_a_group_replaces_its_type_filter(broker: SQLiteBroker) -> None:
    bus = SubscriptionRef(destination="bus", kind="topic", group="mail", types=("a",))
    await broker.declare([bus])
    await broker.declare(
        [SubscriptionRef(destination="bus", kind="topic", group="mail", types=("b",))]
    )
    await broker.publish(
        [
            OutgoingMessage(destination="bus", id="1", type="a", body=b"{}"),
            OutgoingMessage(destination="bus", id="2", type="b", body=b"{}"),
        ]
    )
    assert ids(await broker.fetch(bus, 10, lease=HOLD)) == ["2"]


# -- leases and fencing --------------------------------------------------------------------------


async def test_lease_expiry_redelivers_with_attempt_two(url: str) -> None:
    broker = SQLiteBroker(url)  # the real clock: the lease really runs out
    await broker.connect()
    try:
        await broker.declare([JOBS])
        await broker.publish([message("jobs", "m1")])
        [first] = await broker.fetch(JOBS, 10, lease=0.2)
        with anyio.fail_after(10):
            [again] = await broker.fetch(JOBS, 10, lease=HOLD, wait=10)
        assert (first.id, first.attempt) == ("m1", 1)
        assert (again.id, again.attempt) == ("m1", 2)
    finally:
        await broker.close()


async def test_a_taken_over_lease_cannot_be_settled_or_extended(
    broker: SQLiteBroker, clock: FakeClock
) -> None:
    await broker.publish([message("jobs", "m1")])
    [stale] = await broker.fetch(JOBS, 1, lease=10)
    clock.advance(11)
    [current] = await broker.fetch(JOBS, 1, lease=10)
    assert current.attempt == 2

    await broker.extend([stale], 1000)
    outcomes: tuple[Outcome, ...] = ("ack", "retry", "dead", "release")
    for outcome in outcomes:
        await settle(broker, outcome, stale)
    stats = await broker.stats(JOBS)
    assert (stats.in_flight, stats.dead) == (1, 0)
    clock.advance(11)  # the stale extend did not keep it hidden either
    assert (await broker.stats(JOBS)).ready == 1

    [last] = await broker.fetch(JOBS, 1, lease=10)
    await settle(broker, "ack", last)
    assert (await broker.stats(JOBS)).pending == 0


async def test_a_released_lease_cannot_settle_the_next_one(broker: SQLiteBroker) -> None:
    await broker.publish([message("jobs", "m1")])
    [released] = await broker.fetch(JOBS, 1, lease=HOLD)
    await settle(broker, "release", released)
    [current] = await broker.fetch(JOBS, 1, lease=HOLD)
    assert current.attempt == released.attempt == 1  # the attempt was not counted...
    await settle(broker, "ack", released)  # ...yet the old receipt is fenced off
    assert (await broker.stats(JOBS)).in_flight == 1


async def test_a_released_delivery_goes_back_to_the_front(
    broker: SQLiteBroker, clock: FakeClock
) -> None:
    await broker.publish([message("jobs", "m1")])
    [m1] = await broker.fetch(JOBS, 1, lease=HOLD)
    clock.advance(5)
    await broker.publish([message("jobs", "m2")])
    clock.advance(5)
    await settle(broker, "release", m1)
    assert ids(await broker.fetch(JOBS, 10, lease=HOLD)) == ["m1", "m2"]


async def test_a_cancelled_fetch_gives_its_claim_back(broker: SQLiteBroker) -> None:
    await broker.publish([message("jobs", f"m{n}") for n in range(3)])
    with anyio.CancelScope() as scope:
        scope.cancel()
        await broker.fetch(JOBS, 10, lease=HOLD)
    stats = await broker.stats(JOBS)
    assert (stats.ready, stats.in_flight) == (3, 0)
    assert [d.attempt for d in await broker.fetch(JOBS, 10, lease=HOLD)] == [1, 1, 1]


async def test_a_write_cancelled_midway_is_all_or_nothing(
    broker: SQLiteBroker, url: str, clock: FakeClock
) -> None:
    batch = [message("jobs", f"m{n}") for n in range(20_000)]  # a few hundred ms of inserts
    with anyio.move_on_after(0.01):
        await broker.publish(batch)
    other = SQLiteBroker(url, clock=clock)  # would wait out the busy timeout behind an open one
    await other.connect()
    try:
        with anyio.fail_after(2):
            await other.publish([message("jobs", "last")])
    finally:
        await other.close()
    assert (await broker.stats(JOBS)).ready in (1, 1 + len(batch))


# -- streams -------------------------------------------------------------------------------------


async def test_stream_key_waits_for_its_delayed_retry(
    broker: SQLiteBroker, clock: FakeClock
) -> None:
    await broker.publish(
        [
            message("ledger", "a1", key="a"),
            message("ledger", "a2", key="a"),
            message("ledger", "b1", key="b"),
            message("ledger", "n1"),
        ]
    )
    first = await broker.fetch(LEDGER, 10, lease=HOLD)
    assert ids(first) == ["a1", "b1", "n1"]
    a1 = first[0]
    await settle(broker, "retry", a1, delay=30)
    await settle(broker, "ack", *first[1:])
    assert await broker.fetch(LEDGER, 10, lease=HOLD) == []  # a2 waits behind a1's retry

    clock.advance(31)
    [again] = await broker.fetch(LEDGER, 10, lease=HOLD)
    assert (again.id, again.attempt) == ("a1", 2)
    await settle(broker, "dead", again, failure=Failure(error_type="E", message="gone"))
    assert ids(await broker.fetch(LEDGER, 10, lease=HOLD)) == ["a2"]


async def test_replayed_stream_record_queues_behind_its_key(
    broker: SQLiteBroker,
) -> None:
    await broker.publish([message("ledger", "a1", key="a")])
    [a1] = await broker.fetch(LEDGER, 1, lease=HOLD)
    await settle(broker, "dead", a1, failure=Failure(error_type="E", message="x"))
    await broker.publish([message("ledger", "a2", key="a")])
    [record] = await broker.dead_letters(LEDGER.name)
    assert await broker.replay([record.id, record.id, "not-a-number"]) == 1
    [a2] = await broker.fetch(LEDGER, 10, lease=HOLD)
    assert a2.id == "a2"
    await settle(broker, "ack", a2)
    [replayed] = await broker.fetch(LEDGER, 10, lease=HOLD)
    assert (replayed.id, replayed.attempt) == ("a1", 1)


def test_claim_reads_only_due_heads_from_its_index(tmp_path: Path) -> None:
    """The claim never sorts or scans a backlog: its cost is the batch, not the queue length."""
    anyio.run(_create_schema, f"sqlite:///{tmp_path / 'plan.db'}")
    with closing(sqlite3.connect(tmp_path / "plan.db")) as db:
        plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {_CLAIM}", (1, 0.0, 0.0, 256))]
    assert any("COVERING INDEX deliveries_due" in step for step in plan), plan
    assert not any("TEMP B-TREE" in step or step.startswith("SCAN") for step in plan), plan


async def _create_schema(url: str) -> None:
    broker = SQLiteBroker(url)
    await broker.connect()
    await broker.close()


# -- acks and what they emit ---------------------------------------------------------------------


async def test_emitted_messages_commit_with_their_ack(
    broker: SQLiteBroker, clock: FakeClock
) -> None:
    await broker.publish([message("jobs", "m1"), message("jobs", "m2")])
    m1, m2 = await broker.fetch(JOBS, 2, lease=10)

    # An emitted message nothing has declared: neither the ack nor the other emit happens.
    with pytest.raises(UnknownDestination):
        await settle(broker, "ack", m1, emitted=(message("done", "d1"), message("nowhere", "x")))
    assert (await broker.stats(JOBS)).in_flight == 2
    assert (await broker.stats(DONE)).pending == 0

    await settle(broker, "ack", m1, emitted=(message("done", "d1"),))
    clock.advance(11)  # m2's lease runs out and another runner takes it over
    [m2_again] = await broker.fetch(JOBS, 1, lease=10)
    await settle(broker, "ack", m2, emitted=(message("done", "stale"),))  # fenced: emits nothing
    assert ids(await broker.fetch(DONE, 10, lease=HOLD)) == ["d1"]
    assert (await broker.stats(JOBS)).in_flight == 1
    assert m2_again.id == "m2"


# -- two processes -------------------------------------------------------------------------------

WORKER = """
import json, sys
import anyio
from eventfn.brokers.base import Settlement, SubscriptionRef
from eventfn.brokers.sqlite import SQLiteBroker

QUEUE = SubscriptionRef(destination="work", kind="queue")


async def main(url: str, out: str) -> None:
    got = []
    broker = SQLiteBroker(url)
    await broker.connect()
    while True:
        batch = await broker.fetch(QUEUE, 16, lease=600, wait=0.05)
        if not batch:
            if (await broker.stats(QUEUE)).pending == 0:
                break
            continue
        got += [[d.id, d.attempt] for d in batch]
        await anyio.sleep(0.001)  # the work
        await broker.settle([Settlement(delivery=d, outcome="ack") for d in batch])
    await broker.close()
    with open(out, "w") as sink:
        json.dump(got, sink)


print("ready", flush=True)
sys.stdin.readline()
anyio.run(main, sys.argv[1], sys.argv[2])
"""


@pytest.mark.slow
def test_two_processes_share_a_queue_without_double_leasing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    sent = [f"m{n:05}" for n in range(5000)]
    anyio.run(_publish_work, url, sent)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    outputs = [tmp_path / f"worker-{n}.json" for n in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), url, str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for out in outputs
    ]
    try:
        for worker in workers:  # both have imported everything before either starts
            assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        for worker in workers:
            assert worker.wait(timeout=90) == 0
    finally:
        for worker in workers:
            worker.kill()
            worker.communicate()
    handled = [json.loads(out.read_text()) for out in outputs]
    counts = collections.Counter(message_id for got in handled for message_id, _ in got)
    assert sorted(counts) == sent, "every message is handled"
    assert {n for n in counts.values()} == {1}, "and leased to one process only, once"
    assert {attempt for got in handled for _, attempt in got} == {1}
    assert all(handled), f"both processes took work: {[len(got) for got in handled]}"


async def _publish_work(url: str, ids: list[str]) -> None:
    broker = SQLiteBroker(url)
    await broker.connect()
    await broker.declare([SubscriptionRef(destination="work", kind="queue")])
    await broker.publish([message("work", message_id) for message_id in ids])
    await broker.close()
