"""Shared state kept in RabbitMQ itself: the catalog, the dead-letter and de-duplication stores.

AMQP 0.9.1 can neither list queues nor read a message without taking it, so shared state lives
in plain classic queues, one message per entry, and is read by taking every message and giving
them all back (closing the channel requeues them, in place, with no delivery count: classic
queues keep none). Two readers at once would each see part of a queue, hence the lock: an
exclusive queue (``{ns}/lock``), which only one connection can hold and which RabbitMQ deletes
when that connection dies, so a crashed holder never leaves it locked.

Writers that only append (a dead letter, a new delay bucket) do not take the lock: an append is
one confirmed publish, and readers fold what they find (newest version of a record wins).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import aio_pika
import anyio
import msgspec
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity

from eventfn.brokers.base import DeadLetterRecord, Kind, SubscriptionRef
from eventfn.exceptions import BrokerError

_LOCK_TIMEOUT = 30.0
_BROWSE_TIMEOUT = 30.0


class SubEntry(msgspec.Struct, frozen=True, kw_only=True, tag="sub"):
    """A subscription declared on a destination of a kind; the latest entry of a name wins."""

    destination: str
    kind: Kind
    group: str
    types: tuple[str, ...] | None = None
    partitions: int = 1

    def ref(self) -> SubscriptionRef:
        return SubscriptionRef(
            destination=self.destination,
            kind=self.kind,
            group=self.group,
            types=self.types,
            partitions=self.partitions,
        )


class BucketEntry(msgspec.Struct, frozen=True, kw_only=True, tag="bucket"):
    """A delay bucket queue of a subscription (retries) or a destination (delayed publishes)."""

    owner: str
    queue: str


Entry = SubEntry | BucketEntry
encode_entry = msgspec.json.Encoder().encode
_decode_entry = msgspec.json.Decoder(Entry).decode


@dataclass
class Catalog:
    """What has been declared in a namespace, folded from the catalog queue's entries."""

    subscriptions: dict[str, SubscriptionRef] = field(default_factory=dict)
    kinds: dict[str, Kind] = field(default_factory=dict)
    buckets: dict[str, set[str]] = field(default_factory=dict)
    entries: int = 0

    @classmethod
    def fold(cls, bodies: Iterable[bytes]) -> Catalog:
        catalog = cls()
        for body in bodies:
            catalog.entries += 1
            try:
                entry = _decode_entry(body)
            except msgspec.DecodeError:
                continue  # written by a newer version: not ours to interpret
            if isinstance(entry, SubEntry):
                ref = entry.ref()
                catalog.subscriptions[ref.name] = ref
                catalog.kinds.setdefault(ref.destination, ref.kind)
            else:
                catalog.buckets.setdefault(entry.owner, set()).add(entry.queue)
        return catalog

    def compacted(self) -> list[bytes]:
        """One entry per subscription and bucket: the catalog rewritten without repeats."""
        entries: list[Entry] = [
            SubEntry(
                destination=ref.destination,
                kind=ref.kind,
                group=ref.group,
                types=ref.types,
                partitions=ref.partitions,
            )
            for ref in self.subscriptions.values()
        ]
        entries += [
            BucketEntry(owner=owner, queue=queue)
            for owner, queues in self.buckets.items()
            for queue in sorted(queues)
        ]
        return [encode_entry(entry) for entry in entries]


class DedupeRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A message stored with ``dedupe``: its destination and id, when it was stored (``at``),
    and when its window ends (``until``: the record may be deleted from then on)."""

    destination: str
    id: str
    at: float
    until: float


encode_dedupe = msgspec.json.Encoder().encode
_decode_dedupe = msgspec.json.Decoder(DedupeRecord).decode


@dataclass
class DedupeStore:
    """The de-duplication store as read: the newest record of each (destination, id), and
    the messages of the records that are no longer needed (their window ended, or a newer
    record of the same id replaced them)."""

    newest: dict[tuple[str, str], DedupeRecord] = field(default_factory=dict)
    stale: list[DeliveredMessage] = field(default_factory=list)
    _found: dict[tuple[str, str], DeliveredMessage] = field(default_factory=dict)

    @classmethod
    def fold(cls, messages: Iterable[DeliveredMessage], now: float) -> DedupeStore:
        store = cls()
        for message in messages:
            try:
                record = _decode_dedupe(message.body)
            except msgspec.DecodeError:
                continue  # written by a newer version: not ours to interpret
            if record.until <= now:
                store.stale.append(message)
                continue
            key = (record.destination, record.id)
            newest = store.newest.get(key)
            if newest is not None and newest.at >= record.at:
                store.stale.append(message)
                continue
            if newest is not None:
                store.stale.append(store._found[key])
            store.newest[key] = record
            store._found[key] = message
        return store

    def replaced(self, keys: Iterable[tuple[str, str]]) -> list[DeliveredMessage]:
        """The messages of the records of these keys (once newer ones are stored)."""
        return [self._found[key] for key in keys if key in self._found]


class StoredRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One version of a dead-letter record; readers keep the newest of each message."""

    record: DeadLetterRecord
    version: int


