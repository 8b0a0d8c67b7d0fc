"""De-duplication of messages published with ``dedupe`` (see the README, *De-duplication*).

JetStream 2.9 drops a publish whose ``Nats-Msg-Id`` the stream stored within its duplicate
window, atomically with the store; but that window is the stream's (2 minutes), one for all
messages, and only 2 minutes long. Windows of any length are kept by a *marker* per
(destination, id): the last message of subject ``{ns}.~dd.{dest}.{hash(id)}`` in the stream
``{ns}~~dd`` (one message per subject), saying when its message was stored (``at``, by the
publishing runner's clock) and until when the window lasts (``until``). A batch's messages with
``dedupe`` are published in three steps:

1. the markers of the batch are read (direct gets, one round trip). A marker stored within the
   last ``dedupe`` seconds drops the message: a copy was stored then. So does an earlier copy
   in the same batch.
2. the others are published with the batch's other messages, with ``Nats-Msg-Id``
   ``{id}~dd{sequence of the marker read}`` (0 without one): runners that read the same marker
   state (say, two runners publishing one schedule tick at about the same time) publish one
   ``Nats-Msg-Id``, and JetStream stores one copy.
3. then each marker is written, with ``Nats-Expected-Last-Subject-Sequence`` the sequence that
   was read, so that of runners racing there only the first writes it; one refused looks again
   and writes it over a marker that was swept or has expired meanwhile.

A marker is written only once its message is stored: a crash never leaves a marker without
its message, so a message is never dropped for good. The price: a crash (or a lost
connection) between steps 2 and 3 leaves a stored message without its marker, and a copy
published more than 2 minutes later is then stored too; so is a copy whose runner read the
markers (step 1) and then stalled for over 2 minutes before publishing (step 2) while another
stored and marked the message. Those are the only ways a duplicate slips through.

Markers whose windows have ended are deleted by runners that publish with ``dedupe``, at most
once a minute each: a few pages of the markers' stream per sweep, each runner going on where
its last sweep stopped, round and round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from eventfn.brokers.base import OutgoingMessage
from eventfn.exceptions import BrokerError, BrokerUnavailable
from eventfn_nats._layout import Layout
from eventfn_nats._names import Names
from eventfn_nats._wire import WRONG_LAST_SEQUENCE, Stored, Wire

log = logging.getLogger("eventfn.nats")

_SWEEP_EVERY = 60.0  # seconds between sweeps of expired markers, per instance
_SWEEP_PAGE = 256  # markers read per round of a sweep
_SWEEP_ROUNDS = 16  # rounds per sweep
_MARK_TRIES = 3


class _Marker(msgspec.Struct, frozen=True):
    at: float  # when its message was stored
    until: float  # when its window ends: the marker may be swept from then on


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Marker).decode


@dataclass(frozen=True, slots=True)
class Mark:
    """A marker to write once its message is stored (step 3)."""

    subject: str
    sequence: int  # of the marker read in step 1, 0 if there was none
    marker: _Marker


class Dedupe:
    """The markers of one namespace, as one broker instance reads and writes them."""

    def __init__(self, wire: Wire, names: Names, layout: Layout) -> None:
        self.wire = wire
        self.names = names
        self.layout = layout
        self._ready = False
        self._next_sweep = 0.0
        self._cursor = 0  # where the next sweep goes on

    async def _stream(self) -> None:
        """Make the markers' stream on first use (idempotent; ``drop()`` deletes it)."""
        if not self._ready:
            await self.layout.create_stream(
                self.names.dedupe_stream,
                self.names.dedupe_subjects,
                "limits",
                max_msgs_per_subject=1,
            )
            self._ready = True

    async def first_of_window(
        self, messages: Sequence[OutgoingMessage], now: float
    ) -> tuple[list[str | None], list[Mark]]:
        """Step 1 for ``messages``, all with ``dedupe``: for each, its ``Nats-Msg-Id``, or None
        if it is dropped; and the markers to write once the others are stored."""
        await self._stream()
        if time.monotonic() >= self._next_sweep:
            await self._sweep(now)
        firsts: dict[str, int] = {}  # marker subject -> index of its first message
        for index, message in enumerate(messages):
            firsts.setdefault(self.names.marker_subject(message.destination, message.id), index)
        subjects = list(firsts)
        found = await self.wire.get_many(
            self.names.dedupe_stream, [{"last_by_subj": subject} for subject in subjects]
        )
        msg_ids: list[str | None] = [None] * len(messages)
        marks: list[Mark] = []
        for subject, stored in zip(subjects, found, strict=True):
            index = firsts[subject]
            message = messages[index]
            marker = _read(stored)
            if marker is not None and marker.at > now - message.dedupe:
                continue  # stored within the window: dropped
            sequence = 0 if stored is None else stored.sequence
            msg_ids[index] = f"{message.id}~dd{sequence}"
            marks.append(Mark(subject, sequence, _Marker(at=now, until=now + message.dedupe)))
        return msg_ids, marks

    async def mark(self, marks: Sequence[Mark]) -> None:
        """Step 3: write the markers of stored messages, each over the marker it replaces."""
        for _ in range(_MARK_TRIES):
            outgoing = [
                (
                    m.subject,
                    _encode(m.marker),
                    {"Nats-Expected-Last-Subject-Sequence": str(m.sequence)},
                )
                for m in marks
            ]
            errors = await self.wire.publish_each(outgoing, "marking de-duplicated messages")
            refused = []
            for mark, error in zip(marks, errors, strict=True):
                if error is None:
                    continue
                if error.code != WRONG_LAST_SEQUENCE:
                    raise error
                refused.append(mark)
            if not refused:
                return
            # Another runner marked it (done), or the marker read was swept or replaced by an
            # expired one meanwhile: then write ours over what is there now.
            found = await self.wire.get_many(
                self.names.dedupe_stream, [{"last_by_subj": m.subject} for m in refused]
            )
            marks = []
            for mark, stored in zip(refused, found, strict=True):
                marker = _read(stored)
                if marker is None or marker.until <= mark.marker.at:
                    sequence = 0 if stored is None else stored.sequence
                    marks.append(Mark(mark.subject, sequence, mark.marker))
            if not marks:
                return
        log.warning("nats: %d de-duplication markers kept changing; not written", len(marks))

    async def _sweep(self, now: float) -> None:
        """Delete markers whose windows have ended: a few pages of the stream, from where this
        instance's last sweep stopped (round and round), so that a long window at the head
        holds nothing back."""
        self._next_sweep = time.monotonic() + _SWEEP_EVERY
        stream = self.names.dedupe_stream
        try:
            state = (await self.wire.api(f"STREAM.INFO.{stream}"))["state"]
            first, last = max(1, int(state["first_seq"])), int(state["last_seq"])
            start = self._cursor if first <= self._cursor <= last else first
            for _ in range(_SWEEP_ROUNDS):
                sequences = range(start, min(start + _SWEEP_PAGE, last + 1))
                if not sequences:
                    break
                found = await self.wire.get_many(stream, [{"seq": seq} for seq in sequences])
                ended = []
                for seq, stored in zip(sequences, found, strict=True):
                    marker = _read(stored)
                    if marker is not None and marker.until <= now:
                        ended.append(seq)
                await self.wire.delete_many(stream, ended)
                start = sequences[-1] + 1
            self._cursor = start if start <= last else 0
        except BrokerUnavailable:
            raise
        except BrokerError as exc:  # a sweep is housekeeping: the next one tries again
            log.warning("nats: sweeping expired de-duplication markers failed: %s", exc)


def _read(stored: Stored | None) -> _Marker | None:
    if stored is None:
        return None
    try:
        return _decode(stored.data)
    except msgspec.DecodeError:
        return None  # not ours to interpret: treated as no marker (at least once)
