"""How an eventfn message travels as an AMQP message, and back.

The body is the encoded envelope, byte for byte. Transport bookkeeping lives in headers, never in
the envelope (``DESIGN.md`` section 5)::

    message_id                   the message id
    type                         the CloudEvents type (also the end of the routing key)
    eventfn-key                  the partition key, if any
    eventfn-published-at         publish time, integer microseconds since the epoch
    eventfn-attempts             attempts made before this copy was published (retry, release)
    eventfn-first-failed-at      time of the first failure, integer microseconds
    eventfn-record, eventfn-replayed   the dead-letter record a replayed copy came from

``x-delivery-count`` is set by the quorum queue: the returns (nack, lost channel) of this copy.
A delivery's attempt is ``eventfn-attempts + x-delivery-count + 1``.
"""

from __future__ import annotations

from typing import Any

from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

KEY = "eventfn-key"
PUBLISHED_AT = "eventfn-published-at"
ATTEMPTS = "eventfn-attempts"
FIRST_FAILED_AT = "eventfn-first-failed-at"
RECORD = "eventfn-record"
REPLAYED = "eventfn-replayed"
STORED = "eventfn-stored"
"""Marks a message of a dead-letter store queue as a record this broker wrote (see _store)."""

_OURS = (KEY, PUBLISHED_AT, ATTEMPTS, FIRST_FAILED_AT, RECORD, REPLAYED)


def dead(channel: AbstractChannel | None) -> bool:
    """Whether a channel can no longer be used: closed itself, or its connection closed.

    A channel of a connection closed under it may still say it is open, and a frame written to
    it would wait forever for a writer that is gone.
    """
    if channel is None or channel.is_closed:
        return True
    connection = channel.connection
    return connection.is_closed or not connection.is_opened


def micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


def seconds(micros: Any) -> float:
    return int(micros) / 1_000_000


def properties(
    message_id: str,
    type: str,
    headers: dict[str, Any],
    *,
    expiration: float | None = None,
) -> Basic.Properties:
    """Persistent message properties; ``expiration`` in seconds for a delay bucket."""
    return Basic.Properties(
        message_id=message_id,
        message_type=type or None,
        delivery_mode=2,
        headers=headers,
        expiration=None if expiration is None else str(max(0, round(expiration * 1000))),
    )


def headers_of(key: str | None, published_at: float) -> dict[str, Any]:
    headers: dict[str, Any] = {PUBLISHED_AT: micros(published_at)}
    if key is not None:
        headers[KEY] = key
    return headers


class Incoming:
    """The eventfn view of one delivered AMQP message."""

    __slots__ = ("body", "first_failed_at", "headers", "id", "key", "message", "prior", "type")

    def __init__(self, message: DeliveredMessage) -> None:
        props = message.header.properties
        headers: dict[str, Any] = dict(props.headers or {})
        self.message = message
        self.body = message.body
        self.headers = headers
        self.id = props.message_id or ""
        self.type = props.message_type or ""
        key = headers.get(KEY)
        self.key = key.decode() if isinstance(key, bytes) else key
        failed = headers.get(FIRST_FAILED_AT)
        self.first_failed_at = None if failed is None else seconds(failed)
        # attempts already made: before this copy was published, and returns of this copy
        self.prior = int(headers.get(ATTEMPTS, 0)) + int(headers.get("x-delivery-count", 0))

    @property
    def tag(self) -> int:
        tag = getattr(self.message.delivery, "delivery_tag", None)
        return int(tag or 0)

    @property
    def published_at(self) -> float:
        value = self.headers.get(PUBLISHED_AT)
        return 0.0 if value is None else seconds(value)

    def copy_headers(self, attempts: int, first_failed_at: float | None) -> dict[str, Any]:
        """Headers of a copy published again (retry, release): ours only, attempts updated."""
        headers = {name: self.headers[name] for name in _OURS if name in self.headers}
        if attempts:
            headers[ATTEMPTS] = attempts
        else:
            headers.pop(ATTEMPTS, None)
        if first_failed_at is not None:
            headers[FIRST_FAILED_AT] = micros(first_failed_at)
        return headers
