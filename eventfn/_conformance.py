"""The broker conformance kit: every contract of :mod:`eventfn.brokers.base`, as runnable checks.

Like trio's ``check_one_way_stream``, the kit is for whoever writes a broker, to run against their
own class::

    from eventfn.testing import check_broker

    async def test_my_broker_conforms(tmp_path):
        await check_broker(lambda: MyBroker(f"my://{tmp_path}/data"))

``make_broker`` returns a new broker that is not connected yet, each call; all of them share one
storage, so two instances act as two runners (or processes) on one broker. Every check names its
own destinations (with a random suffix), connects and closes its own brokers, and uses only the
public protocol of :class:`~eventfn.brokers.base.Broker`. Durability is not checked: ``memory://``
has none, so a durable broker tests restarts in its own suite.

:data:`CHECKS` maps each check's name to the check, for a suite that runs them one at a time
(``pytest.mark.parametrize("name", CHECKS)`` gives readable test ids).

Timing: checks wait for what they expect under generous deadlines and never fail because a broker
was slow. Lease expiry and delayed retries use ``lease`` seconds (0.3 by default); give a larger
one to a broker whose round trips take a good part of that.
"""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from collections import defaultdict
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.lowlevel
import msgspec
from anyio.abc import TaskGroup

from eventfn.brokers.base import (
    Broker,
    DeadLetterRecord,
    Delivery,
    Failure,
    Kind,
    Outcome,
    OutgoingMessage,
    Settlement,
    SubscriptionRef,
)
from eventfn.events import JSON, Envelope, encode_envelope, now_rfc3339
from eventfn.exceptions import ConfigurationError, UnknownDestination

__all__ = ["CHECKS", "DEFAULT_LEASE", "BrokerFactory", "Check", "check_broker"]

BrokerFactory = Callable[[], Broker]
"""Returns a new, not yet connected broker sharing storage with the others it returned."""

DEFAULT_LEASE = 0.3
"""Seconds of the short leases and retry delays that expiry checks wait out."""

_HOLD = 120.0
# A lease no check outlives: only the expiry checks ever see a lease run out.
_DEADLINE = 20.0
# How long a check waits for something it expects before it fails.
_POLL = 0.2
# ``wait`` of each fetch while a check collects deliveries, and the grace given to a broker that
# might misdeliver a little late (a replay, a fan-out) before a check says nothing came.
_SLACK = 0.05
# Clock granularity between the kit and a broker (a remote server, times stored in ms): a
# delivery this much before it was due is not counted as early.
_TYPE = "conformance.checked"
_NOTE = "grüße ✓"
# Non-ASCII text in every body, so that a broker that re-encodes bodies shows itself.


class Check(Protocol):
    """One conformance check: raises ``AssertionError`` saying what the broker got wrong."""

    __name__: str

    def __call__(
        self, make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
    ) -> Awaitable[None]: ...


CHECKS: dict[str, Check] = {}
"""Every check by name, in the order :func:`check_broker` runs them."""

_C = TypeVar("_C", bound=Check)


def _check(check: _C) -> _C:
    CHECKS[check.__name__.removeprefix("check_")] = check
    return check


async def check_broker(
    make_broker: BrokerFactory,
    *,
    lease: float = DEFAULT_LEASE,
    known_gaps: Mapping[str, str] = {},
) -> None:
    """Run every check against brokers from ``make_broker``; fail naming each failed check.

    >>> await check_broker(lambda: SQLiteBroker(f"sqlite:///{tmp_path}/kit.db"))

    ``known_gaps`` maps the names of checks the broker is known to fail to the reason. They still
    run and must still fail (like a strict xfail), so that a gap that was fixed is noticed.
    """
    unknown = sorted(set(known_gaps) - set(CHECKS))
    if unknown:
        raise ValueError(f"known_gaps names no check: {', '.join(unknown)}; see CHECKS")
    failures: list[str] = []
    first_error: BaseException | None = None
    for name, check in CHECKS.items():
        error = await _run(check, make_broker, lease)
        if name in known_gaps:
            if error is None:
                failures.append(f"{name}: passes now, remove it from known_gaps")
        elif error is not None:
            failures.append(f"{name}: {_describe(error)}")
            first_error = first_error or error
    if failures:
        summary = "\n  ".join(failures)
        raise AssertionError(
            f"{len(failures)} of {len(CHECKS)} broker checks failed:\n  {summary}"
        ) from first_error


