"""Fetching from a stream subscription: one active consumer per partition, key order kept here.

Each partition of a group is a quorum queue with ``x-single-active-consumer``: RabbitMQ delivers
it to one consumer at a time, in queue order, and hands it to a standby consumer (another runner)
only when that consumer's channel goes away. The active instance keeps per-key order itself:

- records come in queue order and wait here, unacked, up to the stream prefetch per partition;
- a key's next record is handed out only once the one before it is acked or dead-lettered;
- a retry never leaves RabbitMQ: the record stays unacked here until due, then goes out again
  (attempt counted here), so a later record of its key can never overtake it;
- an expired lease or a release puts the record back at the front of its key, here.

Nothing is ever returned to the queue while this instance runs, because a returned record comes
back behind the ones this channel still holds: RabbitMQ would then reorder the key when the
channel closes. When the channel does close (shutdown, crash, RabbitMQ's consumer_timeout), every
record held here returns in its original order, each counted once in ``x-delivery-count``.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import aio_pika
import anyio
import anyio.lowlevel
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import AMQPError, ChannelNotFoundEntity

from eventfn.brokers.base import Delivery, SubscriptionRef
from eventfn.exceptions import BrokerError, ConfigurationError
from eventfn_amqp._acks import Acks
from eventfn_amqp._delivery import deliver_inline
from eventfn_amqp._leases import Leases
from eventfn_amqp._wire import Incoming, dead

_RECHECK = 1.0


class StreamRecord:
    """A stream record held (unacked) by this instance, with its place in its key's order."""

    __slots__ = (
        "consumer",
        "deadline",
        "first_failed_at",
        "incoming",
        "local",
        "retry_at",
        "settling",
        "state",
        "token",
    )

    def __init__(self, consumer: StreamConsumer, incoming: Incoming) -> None:
        self.consumer = consumer
        self.incoming = incoming
        # "blocked" (behind its key's head), "ready", "leased", "waiting" (retry), "gone"
        self.state = "ready"
        self.local = 0  # attempts made here: retries and expired leases
        self.token = 0
        self.deadline = 0.0
        self.retry_at = 0.0
        self.settling = False
        self.first_failed_at = incoming.first_failed_at

    @property
    def attempt(self) -> int:
        return self.incoming.prior + self.local + 1

    @property
    def live(self) -> bool:
        return self.state == "leased" and not self.settling and not self.consumer.closed

    @property
    def finished(self) -> bool:
        return self.state == "gone"

    async def due(self, now: float) -> None:
        consumer = self.consumer
        if consumer.closed:
            consumer.leases.end(self.token)
        elif self.state == "leased" and self.deadline <= now:
            if self.settling:
                consumer.leases.timers.add(now + _RECHECK, self)
                return
            self.local += 1  # the lease ran out: an attempt was made
            consumer.leases.end(self.token)
            consumer.requeue(self, front=True)
        elif self.state == "waiting" and self.retry_at <= now:
            consumer.requeue(self, front=False)


