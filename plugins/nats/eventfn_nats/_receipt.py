"""The receipt of a delivery, and the bookkeeping JetStream cannot keep for us.

**Fencing.** JetStream (2.9 at least) settles by stream sequence: an ack, nak or progress sent
to the reply subject of an *old* delivery acts on the message's *current* delivery, whoever
holds it now. So the receipt fences on this side: it is good until its lease runs out, counted
from the earliest moment the server may have started it, less a margin for the ack's trip to
the server. After that, or once settled, the receipt does nothing: a late settle is ignored and
the message comes back (a duplicate, never a settle of someone else's delivery).

**Attempts.** The attempt is JetStream's delivery count less the deliveries that were not
attempts: a ``release`` (shutdown gives a message back unstarted) and a message given back by a
closing broker. Those, and the time of the first failure, are kept per delivery in the
namespace's ``~~sys`` stream (``...att.{dest}.{group}.{seq}``), written only on a retry or a
release and read only for a redelivery, so a first delivery costs nothing extra.
"""

from __future__ import annotations

import asyncio

import msgspec

from eventfn.brokers.base import SubscriptionRef
from eventfn_nats._names import Names
from eventfn_nats._wire import Outgoing, Wire


def margin(lease: float) -> float:
    """How long before its end a lease is no longer trusted: a settle may take this to land."""
    return min(1.0, 0.1 * lease)


class Receipt:
    """What settles one delivery: its reply subject, valid until ``good_until`` (monotonic)."""

    __slots__ = (
        "delayed",
        "delivered",
        "good_until",
        "ref",
        "reply",
        "sequence",
        "settled",
        "stateful",
        "subject",
        "uncounted",
    )

    def __init__(
        self, ref: SubscriptionRef, reply: str, sequence: int, delivered: int, subject: str
    ) -> None:
        self.ref = ref
        self.reply = reply
        self.sequence = sequence
        self.delivered = delivered
        self.subject = subject
        self.good_until = 0.0
        self.settled = False
        self.uncounted = 0  # deliveries that were not attempts (releases)
        self.stateful = False  # an ...att entry exists for this message
        self.delayed = False  # a ...due marker exists for this message

    def holds(self, now: float) -> bool:
        return not self.settled and now < self.good_until

    def lease(self, started: float, lease: float) -> None:
        self.good_until = started + lease - margin(lease)


def parse_reply(reply: str) -> tuple[int, int]:
    """(delivery count, stream sequence) from a ``$JS.ACK`` reply subject (v1 or v2 form)."""
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.stream.consumer.delivered.sseq.dseq.ts.pending
        return int(tokens[4]), int(tokens[5])
    # $JS.ACK.domain.account.stream.consumer.delivered.sseq.dseq.ts.pending.token
    return int(tokens[6]), int(tokens[7])


class _Entry(msgspec.Struct, frozen=True):
    u: int = 0  # uncounted deliveries
    f: float | None = None  # first failure
    d: bool = False  # a delayed retry: a ...due marker was written too


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Entry).decode


class Bookkeeping:
    """Per-delivery entries in the ``~~sys`` stream (one message per subject)."""

    def __init__(self, wire: Wire, names: Names) -> None:
        self.wire = wire
        self.names = names

    async def load(self, ref: SubscriptionRef, receipts: list[Receipt]) -> list[float | None]:
        """Fill in what earlier deliveries left; each receipt's first failure time."""
        subjects = [self.names.state_subject(ref, r.sequence) for r in receipts]
        stored = await self.wire.get_many(
            self.names.sys_stream, [{"last_by_subj": s} for s in subjects]
        )
        firsts: list[float | None] = []
        markers = []
        for receipt, found in zip(receipts, stored, strict=True):
            entry = _decode(found.data) if found is not None else _Entry()
            receipt.stateful = found is not None
            receipt.uncounted = entry.u
            firsts.append(entry.f)
            if entry.d:  # it came back, so it no longer waits: stats stop counting it delayed
                markers.append(self.names.due_subject(ref, receipt.sequence))
        await asyncio.gather(*(self.wire.purge(self.names.sys_stream, m) for m in markers))
        return firsts

    async def save(
        self,
        ref: SubscriptionRef,
        receipt: Receipt,
        *,
        uncounted: int,
        first_failed_at: float | None,
        delayed: bool,
    ) -> None:
        entry = _Entry(uncounted, first_failed_at, delayed)
        outgoing: list[Outgoing] = [
            (self.names.state_subject(ref, receipt.sequence), _encode(entry), None)
        ]
        if delayed:
            outgoing.append((self.names.due_subject(ref, receipt.sequence), b"", None))
        await self.wire.publish(outgoing, "keeping delivery state")
        receipt.stateful = True
        receipt.delayed = receipt.delayed or delayed

    async def forget(self, ref: SubscriptionRef, receipt: Receipt) -> None:
        """The message is done: drop its entries."""
        if receipt.stateful:
            await self.wire.purge(
                self.names.sys_stream, self.names.state_subject(ref, receipt.sequence)
            )
        if receipt.delayed:
            await self.wire.purge(
                self.names.sys_stream, self.names.due_subject(ref, receipt.sequence)
            )

    async def delayed(self, ref: SubscriptionRef) -> int:
        """Messages of ``ref`` marked as waiting for a delayed retry."""
        subjects = self.names.due_subject(ref, "*")
        return len(await self.wire.subject_counts(self.names.sys_stream, subjects))