async def _run(check: Check, make_broker: BrokerFactory, lease: float) -> Exception | None:
    # Each call has its own deadline; this one catches a broker call that hangs outright.
    limit = 3 * _DEADLINE + 50 * lease
    try:
        with _deadline(f"the whole check (over {limit:g} s)", limit):
            await check(make_broker, lease=lease)
    except Exception as exc:
        return exc
    return None


def _describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in error.exceptions)
    return (
        f"{type(error).__name__}: {error}" if not isinstance(error, AssertionError) else str(error)
    )


# -- helpers: names, messages, sessions ----------------------------------------------------------


def _unique(label: str) -> str:
    # Letters, digits and underscores only: a valid name on every engine (NATS forbids dots).
    return f"conformance_{label}_{uuid.uuid4().hex[:12]}"


def _ref(
    kind: Kind, destination: str, group: str = "g", types: tuple[str, ...] | None = None
) -> SubscriptionRef:
    if kind == "queue":
        return SubscriptionRef(destination=destination, kind="queue")
    return SubscriptionRef(destination=destination, kind=kind, group=group, types=types)


def _queue(label: str) -> SubscriptionRef:
    return _ref("queue", _unique(label))


def _groups(kind: Kind, label: str, *groups: str) -> list[SubscriptionRef]:
    destination = _unique(label)
    return [_ref(kind, destination, group) for group in groups]


def _message(
    broker: Broker,
    destination: str,
    tag: str,
    *,
    key: str | None = None,
    type: str = _TYPE,
    delay: float = 0.0,
) -> OutgoingMessage:
    # Ids are plain strings, not UUIDs: schedule ticks and user ids are strings too. The tag makes
    # a failure message readable.
    message_id = f"{tag}-{uuid.uuid4().hex[:12]}"
    data = msgspec.Raw(msgspec.json.encode({"tag": tag, "note": _NOTE}))
    published_at = broker.clock()
    envelope = Envelope(
        specversion="1.0",
        id=message_id,
        source="eventfn.conformance",
        type=type,
        datacontenttype=JSON,
        data=data,
        time=now_rfc3339(published_at),
        partitionkey=key,
    )
    return OutgoingMessage(
        destination=destination,
        id=message_id,
        type=type,
        body=encode_envelope(envelope),
        key=key,
        published_at=published_at,
        delay=delay,
    )


@contextlib.asynccontextmanager
async def _session(
    make_broker: BrokerFactory, refs: Sequence[SubscriptionRef], count: int = 1
) -> AsyncIterator[list[Broker]]:
    """``count`` connected instances (runners) on one storage, with ``refs`` declared."""
    async with contextlib.AsyncExitStack() as stack:
        brokers = [await stack.enter_async_context(make_broker()) for _ in range(count)]
        if refs:
            await brokers[0].declare(refs)
        yield brokers


@contextlib.contextmanager
def _deadline(what: str, seconds: float = _DEADLINE) -> Iterator[None]:
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds:g} s waiting for {what}") from None


@contextlib.contextmanager
def _expect_error(error: type[Exception], what: str) -> Iterator[None]:
    try:
        yield
    except error:
        return
    raise AssertionError(f"{what} did not raise {error.__name__}")


@contextlib.asynccontextmanager
async def _together() -> AsyncIterator[TaskGroup]:
    """A task group that fails with its task's own error, not an exception group around it."""
    try:
        async with anyio.create_task_group() as group:
            yield group
    except BaseExceptionGroup as errors:
        if len(errors.exceptions) == 1:
            raise errors.exceptions[0] from None
        raise


def _ids(deliveries: Iterable[Delivery | OutgoingMessage | DeadLetterRecord]) -> list[str]:
    return [d.message_id if isinstance(d, DeadLetterRecord) else d.id for d in deliveries]


def _close(a: float | None, b: float | None) -> bool:
    # Times survive a round trip through the broker to within a millisecond (PostgreSQL keeps
    # microseconds, Redis milliseconds).
    return a is not None and b is not None and abs(a - b) <= 0.001


