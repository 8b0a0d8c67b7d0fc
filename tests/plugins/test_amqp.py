"""The RabbitMQ broker beyond the conformance kit: namespaces, redaction, runners, faults.

Runs against the RabbitMQ of ``shared/SERVICES.md`` (skips outside CI when it is absent).
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import aio_pika
import anyio
import anyio.lowlevel
import msgspec
import pytest
from aiormq.exceptions import ChannelNotFoundEntity
from eventfn_amqp._names import bucket_of

import eventfn
from eventfn.brokers import Broker, OutgoingMessage, Settlement, SubscriptionRef, from_url
from eventfn.exceptions import BrokerUnavailable, UnknownDestination
from tests.conftest import networked_url, require_networked


class Job(msgspec.Struct, frozen=True):
    n: int


@pytest.fixture
async def amqp_url() -> AsyncIterator[str]:
    """A URL with a namespace private to the test, dropped afterwards whatever happened."""
    url = networked_url("amqp")
    require_networked("amqp", url)
    yield url
    async with from_url(url) as broker:
        await broker.drop()


other_amqp_url = amqp_url


async def _exists(url: str, queue: str) -> bool:
    """Whether RabbitMQ has this queue (a passive declare, on a channel of its own)."""
    async with await aio_pika.connect(url.split("?")[0]) as connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(queue, passive=True)
        except ChannelNotFoundEntity:
            return False
        await channel.close()
        return True


def _message(message_id: str, delay: float = 0.0) -> OutgoingMessage:
    return OutgoingMessage(destination="jobs", id=message_id, type="t", body=b"{}", delay=delay)


def _app() -> eventfn.App:
    return eventfn.App("amqp-test", retry=eventfn.Retry(attempts=3, backoff=0.01, cap=0.05))


async def test_namespaces_are_isolated_and_drop_deletes_everything(
    amqp_url: str, other_amqp_url: str
) -> None:
    ref = SubscriptionRef(destination="jobs", kind="queue")
    stream = SubscriptionRef(destination="clicks", kind="stream", group="g", partitions=4)
    async with from_url(amqp_url) as mine, from_url(other_amqp_url) as theirs:
        await mine.declare([ref, stream])
        with pytest.raises(UnknownDestination):  # same names, other namespace: not declared
            await theirs.publish([_message("a")])
        await theirs.declare([ref])
        await mine.publish([_message("m")])
        # a delayed publish and a retry make bucket queues, which drop must find too
        await mine.publish([_message("d", delay=60)])
        assert await theirs.fetch(ref, 10, lease=30, wait=0.2) == []
        [got] = await mine.fetch(ref, 10, lease=30, wait=5)
        await mine.settle([Settlement(delivery=got, outcome="retry", delay=60)])
        names = mine.names  # type: ignore[attr-defined]
        created = [
            names.queue("jobs"),
            names.partition("clicks/g", 3),
            names.dead("jobs"),
            names.retry("jobs", bucket_of(60)),
            names.delay("jobs", bucket_of(60)),
            names.catalog,
        ]
        assert [await _exists(amqp_url, queue) for queue in created] == [True] * len(created)
        await mine.drop()
        assert [await _exists(amqp_url, queue) for queue in created] == [False] * len(created)
        # the other namespace is untouched
        assert await _exists(other_amqp_url, theirs.names.queue("jobs"))  # type: ignore[attr-defined]
        assert (await theirs.stats(ref)).pending == 0


async def test_bad_credentials_and_closed_port_never_show_the_password(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"pw{uuid.uuid4().hex[:12]}"
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    urls = [
        f"amqp://guest:{secret}@127.0.0.1:5672/?namespace=redaction",
        f"amqp://guest:{secret}@127.0.0.1:{closed_port}/?namespace=redaction",
    ]
    caplog.set_level(logging.DEBUG)
    for url in urls:
        broker = from_url(url)
        with pytest.raises(BrokerUnavailable) as failed:
            await broker.connect()
        message = str(failed.value)
        assert secret not in message and secret not in repr(failed.value)
        assert "127.0.0.1" in message, f"the error should say where: {message}"
        # the vendor exception is not chained into tracebacks: its text is not ours to vouch for
        assert failed.value.__cause__ is None and failed.value.__suppress_context__
        assert secret not in broker.describe()
        await broker.close()
    assert secret not in caplog.text


async def test_two_runners_in_burst_handle_every_message_once(amqp_url: str) -> None:
    app = _app()
    handled: Counter[int] = Counter()

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        handled[job.n] += 1
        await anyio.lowlevel.checkpoint()

    async with from_url(amqp_url) as one, from_url(amqp_url) as two:
        await app.connect(one)
        await app.publish_many(app.message("jobs", Job(n)) for n in range(500))
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for broker in (one, two):
                    group.start_soon(eventfn.Runner(app, broker, burst=True, poll=0.05).run)
        await app.close()
    assert handled == Counter(range(500))


async def test_a_killed_connection_loses_nothing(amqp_url: str) -> None:
    app = _app()
    handled: Counter[int] = Counter()
    quarter = anyio.Event()

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        handled[job.n] += 1
        if len(handled) >= 100:
            quarter.set()
        await anyio.sleep(0.001)

    async with from_url(amqp_url) as broker:
        await app.connect(broker)
        await app.publish_many(app.message("jobs", Job(n)) for n in range(400))
        runner = eventfn.Runner(app, broker, burst=True, poll=0.05, concurrency=8)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                group.start_soon(runner.run)
                await quarter.wait()
                await _kill_connection(broker)
        stats = await broker.stats(SubscriptionRef(destination="jobs", kind="queue"))
        await app.close()
    # at least once: what was in flight when the connection died may run twice, none is lost
    assert set(handled) == set(range(400))
    assert stats.pending == 0 and stats.dead == 0


async def _kill_connection(broker: Broker) -> None:
    """Close the broker's AMQP connection under it, as a network fault would."""
    connection = broker._connection  # type: ignore[attr-defined]
    assert connection is not None
    await connection.close()


# -- de-duplication (OutgoingMessage.dedupe) ------------------------------------------------------


async def _queued(url: str, queue: str) -> int:
    """How many messages a queue holds (a passive declare, on a channel of its own)."""
    async with await aio_pika.connect(url.split("?")[0]) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count or 0
        await channel.close()
        return count


async def test_dedupe_store_keeps_only_records_whose_window_runs(amqp_url: str) -> None:
    jobs = SubscriptionRef(destination="jobs", kind="queue")

    def tick(message_id: str, window: float) -> OutgoingMessage:
        return OutgoingMessage(
            destination="jobs", id=message_id, type="t", body=b"{}", dedupe=window
        )

    async with from_url(amqp_url) as broker:
        await broker.declare([jobs])
        store = broker.names.dedupe  # type: ignore[attr-defined]
        await broker.publish([tick(f"short{n}", 0.3) for n in range(5)] + [tick("long", 3600)])
        await broker.publish([tick("long", 3600)])  # dropped, its record kept as it is
        assert await _queued(amqp_url, store) == 6
        await anyio.sleep(0.5)
        await broker.publish([tick("short0", 0.3)])  # stored again; ended records deleted
        assert await _queued(amqp_url, store) == 2
        got = await broker.fetch(jobs, 20, lease=60, wait=0.5)
        while len(got) < 7:
            more = await broker.fetch(jobs, 20, lease=60, wait=0.5)
            assert more, f"only {len(got)} of 7 messages came"
            got += more
        assert Counter(d.id for d in got) == {
            **{f"short{n}": 1 for n in range(5)},
            "long": 1,
            "short0": 2,
        }
