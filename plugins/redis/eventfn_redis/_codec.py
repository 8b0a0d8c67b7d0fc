"""What crosses the wire: the broker URL, script arguments, and the replies turned into structs.

Scripts take flat argument lists (``ARGV``) and give flat replies, so that a batch of any size
is one command and one reply, without an encoding layer on either side. The layout of each
list is described at the top of its Lua script.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from eventfn.brokers.base import (
    DeadLetterRecord,
    Delivery,
    Failure,
    OutgoingMessage,
    Settlement,
)
from eventfn.exceptions import ConfigurationError

Arg = str | bytes | int
"""One script argument, as redis-py encodes it."""

DEFAULT_NAMESPACE = "eventfn"
# Letters, digits, "_", "." and "-": never a glob character, so `drop()` can SCAN MATCH it.
_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_json = msgspec.json.Encoder()
_T = TypeVar("_T")


def split_url(url: str, described: str) -> tuple[str, str]:
    """The namespace of a broker URL, and the URL for redis-py (without ``namespace``)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = [value for name, value in query if name == "namespace"]
    namespace = given[-1] if given else DEFAULT_NAMESPACE
    if not _NAMESPACE.fullmatch(namespace):
        raise ConfigurationError(
            f"broker URL {described!r} has namespace {namespace!r}; use 1 to 100 letters, "
            "digits, '_', '.' or '-'"
        )
    rest = urlencode([(name, value) for name, value in query if name != "namespace"])
    return namespace, urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment))


def chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def milliseconds(seconds: float) -> int:
    # Rounded up: a delay is a lower bound, and a message must never come before it is due.
    return max(0, math.ceil(seconds * 1000))


def message_args(message: OutgoingMessage, now: float) -> list[Arg]:
    """The 8 fields of one message in the publish and settle scripts (``publish_at``)."""
    return [
        message.destination,
        message.id,
        message.type,
        message.body,
        "" if message.key is None else "=" + message.key,
        repr(message.published_at or now),
        milliseconds(message.delay),
        milliseconds(message.dedupe),
    ]


def publish_args(messages: Sequence[OutgoingMessage], now: float) -> list[Arg]:
    destinations = sorted({message.destination for message in messages})
    args: list[Arg] = [len(destinations), *destinations]
    for message in messages:
        args += message_args(message, now)
    return args


def settle_args(settlements: Sequence[Settlement], consumer: str, now: float) -> list[Arg]:
    destinations = sorted({m.destination for s in settlements for m in s.emitted})
    args: list[Arg] = [consumer, len(destinations), *destinations]
    # Plain acks, the bulk of every batch, go together: one token each, per subscription.
    acks: dict[str, list[bytes]] = defaultdict(list)
    for settlement in settlements:
        sid, token = settlement.delivery.receipt
        outcome = settlement.outcome
        if outcome == "ack" and not settlement.emitted:
            acks[sid].append(token)
        elif outcome == "ack":
            args += ["e", sid, token, len(settlement.emitted)]
            for message in settlement.emitted:
                args += message_args(message, now)
        elif outcome == "retry":
            failed_at = settlement.failure.at if settlement.failure else now
            args += ["r", sid, token, milliseconds(settlement.delay), repr(failed_at or now)]
        elif outcome == "dead":
            failure = settlement.failure or Failure(error_type="Unknown", message="", at=now)
            why = [failure.error_type, failure.message, failure.traceback, repr(failure.at or now)]
            args += ["d", sid, token, *why]
        else:
            args += ["l", sid, token]
    for sid, tokens in acks.items():
        args += ["a", sid, len(tokens), *tokens]
    return args


def extend_args(deliveries: Iterable[Delivery], consumer: str, lease: float) -> list[Arg]:
    tokens: dict[str, list[bytes]] = defaultdict(list)
    for delivery in deliveries:
        sid, token = delivery.receipt
        tokens[sid].append(token)
    args: list[Arg] = [consumer, milliseconds(lease)]
    for sid, held in tokens.items():
        args += [sid, len(held), *held]
    return args


def types_arg(types: tuple[str, ...] | None) -> bytes:
    return b"" if types is None else _json.encode(list(types))


def deliveries(name: str, sid: str, reply: list[Any]) -> list[Delivery]:
    """The deliveries of a fetch reply: after the count, a header, the id and the body each."""
    values = iter(reply)
    next(values)
    found = []
    for header, message_id, body in zip(values, values, values, strict=True):
        attempt, published_at, first_failed_at, token = header.split(b"\t", 3)
        # "entry-id count releases", then " =" and the key if there is one (see held() in Lua)
        parts = token.split(b" ", 3)
        found.append(
            Delivery(
                subscription=name,
                id=message_id.decode(),
                body=body,
                attempt=int(attempt),
                receipt=(sid, token),
                key=parts[3][1:].decode() if len(parts) == 4 else None,
                published_at=float(published_at),
                first_failed_at=float(first_failed_at) if first_failed_at else None,
            )
        )
    return found


def records(reply: list[Any]) -> list[DeadLetterRecord]:
    """The records of a dead_page reply: each record id, then its hash as a flat list."""
    return [
        record(rid, dict(zip(flat[::2], flat[1::2], strict=True)))
        for rid, flat in zip(reply[::2], reply[1::2], strict=True)
    ]


def record(record_id: bytes | str, fields: dict[bytes, bytes]) -> DeadLetterRecord:
    """A dead-letter record from its hash."""
    key = fields.get(b"k")
    return DeadLetterRecord(
        id=record_id if isinstance(record_id, str) else record_id.decode(),
        subscription=fields[b"s"].decode(),
        message_id=fields[b"m"].decode(),
        body=fields[b"b"],
        key=None if key is None else key.decode(),
        error_type=fields[b"et"].decode(),
        error_message=fields[b"em"].decode(),
        traceback=fields[b"tb"].decode(),
        attempts=int(fields[b"n"]),
        first_failed_at=float(fields[b"ff"]),
        last_failed_at=float(fields[b"lf"]),
        published_at=float(fields[b"p"]),
        replayed=int(fields[b"r"]),
        state=cast(Literal["dead", "replayed"], fields[b"st"].decode()),
    )


def record_number(record_id: str | None) -> int | None:
    """A record id as the number it is, or None for one this broker never gave out."""
    if record_id is None or not record_id.isdigit():
        return None
    return int(record_id)