def _assert_not_before(due: float, what: str) -> None:
    """Fail if it is now (``time.monotonic()``) before ``due``: something came early."""
    early = due - time.monotonic()
    assert early <= _SLACK, f"{what} {early:.3f} s before it was due"


# -- helpers: fetch and settle -------------------------------------------------------------------


async def _take(
    broker: Broker, ref: SubscriptionRef, count: int, *, what: str, lease: float = _HOLD
) -> list[Delivery]:
    """Fetch until ``count`` deliveries have come (never more), under a deadline."""
    got: list[Delivery] = []
    with _deadline(f"{what} ({len(got)} of {count} came)"):
        while len(got) < count:
            got += await broker.fetch(ref, count - len(got), lease=lease, wait=_POLL)
    assert len(got) == count, f"fetch returned more than its limit while waiting for {what}"
    return got


async def _take_one(
    broker: Broker, ref: SubscriptionRef, *, what: str, lease: float = _HOLD
) -> Delivery:
    [delivery] = await _take(broker, ref, 1, what=what, lease=lease)
    return delivery


async def _expect_none(
    broker: Broker, ref: SubscriptionRef, why: str, *, wait: float = 0.0
) -> None:
    got = await broker.fetch(ref, 100, lease=_HOLD, wait=wait)
    assert not got, f"{why}, yet {ref.name} delivered {_ids(got)}"


async def _settle(
    broker: Broker,
    outcome: Outcome,
    *deliveries: Delivery,
    delay: float = 0.0,
    failure: Failure | None = None,
    emitted: Sequence[OutgoingMessage] = (),
) -> None:
    await broker.settle(
        [
            Settlement(
                delivery=d, outcome=outcome, delay=delay, failure=failure, emitted=tuple(emitted)
            )
            for d in deliveries
        ]
    )


def _failure(broker: Broker, tag: str, *, ago: float = 0.0) -> Failure:
    return Failure(
        error_type="ValueError",
        message=f"{tag}: {_NOTE}",
        traceback=f"Traceback (most recent call last):\nValueError: {tag}",
        at=broker.clock() - ago,
    )


async def _kill(broker: Broker, ref: SubscriptionRef, message: OutgoingMessage) -> DeadLetterRecord:
    """Fetch ``message`` (already published) and dead-letter it; its record."""
    delivery = await _take_one(broker, ref, what=f"{message.id} to dead-letter")
    assert delivery.id == message.id, f"expected {message.id} to come next, got {delivery.id}"
    await _settle(broker, "dead", delivery, failure=_failure(broker, "kill"))
    return await _record_of(broker, ref, message.id)


async def _record_of(broker: Broker, ref: SubscriptionRef, message_id: str) -> DeadLetterRecord:
    records = [r for r in await _all_dead_letters(broker, ref.name) if r.message_id == message_id]
    assert len(records) == 1, (
        f"{ref.name} should hold one dead-letter record of {message_id}, not {len(records)}"
    )
    return records[0]


async def _all_dead_letters(broker: Broker, subscription: str | None) -> list[DeadLetterRecord]:
    """Every record in state ``dead``, page by page (100 pages at most, to end a broken loop)."""
    records: list[DeadLetterRecord] = []
    after: str | None = None
    for _ in range(100):
        page = await broker.dead_letters(subscription, limit=50, after=after)
        if not page:
            return records
        records += page
        after = page[-1].id
    raise AssertionError("dead_letters(after=...) kept returning pages: pagination never ends")


# -- declare, publish, deliver -------------------------------------------------------------------


