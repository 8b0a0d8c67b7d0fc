"""``memory://``: the in-process broker for tests. Same contracts as every broker, no durability.

Brokers with the same URL in one process share their state (``memory://`` and
``memory://other`` are two separate brokers), so a publisher and a runner made apart meet.
``dedupe`` windows run on the broker's ``clock`` (a test may pass a virtual one).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Any

import anyio

from eventfn.brokers.base import (
    Broker,
    Clock,
    DeadLetterRecord,
    Delivery,
    Failure,
    OutgoingMessage,
    Settlement,
    SubscriptionRef,
    SubscriptionStats,
)
from eventfn.exceptions import ConfigurationError, UnknownDestination


class _Row:
    __slots__ = (
        "attempts",
        "body",
        "claims",
        "first_failed_at",
        "id",
        "key",
        "leased",
        "published_at",
        "seq",
        "visible_at",
    )

    def __init__(self, seq: int, message: OutgoingMessage, visible_at: float) -> None:
        self.seq = seq
        self.id = message.id
        self.body = message.body
        self.key = message.key
        self.published_at = message.published_at or visible_at - message.delay
        self.visible_at = visible_at
        self.attempts = 0
        # the fence: raised on every lease and never lowered (a release lowers ``attempts``)
        self.claims = 0
        self.leased = False
        self.first_failed_at: float | None = None


class _Subscription:
    def __init__(self, ref: SubscriptionRef) -> None:
        self.ref = ref
        self.rows: dict[int, _Row] = {}
        self.dead: dict[str, DeadLetterRecord] = {}
        self.changed = anyio.Event()

    def wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class _State:
    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}
        self.subscriptions: dict[str, _Subscription] = {}
        self.seq = itertools.count(1)
        self.record_ids = itertools.count(1)
        # (destination, id) -> (stored_at, expires_at) of each message stored with ``dedupe``;
        # the heap orders them by expiry, so that expired ones are dropped on the way.
        self.dedupe: dict[tuple[str, str], tuple[float, float]] = {}
        self.expiries: list[tuple[float, tuple[str, str]]] = []

    def first_of_window(self, message: OutgoingMessage, now: float) -> bool:
        """Record a message with ``dedupe``; False if its id was stored to its destination
        with ``dedupe`` within the last ``message.dedupe`` seconds (then it is dropped)."""
        while self.expiries and self.expiries[0][0] <= now:
            expires_at, gone = heapq.heappop(self.expiries)
            if self.dedupe.get(gone, (0.0, None))[1] == expires_at:
                del self.dedupe[gone]
        key = (message.destination, message.id)
        stored = self.dedupe.get(key)
        if stored is not None and stored[0] > now - message.dedupe:
            return False
        expires_at = now + message.dedupe
        self.dedupe[key] = (now, expires_at)
        heapq.heappush(self.expiries, (expires_at, key))
        return True


_STATES: dict[str, _State] = {}


class MemoryBroker(Broker):
    """In-process broker for tests: ``memory://`` (or ``memory://name`` for a separate one)."""

    scheme = "memory"

    def __init__(self, url: str = "memory://", *, clock: Clock | None = None) -> None:
        import time

        super().__init__(url, clock=clock or time.time)
        self._state = _STATES.setdefault(url, _State())

    @classmethod
    def reset(cls, url: str | None = None) -> None:
        """Forget the state of one broker URL, or of all of them (for test isolation)."""
        if url is None:
            _STATES.clear()
        else:
            _STATES.pop(url, None)

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def declare(self, subscriptions: Sequence[SubscriptionRef]) -> None:
        for ref in subscriptions:
            known = self._state.kinds.get(ref.destination)
            if known is not None and known != ref.kind:
                raise ConfigurationError(
                    f"destination {ref.destination!r} is a {known} on this broker, "
                    f"not a {ref.kind}; use another name or the same kind everywhere"
                )
            self._state.kinds[ref.destination] = ref.kind
            self._state.subscriptions.setdefault(ref.name, _Subscription(ref))

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        targets = [self._targets(message) for message in messages]
        now = self.clock()
        for message, subs in zip(messages, targets, strict=True):
            if message.dedupe > 0 and not self._state.first_of_window(message, now):
                continue
            visible_at = (message.published_at or now) + message.delay
            for sub in subs:
                sub.rows[next(self._state.seq)] = _Row(0, message, visible_at)
                sub.wake()
        await anyio.lowlevel.checkpoint()

    def _targets(self, message: OutgoingMessage) -> list[_Subscription]:
        kind = self._state.kinds.get(message.destination)
        if kind is None:
            raise UnknownDestination(
                f"nothing has declared destination {message.destination!r} on {self.describe()}; "
                "start a runner of an app that subscribes to it (or call app.declare()) first"
            )
        return [
            sub
            for sub in self._state.subscriptions.values()
            if sub.ref.destination == message.destination
            and (sub.ref.types is None or message.type in sub.ref.types)
        ]

    def _sub(self, name: str) -> _Subscription:
        try:
            return self._state.subscriptions[name]
        except KeyError:
            raise ConfigurationError(f"subscription {name!r} was never declared") from None

    async def fetch(
        self, subscription: SubscriptionRef, limit: int, *, lease: float, wait: float = 0.0
    ) -> list[Delivery]:
        sub = self._sub(subscription.name)
        deadline = self.clock() + wait
        await anyio.lowlevel.checkpoint()
        while True:
            # no await between leasing and returning: a cancelled fetch never loses leases
            found = self._lease(sub, limit, lease)
            if found or limit <= 0:
                return found
            now = self.clock()
            if now >= deadline:
                return []
            # rows held behind a leased stream head come free by a settle, which wakes us
            later = (r.visible_at for r in sub.rows.values() if r.visible_at > now)
            next_due = min(later, default=math.inf)
            with anyio.move_on_after(max(0.0, min(deadline, next_due) - now)):
                await sub.changed.wait()

    def _lease(self, sub: _Subscription, limit: int, lease: float) -> list[Delivery]:
        now = self.clock()
        ordered = sub.ref.kind == "stream"
        blocked: set[str] = set()
        found: list[Delivery] = []
        for seq, row in sub.rows.items():
            if len(found) >= limit:
                break
            if ordered and row.key is not None:
                if row.key in blocked:
                    continue
                blocked.add(row.key)
            if row.visible_at > now:
                continue
            row.attempts += 1
            row.claims += 1
            row.leased = True
            row.visible_at = now + lease
            found.append(
                Delivery(
                    subscription=sub.ref.name,
                    id=row.id,
                    body=row.body,
                    attempt=row.attempts,
                    receipt=(seq, row.claims),
                    key=row.key,
                    published_at=row.published_at,
                    first_failed_at=row.first_failed_at,
                )
            )
        return found

    def _held(self, delivery: Delivery) -> tuple[_Subscription, int, _Row] | None:
        sub = self._state.subscriptions.get(delivery.subscription)
        seq, claims = delivery.receipt
        row = sub.rows.get(seq) if sub else None
        if sub is None or row is None or row.claims != claims or not row.leased:
            return None
        return sub, seq, row

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        for settlement in settlements:
            held = self._held(settlement.delivery)
            if held is None:
                continue
            sub, seq, row = held
            if settlement.outcome == "ack":
                await self.publish(settlement.emitted)  # raises before the ack if undeclared
                del sub.rows[seq]
            elif settlement.outcome == "dead":
                self._dead_letter(sub, row, settlement.failure)
                del sub.rows[seq]
            elif settlement.outcome == "retry":
                failure = settlement.failure
                if row.first_failed_at is None:
                    row.first_failed_at = failure.at if failure else self.clock()
                row.leased = False
                row.visible_at = self.clock() + settlement.delay
                if sub.ref.kind != "stream":
                    # like SQLite, serve what was due before it first (streams keep key order)
                    del sub.rows[seq]
                    sub.rows[next(self._state.seq)] = row
            else:
                row.attempts -= 1
                row.leased = False
                row.visible_at = self.clock()
            sub.wake()
        await anyio.lowlevel.checkpoint()

    def _dead_letter(self, sub: _Subscription, row: _Row, failure: Failure | None) -> None:
        now = self.clock()
        failure = failure or Failure(error_type="Unknown", message="", at=now)
        previous = next((r for r in sub.dead.values() if r.message_id == row.id), None)
        if previous is not None:
            del sub.dead[previous.id]
        record_id = previous.id if previous else str(next(self._state.record_ids))
        sub.dead[record_id] = DeadLetterRecord(
            id=record_id,
            subscription=sub.ref.name,
            message_id=row.id,
            body=row.body,
            key=row.key,
            error_type=failure.error_type,
            error_message=failure.message,
            traceback=failure.traceback,
            attempts=row.attempts,
            first_failed_at=row.first_failed_at or failure.at or now,
            last_failed_at=failure.at or now,
            published_at=row.published_at,
            replayed=previous.replayed if previous else 0,
        )

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        until = self.clock() + lease
        for delivery in deliveries:
            held = self._held(delivery)
            if held is not None:
                held[2].visible_at = until
        await anyio.lowlevel.checkpoint()

    async def stats(self, subscription: SubscriptionRef) -> SubscriptionStats:
        sub = self._sub(subscription.name)
        now = self.clock()
        ready = delayed = in_flight = 0
        for row in sub.rows.values():
            if row.visible_at <= now:
                ready += 1
            elif row.leased:
                in_flight += 1
            else:
                delayed += 1
        dead = sum(1 for r in sub.dead.values() if r.state == "dead")
        await anyio.lowlevel.checkpoint()
        return SubscriptionStats(
            subscription=sub.ref.name, ready=ready, delayed=delayed, in_flight=in_flight, dead=dead
        )

    def _records(self, subscription: str | None) -> list[DeadLetterRecord]:
        subs = [self._sub(subscription)] if subscription else self._state.subscriptions.values()
        records = [r for sub in subs for r in sub.dead.values()]
        return sorted(records, key=lambda r: int(r.id))

    async def dead_letters(
        self, subscription: str | None = None, *, limit: int = 100, after: str | None = None
    ) -> list[DeadLetterRecord]:
        records = [r for r in self._records(subscription) if r.state == "dead"]
        if after is not None:
            records = [r for r in records if int(r.id) > int(after)]
        await anyio.lowlevel.checkpoint()
        return records[:limit]

    async def dead_letter(self, record_id: str) -> DeadLetterRecord | None:
        await anyio.lowlevel.checkpoint()
        return next((r for r in self._records(None) if r.id == record_id), None)

    async def replay(self, record_ids: Sequence[str]) -> int:
        wanted = set(record_ids)
        replayed = 0
        for sub in self._state.subscriptions.values():
            for record in list(sub.dead.values()):
                if record.id not in wanted or record.state != "dead":
                    continue
                message = _as_outgoing(record, sub.ref.destination)
                sub.rows[next(self._state.seq)] = _Row(0, message, self.clock())
                sub.dead[record.id] = _replace(record, replayed=record.replayed + 1)
                sub.wake()
                replayed += 1
        await anyio.lowlevel.checkpoint()
        return replayed

    async def purge(self, subscription: str | None = None) -> int:
        subs = [self._sub(subscription)] if subscription else self._state.subscriptions.values()
        count = 0
        for sub in subs:
            count += len(sub.dead)
            sub.dead.clear()
        await anyio.lowlevel.checkpoint()
        return count


def _as_outgoing(record: DeadLetterRecord, destination: str) -> OutgoingMessage:
    return OutgoingMessage(
        destination=destination,
        id=record.message_id,
        type="",
        body=record.body,
        key=record.key,
        published_at=record.published_at,
    )


def _replace(record: DeadLetterRecord, **changes: Any) -> DeadLetterRecord:
    import msgspec

    return msgspec.structs.replace(record, state="replayed", **changes)