encode_record = msgspec.json.Encoder().encode
decode_record = msgspec.json.Decoder(StoredRecord).decode

Where = Literal["dead", "replayed"]


class Browsed:
    """Every message a queue held when it was read, taken (unacked) on a channel of its own.

    ``ack`` deletes one; :meth:`close` gives back all the others, in their places.
    """

    def __init__(self, channel: aio_pika.abc.AbstractChannel, raw: AbstractChannel) -> None:
        self.channel = channel
        self.raw = raw
        self.messages: list[DeliveredMessage] = []

    async def ack(self, message: DeliveredMessage) -> None:
        tag = getattr(message.delivery, "delivery_tag", None)
        if tag is not None:
            await self.raw.basic_ack(tag)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await _close_quietly(self.channel)


async def browse(connection: aio_pika.abc.AbstractConnection, queue: str) -> Browsed:
    """Take every message ``queue`` holds now (none if it does not exist); close when done."""
    channel = await connection.channel(publisher_confirms=False)
    raw = await channel.get_underlay_channel()
    browsed = Browsed(channel, raw)
    try:
        declared = await raw.queue_declare(queue, passive=True)
    except ChannelNotFoundEntity:
        return browsed  # nothing was ever written there; the server closed the channel
    count = declared.message_count or 0
    if count:
        await _take_all(browsed, queue, count)
    return browsed


async def _take_all(browsed: Browsed, queue: str, count: int) -> None:
    arrived = asyncio.Event()

    async def take(message: DeliveredMessage) -> None:
        browsed.messages.append(message)
        if len(browsed.messages) >= count:
            arrived.set()

    consumer = await browsed.raw.basic_consume(queue, take)
    try:
        with anyio.fail_after(_BROWSE_TIMEOUT):
            await arrived.wait()
    except TimeoutError:
        raise BrokerError(
            f"reading {queue!r} timed out: {len(browsed.messages)} of {count} messages came"
        ) from None
    finally:
        with anyio.CancelScope(shield=True):
            if consumer.consumer_tag and not browsed.raw.is_closed:
                await browsed.raw.basic_cancel(consumer.consumer_tag)


@asynccontextmanager
async def locked(connection: aio_pika.abc.AbstractConnection, name: str) -> AsyncIterator[None]:
    """Hold the namespace's lock (an exclusive queue) for the block."""
    channel = await _acquire(connection, name)
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):  # the lock also ends with this connection
                raw = await channel.get_underlay_channel()
                await raw.queue_delete(name)
            await _close_quietly(channel)


async def _acquire(
    connection: aio_pika.abc.AbstractConnection, name: str
) -> aio_pika.abc.AbstractChannel:
    pause = 0.002
    with anyio.move_on_after(_LOCK_TIMEOUT):
        while True:
            channel = await connection.channel(publisher_confirms=False)
            raw = await channel.get_underlay_channel()
            try:
                await raw.queue_declare(name, exclusive=True, auto_delete=True)
                return channel
            except ChannelLockedResource:
                await _close_quietly(channel)
            await anyio.sleep(pause)
            pause = min(pause * 2, 0.05)
    raise BrokerError(f"the lock {name!r} was held by another connection for {_LOCK_TIMEOUT} s")


async def _close_quietly(channel: aio_pika.abc.AbstractChannel) -> None:
    with contextlib.suppress(Exception):  # the server may have closed it
        await channel.close()