@_check
async def check_declare_is_idempotent(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """Declaring again, from another instance and after messages exist, changes nothing."""
    refs = [_queue("declare"), *_groups("topic", "declare", "g")]
    async with _session(make_broker, refs, 2) as (first, second):
        await first.declare(refs)
        sent = [_message(first, ref.destination, "m") for ref in refs]
        await first.publish(sent)
        await second.declare(refs)  # a second runner starting up
        for ref, message in zip(refs, sent, strict=True):
            got = await _take(second, ref, 1, what=f"the message published to {ref.name}")
            assert _ids(got) == [message.id], f"{ref.name} delivered {_ids(got)}"
            await _settle(second, "ack", *got)
            await _expect_none(second, ref, "declaring twice must not copy a message twice")


@_check
async def check_declare_other_kind_is_refused(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A destination keeps its kind; declaring it as another raises ``ConfigurationError``."""
    pairs: list[tuple[Kind, Kind]] = [("queue", "topic"), ("topic", "stream"), ("stream", "queue")]
    async with _session(make_broker, [], 2) as (first, second):
        for kind, other in pairs:
            destination = _unique("kind")
            await first.declare([_ref(kind, destination)])
            for broker in (first, second):  # the kind is stored, not remembered per instance
                with _expect_error(ConfigurationError, f"declaring a {kind} as a {other}"):
                    await broker.declare([_ref(other, destination, "other")])


@_check
async def check_publish_to_undeclared_destination_fails(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """Nothing would ever receive it, so the publish fails with ``UnknownDestination``."""
    async with _session(make_broker, []) as (broker,):
        message = _message(broker, _unique("nowhere"), "lost")
        with _expect_error(UnknownDestination, "publishing to an undeclared destination"):
            await broker.publish([message])


@_check
async def check_delivery_carries_message(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A first delivery has the message's id, exact body bytes, key and publish time."""
    refs = [_queue("carry"), *_groups("topic", "carry", "g"), *_groups("stream", "carry", "g")]
    async with _session(make_broker, refs) as (broker,):
        for ref in refs:
            message = _message(broker, ref.destination, "m", key="key-ü")
            await broker.publish([message])
            got = await _take_one(broker, ref, what=f"the message published to {ref.name}")
            assert got.subscription == ref.name, (
                f"subscription {got.subscription!r} != {ref.name!r}"
            )
            assert (got.id, got.body, got.key) == (message.id, message.body, message.key), (
                f"{ref.name} changed the message: {got.id, got.body, got.key}"
            )
            assert got.attempt == 1, f"a first delivery has attempt 1, not {got.attempt}"
            assert _close(got.published_at, message.published_at), (
                f"published_at {got.published_at} != {message.published_at}"
            )
            assert got.first_failed_at is None, "a message that never failed has no failure time"
            await _settle(broker, "ack", got)


@_check
async def check_fetch_returns_oldest_first(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """Deliveries come in publish order, across batches and fetches."""
    ref = _queue("oldest")
    async with _session(make_broker, [ref]) as (broker,):
        sent = [_message(broker, ref.destination, f"m{n}") for n in range(8)]
        await broker.publish(sent[:5])
        await broker.publish(sent[5:])
        got: list[Delivery] = []
        for _ in range(3):  # three fetches of up to 3: the order must hold across them
            got += await _take(broker, ref, min(3, len(sent) - len(got)), what="the messages")
        assert _ids(got) == _ids(sent), f"fetched {_ids(got)}, published {_ids(sent)}"


@_check
async def check_fetch_respects_limit(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """``fetch`` returns at most ``limit`` deliveries, and at least one when some are ready."""
    ref = _queue("limit")
    async with _session(make_broker, [ref]) as (broker,):
        sent = [_message(broker, ref.destination, f"m{n}") for n in range(5)]
        await broker.publish(sent)
        got: list[Delivery] = []
        with _deadline("all five messages, two at a time"):
            while len(got) < len(sent):
                batch = await broker.fetch(ref, 2, lease=_HOLD, wait=_POLL)
                assert len(batch) <= 2, f"fetch(limit=2) returned {len(batch)} deliveries"
                got += batch
        assert sorted(_ids(got)) == sorted(_ids(sent)), f"fetched {_ids(got)}"


@_check
async def check_fetch_wait_returns_early_on_publish(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A waiting fetch returns as soon as another instance publishes, not at the end of wait."""
    ref = _queue("wake")
    async with _session(make_broker, [ref], 2) as (consumer, publisher):
        message = _message(publisher, ref.destination, "m")

        async def publish_soon() -> None:
            # Publish once the fetch is (most likely) waiting, so the wake-up path is what runs;
            # the check holds either way.
            await anyio.sleep(_POLL)
            await publisher.publish([message])

        with _deadline("fetch(wait=...) to return once a message was published"):
            async with _together() as group:
                group.start_soon(publish_soon)
                got = await consumer.fetch(ref, 10, lease=_HOLD, wait=10 * _DEADLINE)
        assert _ids(got) == [message.id], f"fetch returned {_ids(got)}"


@_check
async def check_fetch_wait_returns_empty_after_wait(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """With nothing to deliver, ``fetch`` waits ``wait`` seconds (it does not spin), then []."""
    ref = _queue("idle")
    async with _session(make_broker, [ref]) as (broker,):
        started = time.monotonic()
        with _deadline("fetch(wait=...) on an empty subscription to return"):
            got = await broker.fetch(ref, 10, lease=_HOLD, wait=lease)
        assert got == [], f"an empty subscription delivered {_ids(got)}"
        _assert_not_before(started + lease, "fetch(wait=...) on an empty subscription returned")


@_check
async def check_ack_publishes_emitted(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """An ack's ``emitted`` messages arrive at their destinations' subscriptions."""
    source, sink = _queue("emit_source"), _queue("emit_sink")
    groups = _groups("topic", "emit_topic", "a", "b")
    async with _session(make_broker, [source, sink, *groups]) as (broker,):
        await broker.publish([_message(broker, source.destination, "cause")])
        cause = await _take_one(broker, source, what="the message to handle")
        effects = [
            _message(broker, sink.destination, "e1"),
            _message(broker, groups[0].destination, "e2"),
        ]
        await _settle(broker, "ack", cause, emitted=effects)
        for ref, effect in [(sink, effects[0]), (groups[0], effects[1]), (groups[1], effects[1])]:
            got = await _take_one(broker, ref, what=f"the emitted message on {ref.name}")
            assert (got.id, got.body) == (effect.id, effect.body), f"{ref.name} got {got.id}"
        assert (await broker.stats(source)).pending == 0, "the acked message is still pending"


@_check
async def check_close_leaves_other_instances_working(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """``close`` is idempotent, and closing one instance does not disturb another."""
    ref = _queue("close")
    async with _session(make_broker, [ref]) as (survivor,):
        leaving = make_broker()
        await leaving.connect()
        await leaving.publish([_message(leaving, ref.destination, "before")])
        await leaving.close()
        await leaving.close()
        await survivor.publish([_message(survivor, ref.destination, "after")])
        got = await _take(survivor, ref, 2, what="both messages after another instance closed")
        await _settle(survivor, "ack", *got)


@_check
async def check_describe_hides_password(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """``describe()`` is safe for logs: a password in the URL never shows."""
    probe = make_broker()  # made, never connected: constructing a broker does no I/O
    secret = f"pw{uuid.uuid4().hex[:10]}"
    parts = urlsplit(probe.url)
    host = parts.netloc.rsplit("@", 1)[-1]
    url = urlunsplit((parts.scheme, f"kit:{secret}@{host}", parts.path, parts.query, ""))
    described = type(probe)(url, clock=probe.clock).describe()
    assert secret not in described, f"describe() shows the password: {described}"
    own = parts.password  # the factory's own URL may carry one too
    assert not own or own not in probe.describe(), "describe() shows the password"


# -- queue and topic -----------------------------------------------------------------------------


@_check
async def check_queue_each_message_once(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """Two consumers fetching at once share a queue's messages: each one to one consumer only."""
    ref = _queue("compete")
    async with _session(make_broker, [ref], 3) as (publisher, *consumers):
        sent = [_message(publisher, ref.destination, f"m{n}") for n in range(40)]
        await publisher.publish(sent)
        holders: dict[str, list[int]] = defaultdict(list)
        rng = random.Random()

        async def consume(number: int, broker: Broker) -> None:
            while len(holders) < len(sent):
                batch = await broker.fetch(ref, rng.randint(1, 4), lease=_HOLD, wait=_POLL)
                for delivery in batch:
                    holders[delivery.id].append(number)
                # Let the other consumer fetch while these are still leased.
                await anyio.lowlevel.checkpoint()
                await _settle(broker, "ack", *batch)

        with _deadline("two consumers to drain the queue"):
            async with _together() as group:
                for number, broker in enumerate(consumers):
                    group.start_soon(consume, number, broker)
        twice = {i: who for i, who in holders.items() if len(who) > 1}
        assert not twice, f"leased more than once (message: consumers): {twice}"
        assert set(holders) == set(_ids(sent)), "delivered messages that were never published"


_FANOUT: tuple[Kind, ...] = ("topic", "stream")
# A stream is a topic whose groups keep per-key order, so the topic contracts hold for both.


@_check
async def check_topic_every_group_gets_every_message(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """Each group of a topic (or stream) gets its own copy of every message."""
    for kind in _FANOUT:
        refs = _groups(kind, "fanout", "a", "b", "c")
        async with _session(make_broker, refs) as (broker,):
            sent = [_message(broker, refs[0].destination, f"m{n}") for n in range(5)]
            await broker.publish(sent)
            for ref in refs:
                got = await _take(broker, ref, len(sent), what=f"every message on {ref.name}")
                assert sorted(_ids(got)) == sorted(_ids(sent)), f"{ref.name} got {_ids(got)}"
                await _settle(broker, "ack", *got)
                await _expect_none(broker, ref, f"{ref.name} got each message already")


@_check
async def check_topic_groups_fail_independently(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A retry or dead letter in one group never redelivers to another group."""
    for kind in _FANOUT:
        failing, fine = _groups(kind, "independent", "failing", "fine")
        async with _session(make_broker, [failing, fine]) as (broker,):
            await broker.publish([_message(broker, fine.destination, "m")])
            await _settle(broker, "ack", await _take_one(broker, fine, what="the fine copy"))
            first = await _take_one(broker, failing, what="the failing copy")
            await _settle(broker, "retry", first, failure=_failure(broker, "first"))
            second = await _take_one(broker, failing, what="the retried copy")
            await _settle(broker, "dead", second, failure=_failure(broker, "second"))
            why = f"only {failing.name} retried and dead-lettered the message"
            await _expect_none(broker, fine, why, wait=_POLL)
            assert (await broker.stats(fine)).pending == 0, f"{why}; {fine.name} has it pending"
            assert await broker.dead_letters(fine.name) == [], f"{why}; {fine.name} has a record"
            await _record_of(broker, failing, second.id)


@_check
async def check_topic_late_group_starts_at_new_messages(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A group declared after a publish does not get that message, only later ones."""
    for kind in _FANOUT:
        early, late = _groups(kind, "late", "early", "late")
        async with _session(make_broker, [early], 2) as (broker, newcomer):
            before = _message(broker, early.destination, "before")
            await broker.publish([before])
            await newcomer.declare([late])
            after = _message(broker, early.destination, "after")
            await broker.publish([after])
            got = await _take_one(newcomer, late, what=f"the message published after {late.name}")
            assert got.id == after.id, f"{late.name} got {got.id}, published before it existed"
            await _settle(newcomer, "ack", got)
            await _expect_none(newcomer, late, f"{late.name} was declared after {before.id}")
            both = await _take(broker, early, 2, what=f"both messages on {early.name}")
            assert sorted(_ids(both)) == sorted([before.id, after.id]), f"got {_ids(both)}"


@_check
async def check_topic_types_filter(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A group with ``types`` gets only messages of those types; one without gets all."""
    wanted = "conformance.accepted"
    for kind in _FANOUT:
        destination = _unique("types")
        every, narrow = (
            _ref(kind, destination, "every"),
            _ref(kind, destination, "narrow", (wanted,)),
        )
        async with _session(make_broker, [every, narrow]) as (broker,):
            match = _message(broker, destination, "accepted", type=wanted)
            other = _message(broker, destination, "shipped", type="conformance.shipped")
            await broker.publish([other, match])
            got = await _take_one(broker, narrow, what=f"the {wanted} message on {narrow.name}")
            assert got.id == match.id, f"{narrow.name} (types={narrow.types}) got {got.id}"
            await _settle(broker, "ack", got)
            await _expect_none(broker, narrow, f"{narrow.name} takes {wanted} only", wait=_POLL)
            both = await _take(broker, every, 2, what=f"both messages on {every.name}")
            assert sorted(_ids(both)) == sorted([match.id, other.id]), f"got {_ids(both)}"
