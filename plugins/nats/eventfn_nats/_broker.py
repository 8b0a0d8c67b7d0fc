"""``nats://``: the broker protocol on NATS JetStream (see the package README for the design)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
import uuid
from collections.abc import Sequence
from urllib.parse import unquote

from eventfn.brokers.base import (
    Broker,
    Clock,
    DeadLetterRecord,
    Delivery,
    Kind,
    OutgoingMessage,
    Settlement,
    SubscriptionRef,
    SubscriptionStats,
)
from eventfn.exceptions import ConfigurationError
from eventfn_nats._deadletters import DeadLetters
from eventfn_nats._dedupe import Dedupe, Mark
from eventfn_nats._layout import KEYLESS, LATER, Layout, unknown
from eventfn_nats._names import Names, parse_url, split_subscription, token
from eventfn_nats._puller import Pulled, Puller
from eventfn_nats._receipt import Bookkeeping, Receipt, parse_reply
from eventfn_nats._views import Destination, Subscription, moved, nak
from eventfn_nats._wire import Outgoing, Wire

_TIMEOUT = 5.0  # seconds an API call or a batch of publish acks may take
_MOVE_EVERY = 0.1  # seconds between looks for delayed messages that came due
_SWEEP_EVERY = 1.0  # seconds between looks for a stream key left without a head
_ACK = b""
_PROGRESS = b"+WPI"

Answer = tuple[Receipt, bytes]
"""An ack or nak to send to a delivery's reply subject."""


