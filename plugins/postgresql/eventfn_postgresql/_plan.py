"""Batches as parallel arrays: the parameters of the one statement that carries each out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from eventfn.brokers.base import Failure, OutgoingMessage, Settlement
from eventfn_postgresql._receipt import Receipt
from eventfn_postgresql._sql import SettleShape


class Messages:
    """Messages to insert, as seven parallel arrays (``unnest`` makes them rows again), and
    their ``dedupe`` windows, sent only when some message has one (``deduped``)."""

    __slots__ = ("arrays", "deduped", "destinations", "windows")

    def __init__(self) -> None:
        self.arrays: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
        self.windows: list[float] = []
        self.deduped = False
        self.destinations: set[str] = set()

    def add(self, message: OutgoingMessage, now: float) -> None:
        # published_at 0 means "now" by the broker's clock; a delay counts from publish time.
        published_at = message.published_at or now
        ids, bodies, keys, published, due, types, destinations = self.arrays
        ids.append(message.id)
        bodies.append(message.body)
        keys.append(message.key)
        published.append(published_at)
        due.append(published_at + message.delay)
        types.append(message.type)
        destinations.append(message.destination)
        self.destinations.add(message.destination)
        self.windows.append(message.dedupe)
        if message.dedupe > 0:
            self.deduped = True

    def __len__(self) -> int:
        return len(self.arrays[0])


def messages(batch: Iterable[OutgoingMessage], now: float) -> Messages:
    found = Messages()
    for message in batch:
        found.add(message, now)
    return found


class SettlePlan:
    """A batch of settlements as the parameters of its one settle statement."""

    def __init__(self, settlements: Sequence[Settlement], now: float) -> None:
        self.now = now
        self.deleted: tuple[list[Any], ...] = ([], [])
        self.dead: tuple[list[Any], ...] = ([], [], [], [], [])
        self.causes: list[int] = []
        self.emitted = Messages()
        self.retried: tuple[list[Any], ...] = ([], [], [], [])
        self.released: tuple[list[Any], ...] = ([], [])
        for settlement in settlements:
            self._add(settlement)

    def _add(self, settlement: Settlement) -> None:
        receipt: Receipt = settlement.delivery.receipt
        seq, claims = receipt.seq, receipt.claims
        outcome = settlement.outcome
        if outcome == "ack":
            for message in settlement.emitted:
                self.causes.append(seq)
                self.emitted.add(message, self.now)
            _push(self.deleted, seq, claims)
        elif outcome == "retry":
            failed_at = settlement.failure.at if settlement.failure else self.now
            _push(self.retried, seq, claims, self.now + settlement.delay, failed_at)
        elif outcome == "dead":
            failure = settlement.failure or Failure(error_type="Unknown", message="", at=self.now)
            at = failure.at or self.now
            _push(self.dead, seq, failure.error_type, failure.message, failure.traceback, at)
            _push(self.deleted, seq, claims)
        else:
            _push(self.released, seq, claims)

    @property
    def shape(self) -> SettleShape:
        return SettleShape(
            delete=bool(self.deleted[0]),
            dead=bool(self.dead[0]),
            emitted=bool(self.causes),
            retry=bool(self.retried[0]),
            release=bool(self.released[0]),
            deduped=self.emitted.deduped,
        )

    def arguments(self) -> list[Any]:
        """In the order :meth:`Statements.settle` numbers them, each part only if present."""
        shape = self.shape
        arguments: list[Any] = []
        if shape.delete:
            arguments += self.deleted
        if shape.dead:
            arguments += self.dead
        if shape.emitted:
            arguments += [self.causes, *self.emitted.arrays]
            if shape.deduped:
                arguments += [self.emitted.windows, self.now]
        if shape.retry:
            arguments += self.retried
        if shape.release:
            arguments += [*self.released, self.now]
        return arguments


def _push(columns: tuple[list[Any], ...], *values: Any) -> None:
    """Append one row to parallel arrays."""
    for column, value in zip(columns, values, strict=True):
        column.append(value)
