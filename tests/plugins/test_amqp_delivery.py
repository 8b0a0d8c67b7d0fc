"""Deliveries handed over inline (``_delivery``), against a real RabbitMQ (skipped without one)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import aio_pika
import anyio
import pytest
from aiormq.abc import DeliveredMessage
from eventfn_amqp._delivery import deliver_inline

from tests.conftest import networked_url, require_networked


@pytest.fixture
async def connection() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    url = networked_url("amqp")
    require_networked("amqp", url)
    async with await aio_pika.connect(url.partition("?")[0]) as connection:
        yield connection


async def test_every_delivery_lands_in_order_whatever_its_size(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    # empty, small, and bodies spanning several frames (frame_max is 128 KiB by default)
    bodies = [b"", b"x", b"a" * 131_072, os.urandom(400_000), b"{}"] * 3
    queue = f"eventfn-test-inline-{uuid.uuid4().hex[:8]}"
    publisher = await connection.channel(publisher_confirms=True)
    declared = await publisher.declare_queue(queue, exclusive=True)
    for index, body in enumerate(bodies):
        message = aio_pika.Message(body, message_id=str(index), headers={"eventfn-key": "k"})
        await publisher.default_exchange.publish(message, queue)

    consumer = await connection.channel()
    raw = await consumer.get_underlay_channel()
    landed: list[DeliveredMessage] = []
    done = anyio.Event()

    def land(message: DeliveredMessage) -> None:
        landed.append(message)
        if len(landed) == len(bodies):
            done.set()

    async def as_a_task(message: DeliveredMessage) -> None:
        raise AssertionError("the callback ran as aiormq's task")

    assert deliver_inline(raw, land)
    await raw.basic_qos(prefetch_count=len(bodies))
    await raw.basic_consume(queue, as_a_task)
    with anyio.fail_after(10):
        await done.wait()
    assert [message.body for message in landed] == bodies
    assert [message.header.properties.message_id for message in landed] == [
        str(index) for index in range(len(bodies))
    ]
    assert all(message.channel is raw for message in landed)
    tags = [getattr(message.delivery, "delivery_tag", 0) for message in landed]
    assert tags == list(range(1, len(bodies) + 1))
    await raw.basic_ack(tags[-1], multiple=True)
    await declared.delete(if_unused=False, if_empty=False)


async def test_a_failing_function_leaves_the_channel_open(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    queue = f"eventfn-test-inline-{uuid.uuid4().hex[:8]}"
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, exclusive=True)
    raw = await channel.get_underlay_channel()
    seen: list[bytes] = []
    both = anyio.Event()

    def land(message: DeliveredMessage) -> None:
        seen.append(message.body)
        if len(seen) == 2:
            both.set()
        if len(seen) == 1:
            raise RuntimeError("boom")

    async def unused(message: DeliveredMessage) -> None:
        raise AssertionError("the callback ran as aiormq's task")

    assert deliver_inline(raw, land)
    await raw.basic_consume(queue, unused, no_ack=True)
    for body in (b"1", b"2"):
        await channel.default_exchange.publish(aio_pika.Message(body), queue)
    with anyio.fail_after(10):
        await both.wait()
    assert seen == [b"1", b"2"] and not raw.is_closed
    await declared.delete(if_unused=False, if_empty=False)