class NatsBroker(Broker):
    """NATS JetStream: ``nats://[user:password@]host:4222?namespace=name&lease=30``.

    >>> broker = NatsBroker("nats://127.0.0.1:4222?namespace=shop")
    """

    scheme = "nats"
    known_gaps = {}  # every conformance check passes

    def __init__(self, url: str, *, clock: Clock = time.time) -> None:
        super().__init__(url, clock=clock)
        settings = parse_url(url)
        self.namespace = settings.namespace
        self.lease = settings.lease
        self.names = Names(settings.namespace)
        self._wire = Wire(settings, self.describe, _TIMEOUT)
        self._layout = Layout(self._wire, self.names, self.lease, settings.max_deliver)
        self._book = Bookkeeping(self._wire, self.names)
        self._dead = DeadLetters(self._wire, self.names, self.clock)
        self._dedupe = Dedupe(self._wire, self.names, self._layout)
        # Nats-Msg-Id of a message without dedupe: unique, so that JetStream drops only the
        # same publish sent again after a reconnection, never another message of the same id.
        instance = uuid.uuid4().hex[:16]
        self._msg_ids = (f"{instance}.{n}" for n in itertools.count())
        self._kinds: dict[str, Kind] = {}
        self._subs: dict[str, Subscription] = {}
        self._destinations: dict[str, Destination] = {}
        self._lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._wire.connect()
        try:
            await self._layout.create_system_streams()
        except BaseException:
            await self._wire.close()
            raise

    async def close(self) -> None:
        if not self._wire.connected:
            return
        with contextlib.suppress(Exception):
            await self._give_back()
        self._subs.clear()
        self._destinations.clear()
        await self._wire.close()

    async def _give_back(self) -> None:
        """Release what arrived for no fetch: leased here, never handed out."""
        for sub in list(self._subs.values()):
            strays = await sub.puller.stop()
            deliveries = await self._deliveries(sub, strays, self.lease)
            await self.settle([Settlement(delivery=d, outcome="release") for d in deliveries])
        for destination in self._destinations.values():
            for msg, _ in await destination.later.stop():
                await self._wire.nc.publish(msg.reply, nak(0))

    async def drop(self) -> None:
        streams: list[str] = []
        while True:
            request = {"subject": self.names.all_subjects, "offset": len(streams)}
            answer = await self._wire.api("STREAM.NAMES", request)
            page = answer.get("streams") or []
            streams += page
            if not page or len(streams) >= int(answer.get("total", 0)):
                break
        for name in streams:
            await self._wire.api(f"STREAM.DELETE.{name}")
        self._kinds.clear()
        self._subs.clear()
        self._destinations.clear()

    # -- declare and publish ----------------------------------------------------------------------

    async def declare(self, subscriptions: Sequence[SubscriptionRef]) -> None:
        for ref in subscriptions:
            await self._layout.declare(ref)

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        await self._publish(messages)

    async def _publish(
        self, messages: Sequence[OutgoingMessage], msg_ids: Sequence[str] | None = None
    ) -> None:
        """Publish ``messages``; ``msg_ids``, their ``Nats-Msg-Id`` if the caller has them."""
        if not messages:
            return
        kinds: dict[str, Kind] = {}
        groups: dict[str, dict[str, list[str] | None]] = {}
        for destination in dict.fromkeys(m.destination for m in messages):
            kinds[destination] = await self._kind(destination)
            if kinds[destination] == "stream":  # read fresh: a group declared now gets copies
                groups[destination] = await self._layout.groups(destination)
        now = self.clock()
        ids: Sequence[str | None] | None = msg_ids
        marks: list[Mark] = []
        if ids is None and any(message.dedupe > 0 for message in messages):
            ids, marks = await self._deduplicate(messages, now)
        outgoing: list[Outgoing] = []
        promote = []
        for index, message in enumerate(messages):
            msg_id = next(self._msg_ids) if ids is None else ids[index]
            if msg_id is None:
                continue  # a copy within its de-duplication window: dropped
            sends, keys = self._layout.route(
                message,
                kinds[message.destination],
                groups.get(message.destination, {}),
                message.published_at or now,
                msg_id,
            )
            outgoing += sends
            promote += keys
        await self._wire.publish(outgoing, "publishing")
        if marks:
            await self._dedupe.mark(marks)  # only once their messages are stored
        for ref, key in dict.fromkeys(promote):
            await self._layout.promote(ref, key)

    async def _deduplicate(
        self, messages: Sequence[OutgoingMessage], now: float
    ) -> tuple[list[str | None], list[Mark]]:
        """Each message's ``Nats-Msg-Id``, None for one dropped as a copy (see ``_dedupe``)."""
        places = [index for index, message in enumerate(messages) if message.dedupe > 0]
        found, marks = await self._dedupe.first_of_window([messages[i] for i in places], now)
        ids: list[str | None] = [
            None if message.dedupe > 0 else next(self._msg_ids) for message in messages
        ]
        for index, msg_id in zip(places, found, strict=True):
            ids[index] = msg_id
        return ids, marks

    async def _kind(self, destination: str) -> Kind:
        """A destination's kind, read once: it never changes (short of ``drop``)."""
        kind = self._kinds.get(destination)
        if kind is None:
            kind = await self._layout.kind(destination)
            if kind is None:
                raise unknown(destination, self.describe())
            self._kinds[destination] = kind
        return kind

    async def _subscription(self, ref: SubscriptionRef) -> Subscription:
        sub = self._subs.get(ref.name)
        if sub is not None:
            return sub
        async with self._lock:
            sub = self._subs.get(ref.name)
            if sub is None:
                sub = self._subs[ref.name] = await self._open(ref)
        return sub

    async def _open(self, ref: SubscriptionRef) -> Subscription:
        stream = self.names.stream(ref.destination)
        kind = await self._layout.kind(ref.destination)
        if kind != ref.kind or not await self._layout.consumer_exists(stream, token(ref.group)):
            raise ConfigurationError(f"subscription {ref.name!r} was never declared")
        destination = self._destinations.get(ref.destination)
        if destination is None:
            later = Puller(self._wire, stream, LATER)
            await later.start()
            destination = Destination(ref.destination, later)
            self._destinations[ref.destination] = destination
        puller = Puller(self._wire, stream, token(ref.group))
        await puller.start()
        return Subscription(ref, puller, destination)

    # -- fetch ------------------------------------------------------------------------------------

    async def fetch(
        self, subscription: SubscriptionRef, limit: int, *, lease: float, wait: float = 0.0
    ) -> list[Delivery]:
        sub = await self._subscription(subscription)
        if limit <= 0:
            return []
        deadline = time.monotonic() + wait
        while True:
            await self._move_due(sub.destination)
            left = deadline - time.monotonic()
            due_in = sub.destination.next_due - self.clock()
            pulled = await sub.puller.pull(limit, max(0.0, min(left, max(due_in, 0.01))))
            found = await self._deliveries(sub, pulled, lease)
            if found:
                return found
            if sub.ordered:
                await self._sweep(sub)
            if time.monotonic() >= deadline:
                return []

    async def _deliveries(
        self, sub: Subscription, pulled: list[Pulled], lease: float
    ) -> list[Delivery]:
        found: list[Delivery] = []
        again: list[Delivery] = []
        ref, name, ack_wait = sub.ref, sub.ref.name, self.lease
        with self._wire.boundary("fetching"):
            for msg, since in pulled:
                if sub.filtered and not sub.takes(msg.subject):
                    await self._wire.nc.publish(msg.reply, _ACK)  # another group's replay, type
                    continue
                delivered, sequence = parse_reply(msg.reply)
                receipt = Receipt(ref, msg.reply, sequence, delivered, msg.subject)
                receipt.lease(since, ack_wait)
                headers = msg.headers or {}
                key = headers.get("Ef-Key")
                delivery = Delivery(
                    subscription=name,
                    id=headers.get("Ef-Id") or headers["Nats-Msg-Id"],
                    body=msg.data,
                    attempt=delivered,
                    receipt=receipt,
                    key=None if key is None else unquote(key),
                    published_at=float(headers["Ef-Pub"]),
                )
                found.append(delivery)
                if delivered > 1:
                    again.append(delivery)
        if again:
            await self._recall(ref, again)
        if found and abs(lease - ack_wait) > 1e-3:
            await self._set_leases(found, lease)
        return found

    async def _recall(self, ref: SubscriptionRef, deliveries: list[Delivery]) -> None:
        """A redelivery: its attempt less the deliveries that were not attempts."""
        receipts: list[Receipt] = [d.receipt for d in deliveries]
        firsts = await self._book.load(ref, receipts)
        for delivery, receipt, first in zip(deliveries, receipts, firsts, strict=True):
            delivery.attempt = receipt.delivered - receipt.uncounted
            delivery.first_failed_at = first

    async def _set_leases(self, deliveries: Sequence[Delivery], lease: float) -> None:
        """A lease other than ``AckWait``: a Nak with that delay sets when it runs out."""
        with self._wire.boundary("leasing"):
            for delivery in deliveries:
                receipt: Receipt = delivery.receipt
                sent = time.monotonic()
                payload = _PROGRESS if abs(lease - self.lease) <= 1e-3 else nak(lease)
                await self._wire.nc.publish(receipt.reply, payload)
                receipt.lease(sent, lease)

    async def _move_due(self, destination: Destination) -> None:
        """Move delayed messages that came due to where they belong (see the README)."""
        now = time.monotonic()
        if now < destination.next_look and self.clock() < destination.next_due:
            return
        destination.next_look = now + _MOVE_EVERY
        destination.next_due = math.inf
        pulled = await destination.later.pull(256, 0.0)
        due: list[OutgoingMessage] = []
        due_ids: list[str] = []
        replies: list[str] = []
        with self._wire.boundary("moving delayed messages"):
            for msg, _ in pulled:
                headers = msg.headers or {}
                left = float(headers["Ef-Due"]) - self.clock()
                if left > 0:
                    await self._wire.nc.publish(msg.reply, nak(left))
                    destination.next_due = min(destination.next_due, self.clock() + left)
                    continue
                key = headers.get("Ef-Key")
                key = None if key is None else unquote(key)
                message = moved(destination.name, msg.data, headers, key)
                due.append(message)
                # one per delayed record, so that a move redone after a crash stores it once
                due_ids.append(f"{message.id}~due{parse_reply(msg.reply)[1]}")
                replies.append(msg.reply)
        if due:
            await self._publish(due, due_ids)
            with self._wire.boundary("moving delayed messages"):
                for reply in replies:
                    await self._wire.nc.publish(reply, _ACK)

    async def _sweep(self, sub: Subscription) -> None:
        """Promote keys whose head was settled by a runner that died before promoting."""
        now = time.monotonic()
        if now < sub.next_sweep:
            return
        sub.next_sweep = now + _SWEEP_EVERY
        waiting = self.names.waiting_subject(sub.ref, "*")
        stream = self.names.stream(sub.ref.destination)
        for subject in await self._wire.subject_counts(stream, waiting):
            await self._layout.promote(sub.ref, subject.rpartition(".")[2])

    # -- settle and extend ------------------------------------------------------------------------

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        now = time.monotonic()
        live = [s for s in settlements if _receipt(s.delivery).holds(now)]
        emitted = [m for s in live if s.outcome == "ack" for m in s.emitted]
        if emitted:
            await self.publish(emitted)  # before the acks: emitted events are at least once
        answers: list[Answer] = []
        slow: list[Settlement] = []
        for settlement in live:
            receipt: Receipt = settlement.delivery.receipt
            if settlement.outcome == "ack" and not receipt.stateful and not _keyed(receipt):
                answers.append((receipt, _ACK))
            else:
                slow.append(settlement)
        if slow:
            results = await asyncio.gather(
                *(self._prepare(s) for s in slow), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                if result is not None:
                    answers.append(result)
        await self._answer(answers)
        done = [r for r, payload in answers if payload == _ACK and (r.stateful or r.delayed)]
        if done:  # their bookkeeping is no longer needed
            await asyncio.gather(*(self._book.forget(r.ref, r) for r in done))

    async def _prepare(self, settlement: Settlement) -> Answer | None:
        """What must be written before the ack or nak; the answer to send, if any is left."""
        delivery = settlement.delivery
        receipt: Receipt = delivery.receipt
        ref = receipt.ref
        if settlement.outcome == "dead":
            type_token = receipt.subject.split(".")[-2] if ref.kind == "topic" else ""
            await self._dead.write(ref, delivery, settlement.failure, type_token)
        if settlement.outcome in ("ack", "dead"):  # the dead-letter record first, then this
            if _keyed(receipt):
                await self._settle_head(receipt)
                return None
            return receipt, _ACK
        if settlement.outcome == "retry":
            failure = settlement.failure
            first = delivery.first_failed_at or (failure.at if failure else self.clock())
            await self._book.save(
                ref,
                receipt,
                uncounted=receipt.uncounted,
                first_failed_at=first,
                delayed=settlement.delay > 0,
            )
            return receipt, nak(settlement.delay)
        await self._book.save(  # release: the next delivery is not an attempt
            ref,
            receipt,
            uncounted=receipt.uncounted + 1,
            first_failed_at=delivery.first_failed_at,
            delayed=False,
        )
        return receipt, nak(0)

    async def _answer(self, answers: list[Answer]) -> None:
        """Send acks and naks without a round trip each, but return once the server has them.

        A consumer takes its acks in order, so one double ack (with a reply) as the last answer
        to each consumer confirms all before it: stats read after a settle see it. A lease that
        ran out meanwhile (the writes before may have taken long) gets no answer.
        """
        now = time.monotonic()
        answers = [(r, payload) for r, payload in answers if r.holds(now)]
        last = {receipt.ref.name: index for index, (receipt, _) in enumerate(answers)}
        confirming = set(last.values())
        with self._wire.boundary("settling"):
            for index, (receipt, payload) in enumerate(answers):
                if index not in confirming:
                    await self._wire.nc.publish(receipt.reply, payload)
        confirm = [(answers[i][0].reply, answers[i][1], None) for i in sorted(confirming)]
        await self._wire.send(confirm, "settling", again=False)
        for receipt, _ in answers:
            receipt.settled = True

    async def _settle_head(self, receipt: Receipt) -> None:
        """Ack a key's head; once the server has removed it, the key's next record is promoted."""
        await self._answer([(receipt, _ACK)])
        if receipt.settled:
            await self._layout.promote(receipt.ref, receipt.subject.rpartition(".")[2])
            await self._book.forget(receipt.ref, receipt)

    async def extend(self, deliveries: Sequence[Delivery], lease: float) -> None:
        now = time.monotonic()
        await self._set_leases([d for d in deliveries if _receipt(d).holds(now)], lease)

    # -- stats and dead letters -------------------------------------------------------------------

    async def stats(self, subscription: SubscriptionRef) -> SubscriptionStats:
        sub = await self._subscription(subscription)
        ref = sub.ref
        stream = self.names.stream(ref.destination)
        info, later, marked, dead, waiting = await asyncio.gather(
            self._wire.api(f"CONSUMER.INFO.{stream}.{sub.group}"),
            self._wire.api(f"CONSUMER.INFO.{stream}.{LATER}"),
            self._book.delayed(ref),
            self._dead.count_dead(ref),
            self._waiting(sub),
        )
        in_flight = int(info["num_ack_pending"])
        retrying = min(marked, in_flight)  # a marker outliving its message must not count
        scheduled = int(later["num_pending"]) + int(later["num_ack_pending"])
        return SubscriptionStats(
            subscription=ref.name,
            ready=int(info["num_pending"]) + waiting,
            delayed=retrying + scheduled,
            in_flight=in_flight - retrying,
            dead=dead,
        )

    async def _waiting(self, sub: Subscription) -> int:
        if not sub.ordered:
            return 0
        stream = self.names.stream(sub.ref.destination)
        waiting = self.names.waiting_subject(sub.ref, "*")
        return sum((await self._wire.subject_counts(stream, waiting)).values())

    async def dead_letters(
        self, subscription: str | None = None, *, limit: int = 100, after: str | None = None
    ) -> list[DeadLetterRecord]:
        await self._known(subscription)
        return await self._dead.page(subscription, limit, after)

    async def dead_letter(self, record_id: str) -> DeadLetterRecord | None:
        found = await self._dead.find(record_id)
        return None if found is None else found.record

    async def replay(self, record_ids: Sequence[str]) -> int:
        return await self._dead.each(list(record_ids), self._layout.replay)

    async def purge(self, subscription: str | None = None) -> int:
        await self._known(subscription)
        return await self._dead.purge(subscription)

    async def _known(self, subscription: str | None) -> None:
        if subscription is None:
            return
        destination, group = split_subscription(subscription)
        found = await self._layout.meta(destination)
        if found is None or group not in found[0].get("groups", {}):
            raise ConfigurationError(f"subscription {subscription!r} was never declared")


def _receipt(delivery: Delivery) -> Receipt:
    receipt = delivery.receipt
    if not isinstance(receipt, Receipt):
        raise ConfigurationError("a delivery from another broker was given to the nats broker")
    return receipt


def _keyed(receipt: Receipt) -> bool:
    """A stream record with a key: its settle must promote the key's next record."""
    return receipt.ref.kind == "stream" and not receipt.subject.endswith(f".{KEYLESS}")
