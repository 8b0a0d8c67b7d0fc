"""The dead-letter store: two classic queues per subscription, read under the namespace lock.

``{ns}/dead/{sub}`` holds records in state ``dead``, ``{ns}/replayed/{sub}`` those in state
``replayed``; each message is one *version* of a record (JSON, with a version stamp), and a
record is the newest version of each message id. So:

- dead-lettering appends a version to ``dead`` (no lock: one confirmed publish, before the ack);
- a replayed copy carries its record's id and replay count in headers, so when it fails again the
  new version has the same id and count (``replayed`` still holds the old version until the next
  replay or purge removes it; readers see the newer one);
- ``replay`` and ``purge`` take the lock, read both queues, publish what replaces a version, then
  ack what it replaces;
- a message RabbitMQ itself dead-lettered (``x-delivery-limit`` reached, say after a crash loop)
  lands in ``dead`` as it was: it is read as a record with error type ``DeliveryLimitExceeded``
  and an id derived from its ``x-death`` time, stable across reads.

Record ids are fixed-width decimal numbers: creation time in microseconds, a counter, then five
digits of the subscription's name, so that text order, number order and creation order agree
(``after`` pages by them) and a lookup by id reads only that subscription's store. Stats count
``dead`` from the queue's message count, with no read.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from aiormq.abc import DeliveredMessage

from eventfn.brokers.base import DeadLetterRecord, Failure
from eventfn_amqp._names import Names, token
from eventfn_amqp._publish import Outgoing
from eventfn_amqp._store import Browsed, StoredRecord, decode_record, encode_record
from eventfn_amqp._wire import REPLAYED, STORED, Incoming, micros, properties


@dataclass
class Versions:
    """Every stored version of one record, and where each one is."""

    record: DeadLetterRecord
    version: int
    found: list[tuple[Browsed, DeliveredMessage]] = field(default_factory=list)


class RecordIds:
    """Record ids and version stamps, increasing within this instance."""

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._last = 0

    def new(self, subscription: str, now: float) -> str:
        return f"{micros(now):017d}{next(self._counter) % 10000:04d}{token(subscription)}"

    def version(self, now: float) -> int:
        self._last = max(micros(now), self._last + 1)
        return self._last


def stored_message(names: Names, record: DeadLetterRecord, version: int) -> Outgoing:
    """The publish that stores one version of a record in the queue of its state."""
    queue = names.dead if record.state == "dead" else names.replayed
    body = encode_record(StoredRecord(record=record, version=version))
    return Outgoing("", queue(record.subscription), body, properties(record.id, "", {STORED: 1}))


def dead_record(
    record_id: str,
    subscription: str,
    incoming: Incoming,
    *,
    attempt: int,
    failure: Failure | None,
    first_failed_at: float | None,
    now: float,
) -> DeadLetterRecord:
    failure = failure or Failure(error_type="Unknown", message="", at=now)
    failed_at = failure.at or now
    return DeadLetterRecord(
        id=record_id,
        subscription=subscription,
        message_id=incoming.id,
        body=incoming.body,
        key=incoming.key,
        error_type=failure.error_type,
        error_message=failure.message,
        traceback=failure.traceback,
        attempts=attempt,
        first_failed_at=first_failed_at or failed_at,
        last_failed_at=failed_at,
        published_at=incoming.published_at,
        replayed=int(incoming.headers.get(REPLAYED, 0)),
    )


def fold(subscription: str, stores: Sequence[Browsed]) -> dict[str, Versions]:
    """The records of one subscription (by message id) from its two store queues."""
    records: dict[str, Versions] = {}
    for browsed in stores:
        for message in browsed.messages:
            record, version = _version(subscription, message)
            found = records.get(record.message_id)
            if found is None:
                found = records[record.message_id] = Versions(record, version)
            elif version > found.version:
                # keep the oldest id, so that a record never moves in the listing order
                keep = min(found.record.id, record.id)
                found.record = msgspec.structs.replace(record, id=keep)
                found.version = version
            found.found.append((browsed, message))
    return records


def _version(subscription: str, message: DeliveredMessage) -> tuple[DeadLetterRecord, int]:
    headers = message.header.properties.headers or {}
    if headers.get(STORED):
        try:
            stored = decode_record(message.body)
            return stored.record, stored.version
        except msgspec.DecodeError:
            pass  # not a record after all: read it as a message RabbitMQ dead-lettered
    return _from_server(subscription, message), 0


def _from_server(subscription: str, message: DeliveredMessage) -> DeadLetterRecord:
    """A message RabbitMQ dead-lettered on its own (``x-delivery-limit``), as a record."""
    incoming = Incoming(message)
    deaths: Any = incoming.headers.get("x-death") or [{}]
    when = deaths[0].get("time") if isinstance(deaths, list) and deaths else None
    at = when.timestamp() if isinstance(when, datetime) else incoming.published_at
    suffix = token(incoming.id)[-4:]
    return DeadLetterRecord(
        id=f"{micros(at):017d}{suffix}{token(subscription)}",
        subscription=subscription,
        message_id=incoming.id,
        body=incoming.body,
        key=incoming.key,
        error_type="DeliveryLimitExceeded",
        error_message=(
            f"RabbitMQ dead-lettered it after {incoming.headers.get('x-delivery-count', '?')} "
            "returns to its queue (x-delivery-limit): its runners kept dying or losing leases"
        ),
        traceback="",
        attempts=incoming.prior + 1,
        first_failed_at=incoming.first_failed_at or at,
        last_failed_at=at,
        published_at=incoming.published_at,
        replayed=int(incoming.headers.get(REPLAYED, 0)),
    )