class StreamConsumer:
    """The fetch side of one stream subscription in one broker instance."""

    stream = True

    def __init__(
        self,
        ref: SubscriptionRef,
        queues: Sequence[str],
        connect: Callable[[], Awaitable[aio_pika.abc.AbstractConnection]],
        leases: Leases,
        owner: str,
        prefetch: int,
    ) -> None:
        self.ref = ref
        self.queues = list(queues)
        self.leases = leases
        self._connect = connect
        self._owner = owner
        self._prefetch = prefetch
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._raw: AbstractChannel | None = None
        self._acks = Acks()
        self.records: set[StreamRecord] = set()
        self._keys: dict[str, deque[StreamRecord]] = {}
        self._ready: deque[StreamRecord] = deque()
        self._changed = anyio.Event()

    @property
    def closed(self) -> bool:
        return self._raw is not None and dead(self._raw)

    async def start(self) -> None:
        connection = await self._connect()
        self._channel = await connection.channel(publisher_confirms=False)
        self._raw = await self._channel.get_underlay_channel()
        deliver_inline(self._raw, self._land)  # or _arrive runs, as aiormq's tasks
        try:
            await self._raw.basic_qos(prefetch_count=self._prefetch)
            for queue in self.queues:
                await self._raw.basic_consume(queue, self._arrive)
        except ChannelNotFoundEntity:
            await self.close()
            raise ConfigurationError(
                f"subscription {self.ref.name!r} was never declared (or was dropped)"
            ) from None
        except AMQPError as exc:
            await self.close()
            raise BrokerError(f"consume {self.ref.name}: {type(exc).__name__}: {exc}") from exc

    async def _arrive(self, message: DeliveredMessage) -> None:
        self._land(message)

    def _land(self, message: DeliveredMessage) -> None:
        record = StreamRecord(self, Incoming(message))
        if message.channel is self._raw:
            self._acks.arrived(record.incoming.tag)
        self.records.add(record)
        key = record.incoming.key
        lane = self._keys.get(key) if key is not None else None
        if lane is not None:
            record.state = "blocked"  # its key's head is still here, unsettled
            lane.append(record)
            return
        if key is not None:
            self._keys[key] = deque([record])
        self._ready.append(record)
        self._wake()

    def _wake(self) -> None:
        if not self._changed.is_set():
            self._changed.set()  # a fetch that waits takes a new event: one per wait

    async def fetch(self, limit: int, lease: float, wait: float) -> list[Delivery]:
        deadline = time.monotonic() + wait
        await anyio.lowlevel.checkpoint()
        while True:
            if self._changed.is_set():
                self._changed = anyio.Event()
            changed = self._changed
            # no await between leasing and returning: a cancelled fetch keeps no lease
            found = self._take(limit, lease)
            remaining = deadline - time.monotonic()
            if found or limit <= 0 or remaining <= 0 or self.closed:
                return found
            with anyio.move_on_after(remaining):
                await changed.wait()

    def _take(self, limit: int, lease: float) -> list[Delivery]:
        found: list[Delivery] = []
        while self._ready and len(found) < limit:
            record = self._ready.popleft()
            if record.state != "ready":
                continue  # settled or re-queued since it was put here
            record.state = "leased"
            token = self.leases.grant(record, lease)
            incoming = record.incoming
            found.append(
                Delivery(
                    subscription=self.ref.name,
                    id=incoming.id,
                    body=incoming.body,
                    attempt=record.attempt,
                    receipt=(self._owner, token),
                    key=incoming.key,
                    published_at=incoming.published_at,
                    first_failed_at=record.first_failed_at,
                )
            )
        return found

    def requeue(self, record: StreamRecord, *, front: bool) -> None:
        """Make a record fetchable again: at the front (release, expiry) or behind (retry)."""
        record.state = "ready"
        (self._ready.appendleft if front else self._ready.append)(record)
        self._wake()

    def retry(self, record: StreamRecord, delay: float, failed_at: float) -> None:
        self.leases.end(record.token)
        record.local += 1
        if record.first_failed_at is None:
            record.first_failed_at = failed_at
        if delay <= 0:
            self.requeue(record, front=False)
            return
        record.state = "waiting"
        record.retry_at = time.monotonic() + delay
        self.leases.timers.add(record.retry_at, record)

    def release(self, record: StreamRecord) -> None:
        self.leases.end(record.token)
        self.requeue(record, front=True)

    def remove(self, record: StreamRecord) -> None:
        """A record whose outcome is stored (acked, or dead-lettered): :meth:`ack` it next."""
        self.leases.end(record.token)
        record.state = "gone"
        self.records.discard(record)

    async def ack(self, records: Sequence[StreamRecord]) -> None:
        """Ack removed records (those leading the channel's unsettled ones in one frame), then
        free their keys: a key's next record is handed out once the ack is on its way."""
        try:
            raw = self._raw
            if not self.closed and raw is not None:
                tags = [r.incoming.tag for r in records if r.incoming.message.channel is raw]
                await self._acks.ack(raw, tags)
        finally:
            for record in records:
                self._free_key(record)

    def _free_key(self, record: StreamRecord) -> None:
        key = record.incoming.key
        lane = self._keys.get(key) if key is not None else None
        if key is None or lane is None:
            return
        if lane and lane[0] is record:
            lane.popleft()
        if not lane:
            del self._keys[key]
            return
        self.requeue(lane[0], front=False)

    def counts(self) -> tuple[int, int, int]:
        """Held here: (waiting to be fetched, waiting for a retry, leased)."""
        states = [record.state for record in self.records]
        waiting = states.count("waiting")
        leased = states.count("leased")
        return len(states) - waiting - leased, waiting, leased

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        self._wake()
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):  # the server may have closed it
                await channel.close()
