"""Fetching from a queue or topic subscription: RabbitMQ pushes, eventfn pulls.

A broker instance consumes a subscription's quorum queue while its runner fetches, and the
consumer's credit (QoS prefetch) is what the fetches asked for: a fetch of ``limit`` while
``held`` deliveries are leased makes sure RabbitMQ may push ``held + limit`` at most, by adding a
consumer with the missing prefetch (per-consumer QoS applies to new consumers only, and
cancelling one to raise it would return what is in flight to it, counted). Credit never grows
past what the runner asked for, which is its free room, so the push buffer is bounded by the
runner's capacity and memory stays flat however long the queue is.

Why not a consumer per fetch: a quorum queue counts, in ``x-delivery-count``, every delivery that
was on its way to a consumer when it was cancelled; with spare credit that happens to some of
the messages published meanwhile. So consumers are cancelled only when idle (no fetch for
``IDLE`` seconds, typically a runner with no free room, whose credit is then used up), and what
they pushed but nobody fetched is given back uncounted: a copy to the queue, then the ack.
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

IDLE = 0.5
"""Seconds without a fetch after which an instance stops consuming a queue (see above)."""
MAX_CREDIT = 4096
"""Most deliveries RabbitMQ may push ahead to one instance for one subscription."""
_GATHER_ROUNDS = 8
# A lease being settled is looked at again this much later, in case its settle failed.
_RECHECK = 1.0

GiveBack = Callable[["QueueConsumer", Sequence[Incoming]], Awaitable[None]]


class QueueLease:
    """A queue or topic delivery held by this instance under a lease."""

    __slots__ = ("consumer", "deadline", "ended", "incoming", "settling", "token")

    def __init__(self, consumer: QueueConsumer, incoming: Incoming) -> None:
        self.consumer = consumer
        self.incoming = incoming
        self.token = 0
        self.deadline = 0.0
        self.settling = False
        self.ended = False

    @property
    def live(self) -> bool:
        return not (self.ended or self.settling or dead(self.incoming.message.channel))

    @property
    def finished(self) -> bool:
        return self.ended

    async def due(self, now: float) -> None:
        if self.ended or self.deadline > now:
            return
        if self.settling:
            self.consumer.leases.timers.add(now + _RECHECK, self)
            return
        # the lease ran out: back to the queue, and the quorum queue counts the return
        self.ended = True
        self.consumer.leases.end(self.token)
        await self.consumer.nack(self.incoming)


class QueueConsumer:
    """The fetch side of one queue or topic subscription in one broker instance."""

    stream = False
    closed = False  # a lost channel is replaced at the next fetch; its leases go with it
    finished = False  # its idle check is always kept

    def __init__(
        self,
        ref: SubscriptionRef,
        queue: str,
        connect: Callable[[], Awaitable[aio_pika.abc.AbstractConnection]],
        leases: Leases,
        owner: str,
        give_back: GiveBack,
        linger: float = 0.0,
    ) -> None:
        self.ref = ref
        self.queue = queue
        self.leases = leases
        self._connect = connect
        self._owner = owner
        self._give_back = give_back
        self._linger = linger
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._raw: AbstractChannel | None = None
        self._acks = Acks()  # what the channel delivered and nothing settled yet
        self._tags: set[str] = set()  # consumers now registered on the queue
        self._credit = 0  # their prefetch, summed
        self._owed = 0  # their deliveries not acked yet (pushed here, or leased)
        self._buffer: deque[Incoming] = deque()
        self._changed = anyio.Event()
        self._fetching = 0
        self._last_fetch = 0.0
        self._idle_check = False  # an idle check is scheduled
        self._lock = anyio.Lock()

    async def fetch(self, limit: int, lease: float, wait: float) -> list[Delivery]:
        if limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        self._fetching += 1
        try:
            await self._ensure_credit(limit)
            deadline = time.monotonic() + wait
            yielded = False
            while True:
                if self._changed.is_set():
                    self._changed = anyio.Event()  # one event per wait, not per arrival
                changed = self._changed
                if self._buffer and len(self._buffer) < limit:
                    await self._gather_arrived()
                    if self._linger and len(self._buffer) < limit:
                        await self._fill(limit)
                    yielded = True
                if self._buffer:
                    # no await between taking and returning: a cancelled fetch leases nothing
                    count = min(limit, len(self._buffer))
                    return [self._lease(self._buffer.popleft(), lease) for _ in range(count)]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or dead(self._raw):
                    if yielded:
                        return []
                    # never empty-handed without letting what was pushed meanwhile arrive
                    await anyio.lowlevel.checkpoint()
                    yielded = True
                    continue
                with anyio.move_on_after(remaining):
                    await changed.wait()
                yielded = True
        finally:
            self._fetching -= 1
            self._last_fetch = time.monotonic()
            if not self._idle_check:
                self._idle_check = True
                self.leases.timers.add(self._last_fetch + IDLE, self)

    async def _gather_arrived(self) -> None:
        """Let deliveries already read from the socket land, so a fetch returns them together.

        Deliveries land as aiormq's reader gets to them (or each in a task of its own, with an
        aiormq that ``deliver_inline`` does not know): without this a fetch woken by the first
        one could return a batch of one, and the runner would fetch once per message.
        """
        for _ in range(_GATHER_ROUNDS):
            before = len(self._buffer)
            await anyio.lowlevel.checkpoint()
            if len(self._buffer) == before:
                return

    async def _fill(self, limit: int) -> None:
        """The URL's ``fetch_linger``: wait that long at most for ``limit`` deliveries, once
        one is here (the credit for them is there: RabbitMQ may push them if it has them)."""
        with anyio.move_on_after(self._linger):
            while len(self._buffer) < limit and not dead(self._raw):
                if self._changed.is_set():
                    self._changed = anyio.Event()
                await self._changed.wait()

    async def _ensure_credit(self, limit: int) -> None:
        if not self._lock.locked() and not dead(self._raw):
            # the common case, decided without the lock: the credit is there already
            free = self._credit - self._owed
            if min(limit - len(self._buffer) - free, MAX_CREDIT - self._credit) <= 0:
                return
        async with self._lock:
            raw = await self._ready()
            free = self._credit - self._owed
            missing = min(limit - len(self._buffer) - free, MAX_CREDIT - self._credit)
            if missing <= 0:
                return
            try:
                await raw.basic_qos(prefetch_count=missing)
                ok = await raw.basic_consume(self.queue, self._arrive)
            except ChannelNotFoundEntity:
                raise ConfigurationError(
                    f"subscription {self.ref.name!r} was never declared (or was dropped)"
                ) from None
            except AMQPError as exc:
                raise BrokerError(f"fetch {self.ref.name}: {type(exc).__name__}: {exc}") from exc
            if ok.consumer_tag:
                self._tags.add(ok.consumer_tag)
            self._credit += missing

    async def _ready(self) -> AbstractChannel:
        if self._raw is None or dead(self._raw):
            await self._close_channel()
            # whatever that channel held went back to the queue with it
            self._tags.clear()
            self._buffer.clear()
            self._credit = self._owed = 0
            connection = await self._connect()
            self._channel = await connection.channel(publisher_confirms=False)
            self._raw = await self._channel.get_underlay_channel()
            self._acks = Acks()
            deliver_inline(self._raw, self._land)  # or _arrive runs, as aiormq's tasks
        return self._raw

    async def _arrive(self, message: DeliveredMessage) -> None:
        self._land(message)

    def _land(self, message: DeliveredMessage) -> None:
        incoming = Incoming(message)
        if message.channel is self._raw:
            self._acks.arrived(incoming.tag)
        self._owed += 1
        self._buffer.append(incoming)
        if not self._changed.is_set():
            self._changed.set()

    def _lease(self, incoming: Incoming, seconds: float) -> Delivery:
        token = self.leases.grant(QueueLease(self, incoming), seconds)
        return Delivery(
            subscription=self.ref.name,
            id=incoming.id,
            body=incoming.body,
            attempt=incoming.prior + 1,
            receipt=(self._owner, token),
            key=incoming.key,
            published_at=incoming.published_at,
            first_failed_at=incoming.first_failed_at,
        )

    def _owned(self, incomings: Sequence[Incoming]) -> list[int]:
        """The tags of those deliveries that are still this channel's to settle (the others
        went back to the queue with their channel, closed or replaced by a new one)."""
        raw = self._raw
        if dead(raw):
            return []
        tags = []
        for incoming in incomings:
            message = incoming.message
            if message.channel is raw:
                if getattr(message.delivery, "consumer_tag", None) in self._tags:
                    self._owed -= 1
                tags.append(incoming.tag)
        return tags

    async def ack(self, incomings: Sequence[Incoming]) -> None:
        """Ack deliveries: those that lead the channel's unsettled ones in one frame."""
        tags = self._owned(incomings)
        raw = self._raw
        if not tags or raw is None:
            return
        await self._acks.ack(raw, tags)

    async def nack(self, incoming: Incoming) -> None:
        """Return a delivery to its queue (counted in ``x-delivery-count``)."""
        raw = self._raw
        if not self._owned([incoming]) or raw is None:
            return
        await self._acks.nack(raw, incoming.tag)

    async def due(self, now: float) -> None:
        """The idle check: stop consuming when nobody fetched for ``IDLE`` seconds."""
        self._idle_check = False
        if self._fetching:
            return  # that fetch schedules the next check when it ends
        if now - self._last_fetch < IDLE:
            self._idle_check = True
            self.leases.timers.add(self._last_fetch + IDLE, self)
            return
        if not self._tags:
            return
        async with self._lock:
            await self._stop_consuming()

    async def _stop_consuming(self) -> None:
        raw = self._raw
        with anyio.CancelScope(shield=True):
            if raw is not None and not dead(raw):
                for tag in list(self._tags):
                    await raw.basic_cancel(tag)
                await anyio.lowlevel.checkpoint()  # deliveries that came before cancel-ok
            # from here on, what is pushed or leased counts against no consumer's credit
            self._tags.clear()
            self._credit = self._owed = 0
            unfetched = list(self._buffer)
            self._buffer.clear()
            if unfetched and not dead(raw):
                await self._give_back(self, unfetched)

    async def sync(self) -> int:
        """Pushed here but not fetched, once what RabbitMQ already sent has arrived."""
        raw = self._raw
        if raw is not None and not dead(raw) and self._tags:
            # any RPC on this channel: deliveries sent before its reply arrive before it
            await raw.basic_qos(prefetch_count=1)
        return len(self._buffer)

    def held(self) -> int:
        return sum(
            1
            for lease in self.leases.held.values()
            if isinstance(lease, QueueLease) and lease.consumer is self and lease.live
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # a broken connection: RabbitMQ requeues it all
            async with self._lock:
                await self._stop_consuming()
        await self._close_channel()

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):  # the server may have closed it
                await channel.close()
