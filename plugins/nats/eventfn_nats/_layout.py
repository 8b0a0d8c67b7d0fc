"""Streams, consumers and destination metadata; where each outgoing message is published.

Per-key order of a stream kind rests on one rule kept by JetStream itself: a key's ready subject
``{ns}.{dest}.{group}.r.{key}`` holds at most one record, the key's head. Records are published
to the key's waiting subject and *promoted* one at a time: the first waiting record is copied to
the ready subject with ``Nats-Expected-Last-Subject-Sequence: 0`` (so only while the ready
subject is empty, atomically) and then deleted from the waiting subject. The group's consumer
sees ready subjects only, so it can never lease a record behind an unsettled head, whether that
head is leased, waiting for a delayed retry (a Nak with delay keeps it there) or not yet fetched.
A head's settle (ack or dead letter, both confirmed by the server) removes it and promotes the
next; a publish promotes too. A promotion lost to a crash between those steps is redone by the
next one, or by a fetch that found nothing to do (the sweep). Copies carry ``Nats-Msg-Id``
``{id}~{group}~p{waiting sequence}``, so that two promoters racing copy a record once.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from eventfn.brokers.base import Kind, OutgoingMessage, SubscriptionRef
from eventfn.exceptions import ConfigurationError, UnknownDestination
from eventfn_nats._deadletters import Found
from eventfn_nats._names import Names, hashed, split_subscription, token
from eventfn_nats._wire import WRONG_LAST_SEQUENCE, ApiError, Outgoing, Wire

DUPLICATE_WINDOW = 120.0
"""Seconds JetStream remembers a ``Nats-Msg-Id`` to drop a second publish of it."""

_NS = 1_000_000_000
_RETENTION = {"queue": "workqueue", "topic": "interest", "stream": "workqueue"}
STREAM_EXISTS = 10058
CONSUMER_NOT_FOUND = 10014
LATER = "~later"
KEYLESS = "~"


def key_token(key: str | None) -> str:
    return KEYLESS if key is None else "k" + hashed(key)


class Layout:
    """Creates what a subscription needs, and routes messages to the right subjects."""

    def __init__(self, wire: Wire, names: Names, lease: float, max_deliver: int) -> None:
        self.wire = wire
        self.names = names
        self.lease = lease
        self.max_deliver = max_deliver

    # -- streams and consumers -------------------------------------------------------------

    async def create_stream(self, name: str, subjects: str, retention: str, **extra: Any) -> None:
        config = {
            "name": name,
            "subjects": [subjects],
            "retention": retention,
            "storage": "file",
            "discard": "old",
            "num_replicas": 1,
            "allow_direct": True,
            "duplicate_window": int(DUPLICATE_WINDOW * _NS),
            **extra,
        }
        try:
            await self.wire.api(f"STREAM.CREATE.{name}", config)
        except ApiError as exc:
            if exc.code != STREAM_EXISTS:  # made before with other settings: keep it as it is
                raise

    async def create_system_streams(self) -> None:
        names = self.names
        await self.create_stream(
            names.sys_stream, f"{names.ns}.~sys.>", "limits", max_msgs_per_subject=1
        )
        await self.create_stream(names.dlq_stream, f"{names.ns}.~dlq.>", "limits")

    async def declare(self, ref: SubscriptionRef) -> None:
        known = await self.kind(ref.destination)
        if known is not None and known != ref.kind:
            raise _other_kind(ref, known)
        stream = self.names.stream(ref.destination)
        await self.create_stream(stream, self.names.subjects(ref.destination), _RETENTION[ref.kind])
        deliver = "new" if ref.kind == "topic" else "all"  # a work queue must deliver all
        await self._consumer(stream, token(ref.group), self.names.filter_subject(ref), deliver)
        await self._consumer(stream, LATER, self.names.later_subject(ref.destination), "all")
        await self._remember(ref)

    async def _consumer(self, stream: str, name: str, subject: str, deliver: str) -> None:
        config = {
            "durable_name": name,
            "ack_policy": "explicit",
            "ack_wait": int(self.lease * _NS),
            "max_deliver": self.max_deliver,
            "filter_subject": subject,
            "deliver_policy": deliver,
            "max_ack_pending": -1,  # bounded by what runners fetch, not by the server
            "replay_policy": "instant",
        }
        request = {"stream_name": stream, "config": config}
        try:
            await self.wire.api(f"CONSUMER.DURABLE.CREATE.{stream}.{name}", request)
        except ApiError as exc:
            if "already in use" not in str(exc) and "already exists" not in str(exc):
                raise  # anything but "made before with other settings": keep the first ones

    async def consumer_exists(self, stream: str, name: str) -> bool:
        try:
            await self.wire.api(f"CONSUMER.INFO.{stream}.{name}")
        except ApiError as exc:
            if exc.code == CONSUMER_NOT_FOUND or "not found" in str(exc):
                return False
            raise
        return True

    # -- destination metadata (kind, and a stream's groups with their types) -------------------

    async def meta(self, destination: str) -> tuple[dict[str, Any], int] | None:
        found = await self.wire.get(
            self.names.sys_stream, {"last_by_subj": self.names.meta_subject(destination)}
        )
        return None if found is None else (json.loads(found.data), found.sequence)

    async def kind(self, destination: str) -> Kind | None:
        found = await self.meta(destination)
        return None if found is None else found[0]["kind"]

    async def groups(self, destination: str) -> dict[str, list[str] | None]:
        found = await self.meta(destination)
        if found is None:
            raise unknown(destination, self.wire.describe())
        return found[0].get("groups", {})  # type: ignore[no-any-return]

    async def _remember(self, ref: SubscriptionRef) -> None:
        """Record the destination's kind and the group, with a compare-and-set on the subject."""
        subject = self.names.meta_subject(ref.destination)
        types = None if ref.types is None else list(ref.types)
        for _ in range(50):
            found = await self.meta(ref.destination)
            meta, sequence = found if found is not None else ({"kind": ref.kind, "groups": {}}, 0)
            if meta["kind"] != ref.kind:
                raise _other_kind(ref, meta["kind"])
            if ref.group in meta["groups"]:
                return
            meta["groups"][ref.group] = types
            headers = {"Nats-Expected-Last-Subject-Sequence": str(sequence)}
            try:
                await self.wire.publish([(subject, json.dumps(meta).encode(), headers)], "declare")
                return
            except ApiError as exc:
                if exc.code != WRONG_LAST_SEQUENCE:
                    raise
        raise ConfigurationError(f"declaring {ref.name}: its metadata kept changing under it")

    # -- routing -----------------------------------------------------------------------------

    def route(
        self,
        message: OutgoingMessage,
        kind: Kind,
        groups: dict[str, list[str] | None],
        published_at: float,
        msg_id: str,
    ) -> tuple[list[Outgoing], list[tuple[SubscriptionRef, str]]]:
        """The publishes of one message, and the (group, key) pairs to promote after.

        ``msg_id`` is its ``Nats-Msg-Id``: unique to this publish (sent again only after a
        reconnection), or derived from the message id for one with ``dedupe`` (``_dedupe``).
        """
        headers = {"Nats-Msg-Id": msg_id, "Ef-Id": message.id, "Ef-Pub": repr(published_at)}
        if message.key is not None:
            headers["Ef-Key"] = quote(message.key, safe="")
        destination = message.destination
        if message.delay > 0:
            headers["Ef-Due"] = repr(published_at + message.delay)
            headers["Ef-Type"] = message.type
            return [(self.names.later_subject(destination), message.body, headers)], []
        if kind == "queue":
            return [(self.names.queue_subject(destination), message.body, headers)], []
        if kind == "topic":
            subject = self.names.topic_subject(destination, token(message.type))
            return [(subject, message.body, headers)], []
        return self._fan_out(message, groups, headers)

    def _fan_out(
        self,
        message: OutgoingMessage,
        groups: dict[str, list[str] | None],
        headers: dict[str, str],
    ) -> tuple[list[Outgoing], list[tuple[SubscriptionRef, str]]]:
        """A stream's copy per group (of a matching type), each behind its key's head."""
        outgoing: list[Outgoing] = []
        promote: list[tuple[SubscriptionRef, str]] = []
        key = key_token(message.key)
        for group, types in groups.items():
            if types is not None and message.type not in types:
                continue
            ref = SubscriptionRef(destination=message.destination, kind="stream", group=group)
            copy = {**headers, "Nats-Msg-Id": f"{headers['Nats-Msg-Id']}~{token(group)}"}
            if key == KEYLESS:
                outgoing.append((self.names.ready_subject(ref, key), message.body, copy))
            else:
                outgoing.append((self.names.waiting_subject(ref, key), message.body, copy))
                promote.append((ref, key))
        return outgoing, promote

    async def promote(self, ref: SubscriptionRef, key: str) -> None:
        """Make the key's first waiting record its head, if it has none (see the module doc)."""
        stream = self.names.stream(ref.destination)
        waiting = self.names.waiting_subject(ref, key)
        for _ in range(1000):
            first = await self.wire.get(stream, {"seq": 1, "next_by_subj": waiting})
            if first is None:
                return
            headers = {k: v for k, v in first.headers.items() if k.startswith("Ef-")}
            headers["Nats-Msg-Id"] = f"{headers['Ef-Id']}~{token(ref.group)}~p{first.sequence}"
            headers["Nats-Expected-Last-Subject-Sequence"] = "0"
            try:
                [ack] = await self.wire.publish(
                    [(self.names.ready_subject(ref, key), first.data, headers)], "promoting"
                )
            except ApiError as exc:
                if exc.code == WRONG_LAST_SEQUENCE:
                    return  # the key has a head: its settle promotes the next
                raise
            await self.wire.delete(stream, first.sequence)
            if not ack.duplicate:
                return
            # a duplicate: another promoter copied this one already; on to the next record

    async def replay(self, found: Found) -> None:
        """Publish a dead letter again for its own group only: a topic replay goes to the
        group's route ``.{type}.{group}`` (its consumer takes it, the others skip it); a stream
        record queues behind its key like a new one."""
        record = found.record
        destination, group = split_subscription(record.subscription)
        ref = SubscriptionRef(destination=destination, kind=found.kind, group=group)  # type: ignore[arg-type]
        headers = {
            "Ef-Id": record.message_id,
            "Ef-Pub": repr(record.published_at),
            "Nats-Msg-Id": f"{record.message_id}~r{record.id}~{record.replayed + 1}",
        }
        if record.key is not None:
            headers["Ef-Key"] = quote(record.key, safe="")
        key = key_token(record.key)
        if ref.kind == "queue":
            subject = self.names.queue_subject(destination)
        elif ref.kind == "topic":
            subject = self.names.topic_subject(destination, found.type_token, group)
        elif key == KEYLESS:
            subject = self.names.ready_subject(ref, key)
        else:
            subject = self.names.waiting_subject(ref, key)
        await self.wire.publish([(subject, record.body, headers)], "replaying")
        if ref.kind == "stream" and key != KEYLESS:
            await self.promote(ref, key)


def _other_kind(ref: SubscriptionRef, known: str) -> ConfigurationError:
    return ConfigurationError(
        f"destination {ref.destination!r} is a {known} on this broker, not a {ref.kind}; "
        "use another name or the same kind everywhere"
    )


def unknown(destination: str, where: str) -> UnknownDestination:
    return UnknownDestination(
        f"nothing has declared destination {destination!r} on {where}; start a runner of an "
        "app that subscribes to it (or call app.declare()) first"
    )
