"""The dead-letter queue as a Python API: list, look at, replay and purge dead letters.

A broker keeps one dead-letter store per subscription (``DESIGN.md`` section 4). This module
reads and changes it through the broker's own dead-letter methods, so it works on every broker,
and it is what ``eventfn dlq`` runs. It also renders a record for people (:func:`format_record`)
and for tools (:func:`record_json`).

>>> async with app:
...     dlq = app.dead_letters("payments/notify")
...     for record in await dlq.list(error="DeadLetter", since="1h"):
...         print(record.id, record.error_message)
...     await dlq.replay(all=True)
"""

from __future__ import annotations

import builtins
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import msgspec

from eventfn.brokers.base import Broker, DeadLetterRecord
from eventfn.events import decode_envelope
from eventfn.exceptions import DecodeError

Since = float | datetime | str
"""A point in time: epoch seconds, a ``datetime``, ISO 8601 text, or ``10m``/``2h``/``1d`` ago."""

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` while a replay goes on."""

PAGE_SIZE = 500
BATCH_SIZE = 500
RAW_PREVIEW = 1024
"""Bytes of an undecodable body that :func:`format_record` shows."""

_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Control characters and bidi overrides: a handler's error text or a poison message must not
# be able to move the cursor, recolour or reorder what an operator reads in a terminal.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


class DeadLetterQueue:
    """The dead letters of a connected broker, or of one of its subscriptions.

    Methods that take ``subscription`` default to the one the queue is bound to (``None``: every
    subscription). Records are listed oldest first; only records in state ``dead`` are listed,
    while :meth:`get` finds a record in any state.

    >>> dlq = DeadLetterQueue(broker, "orders/send-email")
    >>> await dlq.count()
    3
    """

    def __init__(
        self,
        broker: Broker,
        subscription: str | None = None,
        *,
        page_size: int = PAGE_SIZE,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        if page_size < 1 or batch_size < 1:
            raise ValueError("page_size and batch_size must be at least 1")
        self.broker = broker
        self.subscription = subscription
        self.page_size = page_size
        self.batch_size = batch_size

    def __repr__(self) -> str:
        where = self.subscription or "every subscription"
        return f"DeadLetterQueue({self.broker.describe()!r}, {where!r})"

    def _sub(self, subscription: str | None) -> str | None:
        return subscription or self.subscription

    async def scan(
        self,
        *,
        subscription: str | None = None,
        error: str | None = None,
        since: Since | None = None,
    ) -> AsyncGenerator[DeadLetterRecord, None]:
        """Every matching record in state ``dead``, oldest first, a page at a time.

        ``error`` matches the error type by its qualified name or its last dotted part(s), so
        ``DecodeError`` matches ``eventfn.exceptions.DecodeError``. ``since`` keeps records whose
        last failure is at or after that time (see :func:`parse_since`).
        """
        sub = self._sub(subscription)
        cutoff = None if since is None else parse_since(since)
        after: str | None = None
        while True:
            page = await self.broker.dead_letters(sub, limit=self.page_size, after=after)
            for record in page:
                if error_matches(record.error_type, error) and (
                    cutoff is None or record.last_failed_at >= cutoff
                ):
                    yield record
            if len(page) < self.page_size:
                return
            after = page[-1].id

    def __aiter__(self) -> AsyncIterator[DeadLetterRecord]:
        return self.scan()

    async def list(
        self,
        *,
        subscription: str | None = None,
        error: str | None = None,
        since: Since | None = None,
        limit: int | None = None,
    ) -> builtins.list[DeadLetterRecord]:
        """Matching records in state ``dead``, oldest first, at most ``limit`` of them.

        >>> await dlq.list(error="DecodeError", since="2h")
        """
        found: builtins.list[DeadLetterRecord] = []
        if limit is not None and limit < 1:
            return found
        # aclosing: stopping at the limit must close the generator now, not at garbage collection
        async with aclosing(self.scan(subscription=subscription, error=error, since=since)) as it:
            async for record in it:
                found.append(record)
                if limit is not None and len(found) >= limit:
                    break
        return found

    async def get(self, record_id: str) -> DeadLetterRecord | None:
        """One record by id, in any state; ``None`` if unknown (or of another subscription)."""
        record = await self.broker.dead_letter(record_id)
        if record is None or (self.subscription and record.subscription != self.subscription):
            return None
        return record

    async def count(self, subscription: str | None = None) -> int:
        """How many records are in state ``dead``."""
        total = 0
        async with aclosing(self.scan(subscription=subscription)) as it:
            async for _ in it:
                total += 1
        return total

    async def replay(
        self,
        ids: Iterable[str] | None = None,
        *,
        subscription: str | None = None,
        all: bool = False,
        progress: Progress | None = None,
    ) -> int:
        """Deliver dead letters again, each to its own subscription only; returns how many.

        Give record ``ids``, or ``all=True`` for every dead record of one subscription (bound or
        given: replaying every subscription at once is refused on purpose). Each message keeps its
        id, and its record moves to state ``replayed`` with its replay count raised. Ids that are
        unknown, not ``dead`` or of another subscription than the bound or given one are skipped.

        >>> await dlq.replay(["17", "18"])
        >>> await dlq.replay(all=True, subscription="orders/send-email", progress=print)
        """
        if all == (ids is not None):
            raise ValueError("give record ids, or all=True with a subscription (not both)")
        sub = self._sub(subscription)
        if all:
            if sub is None:
                raise ValueError(
                    "replay(all=True) needs a subscription: replaying the dead letters of every "
                    "subscription at once is refused; name one, e.g. subscription='orders/email'"
                )
            wanted = [record.id async for record in self.scan(subscription=sub)]
        else:
            assert ids is not None  # checked above; mypy cannot see it through `all`
            # one id given bare would otherwise be replayed character by character
            wanted = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
            if sub is not None:
                wanted = [i for i in wanted if await self._belongs(i, sub)]
        return await self._replay_batches(wanted, progress)

    async def _belongs(self, record_id: str, subscription: str) -> bool:
        record = await self.broker.dead_letter(record_id)
        return record is not None and record.subscription == subscription

    async def _replay_batches(self, ids: builtins.list[str], progress: Progress | None) -> int:
        total = len(ids)
        replayed = 0
        if progress is not None:
            progress(0, total)
        for start in range(0, total, self.batch_size):
            batch = ids[start : start + self.batch_size]
            replayed += await self.broker.replay(batch)
            if progress is not None:
                progress(start + len(batch), total)
        return replayed

    async def purge(self, *, subscription: str | None = None) -> int:
        """Delete the records (dead or replayed) of a subscription, or of all; how many."""
        return await self.broker.purge(self._sub(subscription))


def error_matches(error_type: str, wanted: str | None) -> bool:
    """Whether ``error_type`` is ``wanted``, or ends with ``.`` and ``wanted``."""
    if not wanted:
        return True
    return error_type == wanted or error_type.endswith(f".{wanted}")


def parse_since(value: Since, *, now: float | None = None) -> float:
    """A point in time as epoch seconds.

    Accepts epoch seconds (a number, or its text), a ``datetime``, ISO 8601 text
    (``2026-11-26T10:00``, ``2026-11-26``, ``2026-11-26T10:00:00+01:00``) or a span ago
    (``90s``, ``10m``, ``2h``, ``1d``, ``1w``). Times without an offset are UTC, as eventfn
    prints them. Raises ``ValueError`` saying what is accepted.

    >>> parse_since("10m", now=1_000.0)
    400.0
    """
    if isinstance(value, datetime):
        return _utc(value).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    ago = _AGO.fullmatch(text)
    if ago:
        return (time.time() if now is None else now) - float(ago[1]) * _SECONDS[ago[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return _utc(datetime.fromisoformat(text)).timestamp()
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a time: give an ISO time like 2026-11-26T10:00 (UTC unless "
            "it has an offset), a span ago like 30s, 10m, 2h, 1d or 1w, or epoch seconds"
        ) from None


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def iso_time(epoch: float | None, timespec: str = "milliseconds") -> str | None:
    """Epoch seconds as ISO 8601 in UTC (``2026-11-26T10:00:00.000Z``); ``None`` if unknown."""
    if not epoch:
        return None
    text = datetime.fromtimestamp(epoch, UTC).isoformat(timespec=timespec)
    return text.replace("+00:00", "Z")


def printable(text: str) -> str:
    """``text`` with control characters escaped, safe to write to a terminal."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def record_json(record: DeadLetterRecord, *, full: bool = False) -> dict[str, Any]:
    """A record as a JSON-ready dict (times as ISO strings); ``full`` adds traceback and body.

    The body is the decoded envelope, or for a message that is not a valid envelope, ``null``
    with ``body_error`` and ``body_preview`` (its first bytes, escaped).
    """
    data: dict[str, Any] = {
        "id": record.id,
        "subscription": record.subscription,
        "message_id": record.message_id,
        "key": record.key,
        "error_type": record.error_type,
        "error_message": record.error_message,
        "attempts": record.attempts,
        "first_failed_at": iso_time(record.first_failed_at),
        "last_failed_at": iso_time(record.last_failed_at),
        "published_at": iso_time(record.published_at),
        "replayed": record.replayed,
        "state": record.state,
    }
    if full:
        envelope, problem = _decoded(record.body)
        data["traceback"] = record.traceback
        data["envelope"] = envelope
        if problem is not None:
            data["body_error"] = problem
            data["body_preview"] = raw_preview(record.body)
    return data


def _decoded(body: bytes) -> tuple[Any, str | None]:
    """The envelope as plain JSON values, or ``None`` and why it is not a valid envelope."""
    try:
        decode_envelope(body)
    except DecodeError as exc:
        return None, str(exc)
    return msgspec.json.decode(body), None


def raw_preview(body: bytes, limit: int = RAW_PREVIEW) -> str:
    """The first ``limit`` bytes of ``body`` as an escaped, ASCII-only Python bytes literal."""
    shown = repr(body[:limit])
    if len(body) > limit:
        shown += f" ... ({len(body) - limit} more bytes)"
    return shown


def format_record(record: DeadLetterRecord) -> str:
    """A record for people: what failed, why, when, how often, and the message itself.

    >>> print(format_record(await dlq.get("17")))
    """
    times = "time" if record.replayed == 1 else "times"
    fields = [
        ("subscription", record.subscription),
        ("message id", record.message_id),
        ("key", record.key or "-"),
        ("state", f"{record.state} (replayed {record.replayed} {times})"),
        ("error type", record.error_type),
        ("error", record.error_message or "-"),
        ("attempts", str(record.attempts)),
        ("first failure", iso_time(record.first_failed_at) or "-"),
        ("last failure", iso_time(record.last_failed_at) or "-"),
        ("published", iso_time(record.published_at) or "-"),
    ]
    lines = [f"dead letter {record.id}"]
    lines += [f"  {name + ':':<15}{value}" for name, value in fields]
    lines += ["", *_body_lines(record.body), ""]
    if record.traceback:
        lines += ["traceback:", *(f"  {line}" for line in record.traceback.rstrip().splitlines())]
    else:
        lines.append("traceback: none (a message that cannot be decoded is never run)")
    return printable("\n".join(lines))


def _body_lines(body: bytes) -> builtins.list[str]:
    envelope, problem = _decoded(body)
    if problem is None:
        pretty = json.dumps(envelope, indent=2, ensure_ascii=False)
        return ["envelope:", *(f"  {line}" for line in pretty.splitlines())]
    return [
        f"body: not a valid envelope ({problem}); {len(body)} bytes:",
        f"  {raw_preview(body)}",
    ]


__all__ = [
    "DeadLetterQueue",
    "Progress",
    "Since",
    "error_matches",
    "format_record",
    "iso_time",
    "parse_since",
    "printable",
    "raw_preview",
    "record_json",
]
