"""The broker protocol: pull-based, batched, and small enough for any real engine.

A broker stores messages and hands them out under a lease. It knows destinations and
subscriptions, nothing about handlers. Its whole surface is:

- :meth:`Broker.declare` subscriptions (idempotent, at runner start-up);
- :meth:`Broker.publish` a batch of encoded envelopes;
- :meth:`Broker.fetch` up to N deliveries of one subscription, each leased;
- :meth:`Broker.settle` a batch: ack (with the events the handler emitted), retry after a
  delay, dead-letter, or release (give back unstarted, no attempt counted);
- :meth:`Broker.extend` the leases of deliveries still being worked on;
- the dead-letter store (:meth:`Broker.dead_letters`, :meth:`Broker.replay`,
  :meth:`Broker.purge`) and :meth:`Broker.stats`.

Destination kinds keep their own contracts (``DESIGN.md`` section 2):

- ``queue``: one subscription per destination; each message goes to one consumer.
- ``topic``: one subscription per group; a publish copies the message to every group that
  exists at that moment (and whose type filter matches). A later group starts at new messages.
- ``stream``: like a topic, and within a group the broker never leases a record while an
  earlier record of the same key is unsettled (leased or waiting for a delayed retry), so that
  records of one key are handled one at a time, in publish order, across retries and restarts.

Every broker passes :func:`eventfn.testing.check_broker`.
"""

from __future__ import annotations

import abc
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, Protocol, Self
from urllib.parse import urlsplit, urlunsplit

import msgspec

Kind = Literal["queue", "topic", "stream"]
Outcome = Literal["ack", "retry", "dead", "release"]
Clock = Callable[[], float]

QUEUE_GROUP = "queue"
"""The group name of a queue's one subscription."""


class SubscriptionRef(msgspec.Struct, frozen=True, kw_only=True):
    """What a broker knows of a subscription: a destination of a kind, and a group.

    ``types`` narrows a topic or stream subscription to events of those CloudEvents types
    (the app's event bus uses it), ``None`` takes every message.
    """

    destination: str
    kind: Kind
    group: str = QUEUE_GROUP
    types: tuple[str, ...] | None = None
    partitions: int = 1

    @property
    def name(self) -> str:
        """``destination`` for a queue, ``destination/group`` for a topic or stream."""
        if self.kind == "queue":
            return self.destination
        return f"{self.destination}/{self.group}"


class OutgoingMessage(msgspec.Struct, frozen=True, kw_only=True):
    """An encoded envelope on its way to a destination.

    ``dedupe``, when above 0, asks the broker to store the message only if no message with the
    same id was stored to the same destination with ``dedupe`` during the last ``dedupe``
    seconds (by the broker's clock), atomically with the publish: sources that several runners
    run (schedule ticks) publish each message once this way.

    ``span`` is the message's open ``send`` span when tracing is on (its context is already in
    the envelope); whoever publishes the message ends it. Brokers ignore it.
    """

    destination: str
    id: str
    type: str
    body: bytes
    key: str | None = None
    published_at: float = 0.0
    delay: float = 0.0
    dedupe: float = 0.0
    span: Any = msgspec.field(default=None)


class Delivery(msgspec.Struct, kw_only=True):
    """One message handed to one subscription under a lease.

    ``attempt`` is the broker's delivery count (1 on the first delivery), so a crash loop counts
    toward the dead-letter limit. ``receipt`` is the broker's own handle for settling it, which
    also fences a stale settle after the lease was taken over: it must differ on every lease
    of the message (a release lowers ``attempt``, so the attempt alone is no fence).
    """

    subscription: str
    id: str
    body: bytes
    attempt: int
    receipt: Any
    key: str | None = None
    published_at: float = 0.0
    first_failed_at: float | None = None


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """Why a delivery failed: kept with a retry and in a dead-letter record."""

    error_type: str
    message: str
    traceback: str = ""
    at: float = 0.0


class Settlement(msgspec.Struct, frozen=True, kw_only=True):
    """How one delivery ends.

    - ``ack``: done; ``emitted`` are published with it (atomically where the broker can).
    - ``retry``: deliver again after ``delay`` seconds; the attempt stays counted.
    - ``dead``: move to the subscription's dead-letter store with ``failure``.
    - ``release``: give back unstarted (shutdown); the attempt is not counted.
    """

    delivery: Delivery
    outcome: Outcome
    delay: float = 0.0
    failure: Failure | None = None
    emitted: tuple[OutgoingMessage, ...] = ()


class DeadLetterRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A message in a subscription's dead-letter store, with why it got there."""

    id: str
    subscription: str
    message_id: str
    body: bytes
    key: str | None
    error_type: str
    error_message: str
    traceback: str
    attempts: int
    first_failed_at: float
    last_failed_at: float
    published_at: float
    replayed: int = 0
    state: Literal["dead", "replayed"] = "dead"


class Row(Protocol):
    """A database row: anything indexable by column number (a tuple, an asyncpg Record)."""

    def __getitem__(self, index: int, /) -> Any: ...


def dead_letter_from_row(row: Row) -> DeadLetterRecord:
    """A record from a SQL row in field order: id, subscription, message_id, body, key,
    error_type, error_message, traceback, attempts, first_failed_at, last_failed_at,
    published_at, replayed, state (the order SQL brokers select them in)."""
    return DeadLetterRecord(
        id=str(row[0]),
        subscription=row[1],
        message_id=row[2],
        body=row[3],
        key=row[4],
        error_type=row[5],
        error_message=row[6],
        traceback=row[7],
        attempts=row[8],
        first_failed_at=row[9],
        last_failed_at=row[10],
        published_at=row[11],
        replayed=row[12],
        state=row[13],
    )


class SubscriptionStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counts for one subscription, as the broker has them now."""

    subscription: str
    ready: int
    delayed: int
    in_flight: int
    dead: int

    @property
    def pending(self) -> int:
        """Messages not yet settled: ready, delayed or leased."""
        return self.ready + self.delayed + self.in_flight


class Broker(abc.ABC):
    """Base class of every broker; a plug-in subclasses it and registers its URL scheme.

    ``clock`` gives the time in epoch seconds; a test harness passes a virtual one.
    """

    scheme: ClassVar[str] = ""
    known_gaps: ClassVar[dict[str, str]] = {}
    """Conformance checks (by name) this broker cannot meet, each with the reason. The suite
    runs them as strict expected failures, and the broker's docs say the same."""

    def __init__(self, url: str, *, clock: Clock = time.time) -> None:
        self.url = url
        self.clock = clock

    @property
    def system(self) -> str:
        """The ``messaging.system`` name used in telemetry."""
        return self.scheme

    def describe(self) -> str:
        """The URL with any password replaced by ``***``, safe for logs and errors."""
        return redact_url(self.url)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open connections; raise ``BrokerUnavailable`` naming :meth:`describe` on failure."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close connections. Idempotent."""

    @abc.abstractmethod
    async def declare(self, subscriptions: Sequence[SubscriptionRef]) -> None:
        """Create destinations and subscriptions that do not exist yet.

        Raises ``ConfigurationError`` when a destination exists with another kind.
        """

    @abc.abstractmethod
    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        """Store a batch of messages durably before returning.

        A message goes to the destination's subscriptions as its kind says. Publishing to a
        destination nothing has declared raises ``UnknownDestination``; so does a settle whose
        ack emits to one (the runner then dead-letters that message with the reason).
        ``published_at`` of 0 means "now" by the broker's clock. A message with ``dedupe`` set
        is dropped, silently, when its id was stored to its destination with ``dedupe`` within
        that many seconds (see :class:`OutgoingMessage`); other messages are never de-duplicated.
        """

    @abc.abstractmethod
    async def fetch(
        self, subscription: SubscriptionRef, limit: int, *, lease: float, wait: float = 0.0
    ) -> list[Delivery]:
        """Lease up to ``limit`` deliveries that are due, in roughly the order they came due.

        Returns as soon as at least one is available, or an empty list after ``wait`` seconds.
        Each returned delivery is hidden from other consumers for ``lease`` seconds and its
        ``attempt`` is one more than before. Delayed retries are never returned before due,
        and a retried message goes behind what was due before it (streams keep key order). A
        fetch cancelled by its caller must not keep leases it did not hand out.
        """

    @abc.abstractmethod
    async def settle(self, settlements: Sequence[Settlement]) -> None:
        """Settle a batch. A settlement whose lease was lost (taken over) is ignored.

        A dead letter is stored before its original is removed, and an ack's emitted messages
        are published before (or atomically with) the ack.
        """

    @abc.abstractmethod
    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        """Push the leases of these deliveries to ``lease`` seconds from now."""

    @abc.abstractmethod
    async def stats(self, subscription: SubscriptionRef) -> SubscriptionStats:
        """Ready, delayed, in-flight and dead-letter counts of a subscription."""

    @abc.abstractmethod
    async def dead_letters(
        self, subscription: str | None = None, *, limit: int = 100, after: str | None = None
    ) -> list[DeadLetterRecord]:
        """Dead-letter records in state ``dead``, oldest first, of one subscription or of all.

        ``after`` is a record id from a previous page (keyset pagination).
        """

    @abc.abstractmethod
    async def dead_letter(self, record_id: str) -> DeadLetterRecord | None:
        """One dead-letter record by id, whatever its state."""

    @abc.abstractmethod
    async def replay(self, record_ids: Sequence[str]) -> int:
        """Deliver dead-lettered messages again to their own subscription only.

        The message keeps its id and starts again at attempt 1. The record stays, in state
        ``replayed`` with its replay count raised; if the message fails again, the same record
        (one per subscription and message id) goes back to state ``dead``, keeping the count.
        Returns how many were replayed; ids that are unknown or not ``dead`` are skipped.
        """

    async def drop(self) -> None:
        """Delete everything this broker stores under its URL's namespace: destinations,
        subscriptions, messages, dead letters. For tests and tear-down; a broker that cannot
        say so raises ``NotImplementedError``. Networked brokers take a ``namespace`` query
        parameter in their URL (``redis://host/0?namespace=staging``) that prefixes every name
        they create, so that apps, environments and test runs never see each other's data."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop its data")

    @abc.abstractmethod
    async def purge(self, subscription: str | None = None) -> int:
        """Delete dead-letter records (either state) of one subscription or of all; how many."""


def redact_url(url: str) -> str:
    """``url`` with its password (and any token-like user info) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None and "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    userinfo = f"{user}:***" if parts.password is not None else "***"
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, ""))


def partition_of(key: str | None, partitions: int) -> int:
    """The partition of a key: a stable hash (CRC-32), never Python's per-process ``hash()``."""
    if key is None or partitions <= 1:
        return 0
    return zlib.crc32(key.encode()) % partitions
