"""``amqp://user:password@host:5672/vhost?namespace=NAME``: eventfn on RabbitMQ (aio-pika).

The mapping, in short (the README has it at length, with the known gaps and why):

- a destination is a topic exchange; a queue or topic subscription is a quorum queue bound to
  it (a group's ``types`` are its binding keys), a stream subscription is one quorum queue per
  partition with ``x-single-active-consumer``;
- every publish is confirmed; a subscription is consumed while its runner fetches, with a
  prefetch (QoS) of what the fetches asked for, so RabbitMQ never pushes more than the runner
  has room for; a settle batch's acks go out as one ``multiple`` ack where that is exact;
- leases are kept by this object (RabbitMQ has none) and fenced by receipt tokens; a lost
  connection returns everything to the queues, counted in ``x-delivery-count``;
- delayed retries and delayed publishes wait in delay-bucket queues (per-message TTL) that
  dead-letter back, so no server plug-in is needed;
- dead letters, the catalog of what was declared, and the lock that guards both are queues too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import aio_pika
import anyio
import anyio.lowlevel
import msgspec
from aiormq.abc import AbstractChannel
from aiormq.exceptions import AMQPError, ChannelNotFoundEntity, ChannelPreconditionFailed

from eventfn.brokers.base import (
    Broker,
    Clock,
    DeadLetterRecord,
    Delivery,
    OutgoingMessage,
    Settlement,
    SubscriptionRef,
    SubscriptionStats,
)
from eventfn.exceptions import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    UnknownDestination,
)
from eventfn_amqp import _deadletters as dl
from eventfn_amqp._leases import Leases
from eventfn_amqp._names import (
    TOKEN_DIGITS,
    Names,
    binding_keys,
    bucket_of,
    check_subscription,
    hash_of,
    parse_url,
    routing_key,
    token,
)
from eventfn_amqp._publish import Outgoing, Publisher
from eventfn_amqp._queues import QueueConsumer, QueueLease
from eventfn_amqp._store import (
    BucketEntry,
    Catalog,
    DedupeRecord,
    DedupeStore,
    SubEntry,
    browse,
    encode_dedupe,
    encode_entry,
    locked,
)
from eventfn_amqp._streams import StreamConsumer, StreamRecord
from eventfn_amqp._wire import RECORD, REPLAYED, Incoming, dead, headers_of, properties

Held = QueueLease | StreamRecord
Consumer = QueueConsumer | StreamConsumer

# How stale this instance's list of delay buckets may be when it counts delayed messages: a
# bucket another process created is seen within this many seconds.
_CATALOG_TTL = 1.0
_COUNT_TRIES = 4


class AmqpBroker(Broker):
    """RabbitMQ broker: ``amqp://guest:guest@127.0.0.1:5672/?namespace=shop``.

    URL options: ``namespace`` (prefix of every name, default ``eventfn``), ``delivery_limit``
    (the quorum queues' ``x-delivery-limit``, default 20), ``stream_prefetch`` (records a stream
    partition may push ahead of its blocked keys, default 256), ``fetch_linger`` (seconds a
    queue or topic fetch that has a delivery waits for a full batch, default 0: off); others go
    to aio-pika.
    """

    scheme = "amqp"
    known_gaps = {
        "stream_leased_head_blocks_only_its_key": (
            "a stream partition is consumed by one runner at a time (x-single-active-consumer): "
            "a second runner cannot take key b while the first holds key a of the same "
            "partition; runners share a stream by partition, and take over on failover"
        ),
        "stream_head_comes_back_first": (
            "a stream record released by a runner that keeps running stays with it: another "
            "runner takes the partition only once the first one stops consuming it, and "
            "RabbitMQ then counts the return in x-delivery-count"
        ),
    }

    def __init__(self, url: str, *, clock: Clock = time.time) -> None:
        super().__init__(url, clock=clock)
        self.options = parse_url(url, self.describe())
        self.names = Names(self.options.namespace)
        self._owner = uuid.uuid4().hex
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._connect_lock = anyio.Lock()
        self._closed = False
        self._leases = Leases()
        self._timers: asyncio.Task[None] | None = None
        self._publisher = Publisher(self._connected, self.describe())
        self._consumers: dict[str, Consumer] = {}
        self._destinations: set[str] = set()
        self._buckets: dict[str, set[str]] = {}
        self._bucket_lock = anyio.Lock()
        self._catalog_at = -float("inf")
        self._admin: AbstractChannel | None = None
        self._admin_channel: aio_pika.abc.AbstractChannel | None = None
        self._ids = dl.RecordIds()

    def describe(self) -> str:
        described = super().describe()
        password = self.options.password if hasattr(self, "options") else None
        if password and password in described:
            # guest:guest and the like: the user name would give the password away
            scheme, _, rest = described.partition("://")
            described = f"{scheme}://***:***@{rest.rpartition('@')[2]}"
        return described

    # -- connection ---------------------------------------------------------------------------

    async def connect(self) -> None:
        self._closed = False
        await self._connected()
        if self._timers is None:
            self._timers = asyncio.get_running_loop().create_task(self._leases.timers.run())

    async def _connected(self) -> aio_pika.abc.AbstractConnection:
        """The connection, opened again if it was lost (leases on the old one are void)."""
        connection = self._connection
        if connection is not None and not connection.is_closed:
            return connection
        if self._closed:
            raise BrokerError(f"RabbitMQ broker {self.describe()} is closed")
        async with self._connect_lock:
            if self._connection is None or self._connection.is_closed:
                self._connection = await self._open()
            return self._connection

    async def _open(self) -> aio_pika.abc.AbstractConnection:
        try:
            with anyio.fail_after(30):
                return await aio_pika.connect(self.options.server_url)
        except (AMQPError, OSError, TimeoutError) as exc:
            # from None: a vendor exception's text is not ours to vouch for; ours is redacted
            raise BrokerUnavailable(
                f"cannot connect to RabbitMQ at {self.describe()}: {self._redact(exc)}"
            ) from None

    def _redact(self, error: BaseException) -> str:
        text = f"{type(error).__name__}: {error}"
        password = self.options.password
        return text.replace(password, "***") if password else text

    async def close(self) -> None:
        self._closed = True
        timers, self._timers = self._timers, None
        if timers is not None:
            timers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timers
        consumers, self._consumers = list(self._consumers.values()), {}
        with anyio.CancelScope(shield=True):
            for consumer in consumers:
                await consumer.close()
            await self._publisher.close()
            await _close_channel(self._admin_channel)
            self._admin = self._admin_channel = None
            connection, self._connection = self._connection, None
            if connection is not None and not connection.is_closed:
                with contextlib.suppress(Exception):
                    await connection.close()
        self._leases = Leases()

    async def _admin_raw(self) -> AbstractChannel:
        """A channel for declarations and counts; a channel error closes it, so it reopens."""
        if self._admin is None or dead(self._admin):
            await _close_channel(self._admin_channel)
            connection = await self._connected()
            self._admin_channel = await connection.channel(publisher_confirms=False)
            self._admin = await self._admin_channel.get_underlay_channel()
        return self._admin

    @contextlib.asynccontextmanager
    async def _lock(self) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
        connection = await self._connected()
        async with locked(connection, self.names.lock):
            yield connection

    async def _read_catalog(self, connection: aio_pika.abc.AbstractConnection) -> Catalog:
        """The catalog as it is now (the caller holds the lock); refreshes bucket knowledge."""
        browsed = await browse(connection, self.names.catalog)
        try:
            catalog = Catalog.fold(message.body for message in browsed.messages)
        finally:
            await browsed.close()
        for owner, queues in catalog.buckets.items():
            self._buckets.setdefault(owner, set()).update(queues)
        self._catalog_at = time.monotonic()
        return catalog

    # -- declare ------------------------------------------------------------------------------

    async def declare(self, subscriptions: Sequence[SubscriptionRef]) -> None:
        for ref in subscriptions:
            partitions = ref.partitions if ref.kind == "stream" else 1
            check_subscription(ref.types, partitions, ref.name)
        async with self._lock() as connection:
            catalog = await self._read_catalog(connection)
            raw = await self._admin_raw()
            await raw.queue_declare(self.names.catalog, durable=True)
            for ref in subscriptions:
                await self._declare_one(catalog, ref)
            if catalog.entries > 2 * (len(catalog.subscriptions) + len(catalog.buckets)) + 16:
                await self._compact_catalog(connection)
        self._destinations.update(ref.destination for ref in subscriptions)

    async def _declare_one(self, catalog: Catalog, ref: SubscriptionRef) -> None:
        known = catalog.kinds.get(ref.destination)
        if known is not None and known != ref.kind:
            raise ConfigurationError(
                f"destination {ref.destination!r} is a {known} on {self.describe()}, not a "
                f"{ref.kind}; use another name or the same kind everywhere"
            )
        previous = catalog.subscriptions.get(ref.name)
        if previous is not None and ref.kind == "stream" and previous.partitions != ref.partitions:
            raise ConfigurationError(
                f"stream group {ref.name!r} has {previous.partitions} partitions on "
                f"{self.describe()}, not {ref.partitions}; use a new group name to change it"
            )
        if previous != ref:
            # recorded before anything is created, so that drop() always knows every name
            entry = SubEntry(
                destination=ref.destination,
                kind=ref.kind,
                group=ref.group,
                types=ref.types,
                partitions=ref.partitions,
            )
            await self._append_catalog([encode_entry(entry)])
            catalog.subscriptions[ref.name] = ref
            catalog.kinds.setdefault(ref.destination, ref.kind)
        await self._topology(ref, previous)

    async def _topology(self, ref: SubscriptionRef, previous: SubscriptionRef | None) -> None:
        raw = await self._admin_raw()
        exchange = self.names.exchange(ref.destination)
        dead = self.names.dead(ref.name)
        try:
            await raw.exchange_declare(exchange, exchange_type="topic", durable=True)
            await raw.queue_declare(dead, durable=True)
            await raw.queue_declare(self.names.replayed(ref.name), durable=True)
            for partition, queue in enumerate(self._queues(ref)):
                await raw.queue_declare(queue, durable=True, arguments=self._queue_args(ref, dead))
                keys = binding_keys(ref.types, partition, len(self._queues(ref)))
                for key in keys:
                    await raw.queue_bind(queue, exchange, routing_key=key)
                if previous is not None and previous.types != ref.types:
                    # a redeployed group with other types: the latest filter wins
                    for key in set(binding_keys(previous.types, partition, ref.partitions)):
                        if key not in keys:
                            await raw.queue_unbind(queue, exchange, routing_key=key)
        except ChannelPreconditionFailed as exc:
            raise ConfigurationError(
                f"subscription {ref.name!r} exists on {self.describe()} with other settings "
                f"({exc}); drop it or keep the URL's delivery_limit as it was"
            ) from None

    def _queue_args(self, ref: SubscriptionRef, dead: str) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.options.delivery_limit,
            # what RabbitMQ dead-letters itself (the delivery limit) lands in the store
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead,
        }
        if ref.kind == "stream":
            arguments["x-single-active-consumer"] = True
        return arguments

    def _queues(self, ref: SubscriptionRef) -> list[str]:
        if ref.kind != "stream":
            return [self.names.queue(ref.name)]
        return [self.names.partition(ref.name, p) for p in range(ref.partitions)]

    async def _append_catalog(self, entries: Iterable[bytes]) -> None:
        await self._publisher.send(
            [Outgoing("", self.names.catalog, body, properties("", "", {})) for body in entries]
        )

    async def _compact_catalog(self, connection: aio_pika.abc.AbstractConnection) -> None:
        browsed = await browse(connection, self.names.catalog)
        try:
            catalog = Catalog.fold(message.body for message in browsed.messages)
            await self._append_catalog(catalog.compacted())
            for message in browsed.messages:
                await browsed.ack(message)
        finally:
            await browsed.close()

    # -- publish ------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            await anyio.lowlevel.checkpoint()
            return
        await self._require({message.destination for message in messages})
        now = self.clock()
        if any(message.dedupe > 0 for message in messages):
            await self._publish_deduped(messages, now)
            return
        outgoing = [await self._route(message, now) for message in messages]
        await self._publisher.send(outgoing)

    async def _publish_deduped(self, messages: Sequence[OutgoingMessage], now: float) -> None:
        """Publish a batch with some message with ``dedupe``, under the namespace's lock: the
        store of ids is read, the messages that are the first of their window are published
        (with the others), and only then their records are added (see the README)."""
        async with self._lock() as connection:
            browsed = await browse(connection, self.names.dedupe)
            try:
                store = DedupeStore.fold(browsed.messages, now)
                kept: list[OutgoingMessage] = []
                records: dict[tuple[str, str], DedupeRecord] = {}
                for message in messages:
                    if message.dedupe > 0:
                        key = (message.destination, message.id)
                        newest = store.newest.get(key)
                        if key in records or (
                            newest is not None and newest.at > now - message.dedupe
                        ):
                            continue  # a copy within the window: dropped
                        records[key] = DedupeRecord(
                            destination=key[0], id=key[1], at=now, until=now + message.dedupe
                        )
                    kept.append(message)
                await self._publisher.send([await self._route(m, now) for m in kept])
                raw = await self._admin_raw()
                await raw.queue_declare(self.names.dedupe, durable=True)
                await self._publisher.send(
                    [
                        Outgoing(
                            "", self.names.dedupe, encode_dedupe(record), properties("", "", {})
                        )
                        for record in records.values()
                    ]
                )
                for record in store.stale + store.replaced(records):
                    await browsed.ack(record)
            finally:
                await browsed.close()

    async def _require(self, destinations: set[str]) -> None:
        """Raise ``UnknownDestination`` unless every destination's exchange exists."""
        for destination in destinations - self._destinations:
            raw = await self._admin_raw()
            try:
                await raw.exchange_declare(self.names.exchange(destination), passive=True)
            except ChannelNotFoundEntity:
                raise UnknownDestination(
                    f"nothing has declared destination {destination!r} on {self.describe()}; "
                    "start a runner of an app that subscribes to it (or call app.declare()) first"
                ) from None
            self._destinations.add(destination)

    async def _route(self, message: OutgoingMessage, now: float) -> Outgoing:
        published_at = message.published_at or now
        props_headers = headers_of(message.key, published_at)
        spread = hash_of(message.key if message.key is not None else message.id)
        key = routing_key(spread, message.type)
        due_in = published_at + message.delay - now if message.delay > 0 else 0.0
        exchange = self.names.exchange(message.destination)
        if due_in <= 0:
            props = properties(message.id, message.type, props_headers)
            return Outgoing(exchange, key, message.body, props)
        # waits in a delay bucket, which dead-letters it to the exchange with this routing key
        bucket = self.names.delay(message.destination, bucket_of(due_in))
        await self._bucket(message.destination, bucket, {"x-dead-letter-exchange": exchange})
        props_headers["eventfn-bucket"] = bucket
        props = properties(message.id, message.type, props_headers, expiration=due_in)
        return Outgoing(self._delays, key, message.body, props)

    @property
    def _delays(self) -> str:
        return f"{self.names.namespace}/delays"

    async def _bucket(self, owner: str, queue: str, arguments: dict[str, Any]) -> None:
        """Create a delay bucket queue once (and list it in the catalog first)."""
        if queue in self._buckets.get(owner, ()):
            return
        async with self._bucket_lock:
            if queue in self._buckets.get(owner, ()):
                return
            raw = await self._admin_raw()
            await raw.queue_declare(self.names.catalog, durable=True)
            await self._append_catalog([encode_entry(BucketEntry(owner=owner, queue=queue))])
            await raw.queue_declare(queue, durable=True, arguments=arguments)
            if "x-dead-letter-routing-key" not in arguments:
                # reached through the headers exchange, so the message keeps its routing key
                await raw.exchange_declare(self._delays, exchange_type="headers", durable=True)
                await raw.queue_bind(
                    queue, self._delays, arguments={"x-match": "all", "eventfn-bucket": queue}
                )
            self._buckets.setdefault(owner, set()).add(queue)

    # -- fetch, settle, extend ----------------------------------------------------------------

    async def fetch(
        self, subscription: SubscriptionRef, limit: int, *, lease: float, wait: float = 0.0
    ) -> list[Delivery]:
        consumer = await self._consumer(subscription)
        return await consumer.fetch(limit, lease, wait)

    async def _consumer(self, ref: SubscriptionRef) -> Consumer:
        consumer = self._consumers.get(ref.name)
        if consumer is not None and not (consumer.stream and consumer.closed):
            return consumer
        if consumer is not None:
            await consumer.close()  # its channel was closed: RabbitMQ took its records back
        if ref.kind != "stream":
            consumer = QueueConsumer(
                ref,
                self.names.queue(ref.name),
                self._connected,
                self._leases,
                self._owner,
                self._give_back,
                self.options.fetch_linger,
            )
        else:
            consumer = StreamConsumer(
                ref,
                self._queues(ref),
                self._connected,
                self._leases,
                self._owner,
                self.options.stream_prefetch,
            )
            await consumer.start()
        self._consumers[ref.name] = consumer
        return consumer

    async def _give_back(self, consumer: QueueConsumer, unfetched: Sequence[Incoming]) -> None:
        """Return deliveries nobody fetched, uncounted: a copy to the queue, then the ack."""
        copies = []
        for incoming in unfetched:
            headers = incoming.copy_headers(incoming.prior, incoming.first_failed_at)
            props = properties(incoming.id, incoming.type, headers)
            copies.append(Outgoing("", consumer.queue, incoming.body, props))
        await self._publisher.send(copies)
        await consumer.ack(unfetched)

    def _held(self, delivery: Delivery) -> Held | None:
        receipt = delivery.receipt
        if not (isinstance(receipt, tuple) and len(receipt) == 2 and receipt[0] == self._owner):
            return None  # another instance's (or connection's) delivery: not ours to settle
        held = self._leases.get(receipt[1])
        return held if isinstance(held, QueueLease | StreamRecord) else None

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        plan: list[tuple[Settlement, Held]] = []
        for settlement in settlements:
            held = self._held(settlement.delivery)
            if held is not None:
                held.settling = True  # a second settle, an extend or an expiry now pass it by
                plan.append((settlement, held))
        if not plan:
            await anyio.lowlevel.checkpoint()
            return
        try:
            await self._publisher.send(await self._settle_messages(plan))
        except BaseException:
            for _, held in plan:
                held.settling = False
            raise
        queues: dict[QueueConsumer, list[Incoming]] = {}
        streams: dict[StreamConsumer, list[StreamRecord]] = {}
        for settlement, held in plan:
            if not self._finish(settlement, held):
                continue
            if isinstance(held, QueueLease):
                queues.setdefault(held.consumer, []).append(held.incoming)
            else:
                streams.setdefault(held.consumer, []).append(held)
        # the originals' acks: a frame or so per consumer, not one per message
        for queue, incomings in queues.items():
            await queue.ack(incomings)
        for stream, records in streams.items():
            await stream.ack(records)

    async def _settle_messages(self, plan: list[tuple[Settlement, Held]]) -> list[Outgoing]:
        """What must be stored before the originals are acked: emitted, dead letters, copies."""
        emitted = [m for s, _ in plan if s.outcome == "ack" for m in s.emitted]
        await self._require({message.destination for message in emitted})
        now = self.clock()
        if any(message.dedupe > 0 for message in emitted):
            # published and recorded now, before the acks, like the others
            await self._publish_deduped([m for m in emitted if m.dedupe > 0], now)
            emitted = [message for message in emitted if message.dedupe <= 0]
        outgoing = [await self._route(message, now) for message in emitted]
        for settlement, held in plan:
            if settlement.outcome == "dead":
                outgoing.append(self._dead_letter(settlement, held, now))
            elif isinstance(held, QueueLease) and settlement.outcome in ("retry", "release"):
                outgoing.append(await self._copy(settlement, held, now))
        return outgoing

    def _dead_letter(self, settlement: Settlement, held: Held, now: float) -> Outgoing:
        incoming = held.incoming
        name = settlement.delivery.subscription
        record_id = incoming.headers.get(RECORD) or self._ids.new(name, now)
        first = held.first_failed_at if isinstance(held, StreamRecord) else incoming.first_failed_at
        record = dl.dead_record(
            str(record_id),
            name,
            incoming,
            attempt=settlement.delivery.attempt,
            failure=settlement.failure,
            first_failed_at=first,
            now=now,
        )
        return dl.stored_message(self.names, record, self._ids.version(now))

    async def _copy(self, settlement: Settlement, held: QueueLease, now: float) -> Outgoing:
        """A retry or release of a queue or topic delivery: a new copy, then the ack."""
        incoming = held.incoming
        queue = held.consumer.queue
        attempt = settlement.delivery.attempt
        if settlement.outcome == "release":
            # never started: the copy's next delivery has the same attempt number
            headers = incoming.copy_headers(attempt - 1, incoming.first_failed_at)
            props = properties(incoming.id, incoming.type, headers)
            return Outgoing("", queue, incoming.body, props)
        failed_at = settlement.failure.at if settlement.failure else now
        headers = incoming.copy_headers(attempt, incoming.first_failed_at or failed_at)
        if settlement.delay <= 0:
            # straight back, behind what was already waiting
            props = properties(incoming.id, incoming.type, headers)
            return Outgoing("", queue, incoming.body, props)
        name = settlement.delivery.subscription
        bucket = self.names.retry(name, bucket_of(settlement.delay))
        arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}
        await self._bucket(name, bucket, arguments)
        props = properties(incoming.id, incoming.type, headers, expiration=settlement.delay)
        return Outgoing("", bucket, incoming.body, props)

    def _finish(self, settlement: Settlement, held: Held) -> bool:
        """The outcome, as this instance keeps it; True when the original is to be acked."""
        held.settling = False
        if isinstance(held, QueueLease):
            held.ended = True
            self._leases.end(held.token)
            return True
        consumer = held.consumer
        if settlement.outcome in ("ack", "dead"):
            consumer.remove(held)
            return True
        if settlement.outcome == "retry":
            failed_at = settlement.failure.at if settlement.failure else self.clock()
            consumer.retry(held, settlement.delay, failed_at)
        else:
            consumer.release(held)
        return False

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        for delivery in deliveries:
            held = self._held(delivery)
            if held is not None:
                self._leases.extend(held.token, lease)
        await anyio.lowlevel.checkpoint()

    # -- stats --------------------------------------------------------------------------------

    async def stats(self, subscription: SubscriptionRef) -> SubscriptionStats:
        ref = subscription
        if time.monotonic() - self._catalog_at > _CATALOG_TTL:
            async with self._lock() as connection:
                await self._read_catalog(connection)
        ready = await self._ready_count(ref)
        buckets = self._buckets.get(ref.name, set()) | self._buckets.get(ref.destination, set())
        delayed = await self._count(sorted(buckets), missing_ok=True, name=ref.name)
        dead = await self._count([self.names.dead(ref.name)], missing_ok=True, name=ref.name)
        in_flight = 0
        consumer = self._consumers.get(ref.name)
        if isinstance(consumer, QueueConsumer):
            in_flight = consumer.held()
        elif isinstance(consumer, StreamConsumer) and not consumer.closed:
            # pushed ahead by RabbitMQ and held here: not ready on the server any more
            waiting, retrying, in_flight = consumer.counts()
            ready += waiting
            delayed += retrying
        return SubscriptionStats(
            subscription=ref.name, ready=ready, delayed=delayed, in_flight=in_flight, dead=dead
        )

    async def _ready_count(self, ref: SubscriptionRef) -> int:
        """Ready on the server plus pushed here unfetched, read until both stand still.

        A message RabbitMQ pushes while they are read would count on both sides (or neither),
        so the pair is read until two readings agree (a few tries: under steady traffic it is
        a moment's snapshot, like any count of a moving queue).
        """
        consumer = self._consumers.get(ref.name)
        last: tuple[int, int] | None = None
        for _ in range(_COUNT_TRIES):
            server = await self._count(self._queues(ref), missing_ok=False, name=ref.name)
            local = await consumer.sync() if isinstance(consumer, QueueConsumer) else 0
            if (server, local) == last or not isinstance(consumer, QueueConsumer):
                break
            last = (server, local)
        return server + local

    async def _count(self, queues: Iterable[str], *, missing_ok: bool, name: str) -> int:
        """Ready messages in these queues (RabbitMQ counts neither unacked nor in-flight)."""
        total = 0
        for queue in queues:
            raw = await self._admin_raw()
            try:
                declared = await raw.queue_declare(queue, passive=True)
            except ChannelNotFoundEntity:
                if missing_ok:
                    continue
                raise ConfigurationError(f"subscription {name!r} was never declared") from None
            total += declared.message_count or 0
        return total

    # -- dead letters -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _records(
        self, subscriptions: Iterable[str] | None, tokens: set[str] | None = None
    ) -> AsyncIterator[tuple[Catalog, dict[str, dict[str, dl.Versions]]]]:
        """Under the lock: the records of these subscriptions (all when None), read in full."""
        async with self._lock() as connection, contextlib.AsyncExitStack() as stack:
            catalog = await self._read_catalog(connection)
            names = list(catalog.subscriptions) if subscriptions is None else list(subscriptions)
            for name in names:
                if name not in catalog.subscriptions:
                    raise ConfigurationError(f"subscription {name!r} was never declared")
            if tokens is not None:
                names = [name for name in names if token(name) in tokens]
            found: dict[str, dict[str, dl.Versions]] = {}
            for name in names:
                stores = []
                for queue in (self.names.dead(name), self.names.replayed(name)):
                    browsed = await browse(connection, queue)
                    stack.push_async_callback(browsed.close)
                    stores.append(browsed)
                found[name] = dl.fold(name, stores)
            yield catalog, found

    async def dead_letters(
        self, subscription: str | None = None, *, limit: int = 100, after: str | None = None
    ) -> list[DeadLetterRecord]:
        subs = None if subscription is None else [subscription]
        async with self._records(subs) as (_, found):
            records = [
                versions.record
                for records in found.values()
                for versions in records.values()
                if versions.record.state == "dead"
            ]
        records.sort(key=lambda record: record.id)
        if after is not None:
            records = [record for record in records if record.id > after]
        return records[:limit]

    async def dead_letter(self, record_id: str) -> DeadLetterRecord | None:
        tokens = {record_id[-TOKEN_DIGITS:]}
        async with self._records(None, tokens) as (_, found):
            for records in found.values():
                for versions in records.values():
                    if versions.record.id == record_id:
                        return versions.record
        return None

    async def replay(self, record_ids: Sequence[str]) -> int:
        wanted = set(record_ids)
        if not wanted:
            await anyio.lowlevel.checkpoint()
            return 0
        tokens = {record_id[-TOKEN_DIGITS:] for record_id in wanted}
        async with self._records(None, tokens) as (catalog, found):
            now = self.clock()
            chosen = [
                (catalog.subscriptions[name], versions)
                for name, records in found.items()
                for versions in records.values()
                if versions.record.id in wanted and versions.record.state == "dead"
            ]
            outgoing: list[Outgoing] = []
            for ref, versions in chosen:
                record = versions.record
                outgoing.append(self._replayed_copy(ref, record))
                replayed = msgspec.structs.replace(
                    record, state="replayed", replayed=record.replayed + 1
                )
                outgoing.append(dl.stored_message(self.names, replayed, self._ids.version(now)))
            await self._publisher.send(outgoing)
            for _, versions in chosen:
                for browsed, message in versions.found:
                    await browsed.ack(message)
        return len(chosen)

    def _replayed_copy(self, ref: SubscriptionRef, record: DeadLetterRecord) -> Outgoing:
        """The message again, to its own subscription's queue only, at attempt 1."""
        queues = self._queues(ref)
        # the partition its routing key would pick: the low bits of the same hash
        spread = hash_of(record.key if record.key is not None else record.message_id)
        queue = queues[spread % len(queues)]
        headers = headers_of(record.key, record.published_at)
        headers[RECORD] = record.id
        headers[REPLAYED] = record.replayed + 1
        return Outgoing("", queue, record.body, properties(record.message_id, "", headers))

    async def purge(self, subscription: str | None = None) -> int:
        subs = None if subscription is None else [subscription]
        async with self._records(subs) as (_, found):
            count = 0
            for records in found.values():
                count += len(records)
                for versions in records.values():
                    for browsed, message in versions.found:
                        await browsed.ack(message)
        return count

    # -- drop ---------------------------------------------------------------------------------

    async def drop(self) -> None:
        """Delete every queue and exchange of this namespace (as the catalog lists them)."""
        consumers, self._consumers = list(self._consumers.values()), {}
        for consumer in consumers:
            await consumer.close()
        async with self._lock() as connection:
            catalog = await self._read_catalog(connection)
            raw = await self._admin_raw()
            for ref in catalog.subscriptions.values():
                for queue in self._queues(ref):
                    await raw.queue_delete(queue)
                await raw.queue_delete(self.names.dead(ref.name))
                await raw.queue_delete(self.names.replayed(ref.name))
            for queues in catalog.buckets.values():
                for queue in queues:
                    await raw.queue_delete(queue)
            for destination in catalog.kinds:
                await raw.exchange_delete(self.names.exchange(destination))
            await raw.exchange_delete(self._delays)
            await raw.queue_delete(self.names.dedupe)
            await raw.queue_delete(self.names.catalog)
        self._destinations.clear()
        self._buckets.clear()


async def _close_channel(channel: aio_pika.abc.AbstractChannel | None) -> None:
    if channel is not None and not channel.is_closed:
        with contextlib.suppress(Exception):
            await channel.close()
