"""The URL's ``fetch_linger``: parsing, and what a fetch does with it on a real RabbitMQ."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
from eventfn_amqp._names import parse_url

from eventfn.brokers import Delivery, OutgoingMessage, Settlement, SubscriptionRef, from_url
from eventfn.exceptions import ConfigurationError
from tests.conftest import drop, networked_url, require_networked

REF = SubscriptionRef(destination="jobs", kind="queue")


def test_fetch_linger_is_seconds_from_0_to_1() -> None:
    assert parse_url("amqp://h/", "amqp://h/").fetch_linger == 0.0
    assert parse_url("amqp://h/?fetch_linger=0.002", "d").fetch_linger == 0.002
    options = parse_url("amqp://h/?fetch_linger=1&heartbeat=5", "d")
    assert options.fetch_linger == 1.0 and "fetch_linger" not in options.server_url
    for bad in ("-0.1", "1.5", "soon", "nan", ""):
        with pytest.raises(ConfigurationError, match="fetch_linger"):
            parse_url(f"amqp://h/?fetch_linger={bad}", "d")


@pytest.fixture
async def amqp_url() -> AsyncIterator[str]:
    """A URL with a namespace private to the test, dropped afterwards."""
    url = networked_url("amqp")
    require_networked("amqp", url)
    yield url
    await drop(url)


def _messages(count: int) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(destination="jobs", id=uuid.uuid4().hex, type="t", body=b"{}")
        for _ in range(count)
    ]


async def test_a_lingering_fetch_waits_for_a_full_batch_but_no_longer(amqp_url: str) -> None:
    async with from_url(f"{amqp_url}&fetch_linger=0.5") as broker:
        await broker.declare([REF])
        await broker.publish(_messages(1))

        async def later() -> None:
            await anyio.sleep(0.1)
            await broker.publish(_messages(4))

        async with anyio.create_task_group() as group:
            group.start_soon(later)
            got = await broker.fetch(REF, 5, lease=30, wait=5)
        assert len(got) == 5  # the 4 published 0.1 s after the first came with it
        await broker.settle([Settlement(delivery=d, outcome="ack") for d in got])

        await broker.publish(_messages(1))
        started = time.monotonic()
        got = await broker.fetch(REF, 5, lease=30, wait=5)
        assert len(got) == 1 and time.monotonic() - started < 2  # the linger, not the wait
        await broker.settle([Settlement(delivery=d, outcome="ack") for d in got])


async def test_without_linger_a_fetch_returns_what_is_there(amqp_url: str) -> None:
    async with from_url(amqp_url) as broker:
        await broker.declare([REF])
        await broker.publish(_messages(1))

        async def later() -> None:
            await anyio.sleep(0.3)
            await broker.publish(_messages(4))

        async with anyio.create_task_group() as group:
            group.start_soon(later)
            got = await broker.fetch(REF, 5, lease=30, wait=5)
            assert len(got) == 1
        rest: list[Delivery] = []
        with anyio.fail_after(5):
            while len(rest) < 4:
                rest += await broker.fetch(REF, 5, lease=30, wait=1)
        await broker.settle([Settlement(delivery=d, outcome="ack") for d in got + rest])
