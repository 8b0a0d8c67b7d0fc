"""Dead letters in the namespace's ``~~dlq`` stream.

A record is one subscription's copy of one message id, under the subjects
``{ns}.~dlq.{dest}.{group}.{hash of message id}.{part}``:

- ``.b`` is the message as it was first dead-lettered (body, id, key, publish time, in
  headers). It is written once, and its stream sequence is the record's id: ids are numbers
  that grow, so "oldest first" and ``after=`` pagination are a walk in sequence order.
- ``.dead`` or ``.replayed`` (exactly one of them) holds the record's state: the last failure,
  the attempts and the replay count. A state change writes the new part, then purges the old.

Counting dead records (for ``stats``) is counting ``.dead`` subjects, one stream-info call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import quote, unquote

import msgspec

from eventfn.brokers.base import DeadLetterRecord, Delivery, Failure, SubscriptionRef
from eventfn_nats._names import Names, split_subscription
from eventfn_nats._wire import WRONG_LAST_SEQUENCE, ApiError, Stored, Wire


class _State(msgspec.Struct, frozen=True):
    rid: int
    error_type: str
    error_message: str
    traceback: str
    attempts: int
    first_failed_at: float
    last_failed_at: float
    replayed: int = 0


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_State).decode


class Found(msgspec.Struct, frozen=True):
    """A record with what replay needs besides: the destination's kind and the type token."""

    record: DeadLetterRecord
    kind: str
    type_token: str
    subject: str  # of the ``.b`` part


class DeadLetters:
    def __init__(self, wire: Wire, names: Names, clock: Callable[[], float]) -> None:
        self.wire = wire
        self.names = names
        self.stream = names.dlq_stream
        self.clock = clock

    async def write(
        self,
        ref: SubscriptionRef,
        delivery: Delivery,
        failure: Failure | None,
        type_token: str,
    ) -> None:
        """Store (or update) the record of ``delivery`` in state ``dead``."""
        now = self.clock()
        failure = failure or Failure(error_type="Unknown", message="", at=now)
        at = failure.at or now
        birth = self.names.dead_subject(ref, delivery.id, "b")
        rid, replayed = await self._birth(ref, delivery, type_token, birth)
        state = _State(
            rid=rid,
            error_type=failure.error_type,
            error_message=failure.message,
            traceback=failure.traceback,
            attempts=delivery.attempt,
            first_failed_at=delivery.first_failed_at or at,
            last_failed_at=at,
            replayed=replayed,
        )
        await self._set_state(birth, state, "dead")

    async def _birth(
        self, ref: SubscriptionRef, delivery: Delivery, type_token: str, birth: str
    ) -> tuple[int, int]:
        """The record id (writing the ``.b`` part if new) and its replay count so far."""
        found = await self.wire.get(self.stream, {"last_by_subj": birth})
        if found is None:
            headers = {
                "Ef-Id": delivery.id,
                "Ef-Sub": ref.name,
                "Ef-Kind": ref.kind,
                "Ef-Type": type_token,
                "Ef-Pub": repr(delivery.published_at),
                "Nats-Expected-Last-Subject-Sequence": "0",
            }
            if delivery.key is not None:
                headers["Ef-Key"] = quote(delivery.key, safe="")
            try:
                [ack] = await self.wire.publish([(birth, delivery.body, headers)], "dead-letter")
                return ack.sequence, 0
            except ApiError as exc:
                if exc.code != WRONG_LAST_SEQUENCE:
                    raise
                found = await self.wire.get(self.stream, {"last_by_subj": birth})  # a race
                assert found is not None
        previous = await self._state(birth)
        return found.sequence, previous[0].replayed if previous else 0

    async def _state(self, birth: str) -> tuple[_State, str] | None:
        base = birth.removesuffix(".b")
        dead, replayed = await self.wire.get_many(
            self.stream, [{"last_by_subj": f"{base}.dead"}, {"last_by_subj": f"{base}.replayed"}]
        )
        latest = max(
            (f for f in (dead, replayed) if f is not None), key=lambda f: f.sequence, default=None
        )
        if latest is None:
            return None
        return _decode(latest.data), latest.subject.rpartition(".")[2]

    async def _set_state(self, birth: str, state: _State, part: str) -> None:
        base = birth.removesuffix(".b")
        other = "replayed" if part == "dead" else "dead"
        await self.wire.publish([(f"{base}.{part}", _encode(state), None)], "dead-letter")
        await self.wire.purge(self.stream, f"{base}.{other}")

    async def mark_replayed(self, found: Found) -> None:
        state = await self._state(found.subject)
        if state is not None:
            replayed = msgspec.structs.replace(state[0], replayed=state[0].replayed + 1)
            await self._set_state(found.subject, replayed, "replayed")

    async def find(self, record_id: str) -> Found | None:
        try:
            sequence = int(record_id)
        except ValueError:
            return None
        birth = await self.wire.get(self.stream, {"seq": sequence}) if sequence > 0 else None
        if birth is None or not birth.subject.endswith(".b"):
            return None
        return await self._found(birth)

    async def _found(self, birth: Stored) -> Found | None:
        state = await self._state(birth.subject)
        if state is None:
            return None
        values, part = state
        headers = birth.headers
        key = headers.get("Ef-Key")
        record = DeadLetterRecord(
            id=str(birth.sequence),
            subscription=headers["Ef-Sub"],
            message_id=headers["Ef-Id"],
            body=birth.data,
            key=None if key is None else unquote(key),
            error_type=values.error_type,
            error_message=values.error_message,
            traceback=values.traceback,
            attempts=values.attempts,
            first_failed_at=values.first_failed_at,
            last_failed_at=values.last_failed_at,
            published_at=float(headers["Ef-Pub"]),
            replayed=values.replayed,
            state="dead" if part == "dead" else "replayed",
        )
        return Found(record, headers["Ef-Kind"], headers["Ef-Type"], birth.subject)

    def _births(self, subscription: str | None) -> str:
        if subscription is None:
            return f"{self.names.dead_prefix()}.*.b"
        destination, group = split_subscription(subscription)
        return f"{self.names.dead_prefix(destination, group)}.*.b"

    async def page(
        self, subscription: str | None, limit: int, after: str | None
    ) -> list[DeadLetterRecord]:
        """Records in state ``dead``, by id, after ``after``."""
        births = self._births(subscription)
        sequence = int(after) + 1 if after else 1
        records: list[DeadLetterRecord] = []
        while len(records) < limit:
            birth = await self.wire.get(self.stream, {"seq": sequence, "next_by_subj": births})
            if birth is None:
                break
            found = await self._found(birth)
            if found is not None and found.record.state == "dead":
                records.append(found.record)
            sequence = birth.sequence + 1
        return records

    async def count_dead(self, ref: SubscriptionRef) -> int:
        prefix = self.names.dead_prefix(ref.destination, ref.group)
        return len(await self.wire.subject_counts(self.stream, f"{prefix}.*.dead"))

    async def purge(self, subscription: str | None) -> int:
        births = self._births(subscription)
        count = len(await self.wire.subject_counts(self.stream, births))
        await self.wire.purge(self.stream, births.removesuffix(".*.b") + ".>")
        return count

    async def each(self, record_ids: list[str], action: Callable[[Found], Awaitable[None]]) -> int:
        """Run ``action`` on each record in state ``dead``; how many."""
        done = 0
        for record_id in dict.fromkeys(record_ids):
            found = await self.find(record_id)
            if found is not None and found.record.state == "dead":
                await action(found)
                await self.mark_replayed(found)
                done += 1
        return done
