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
one to a broker whose round trips take a good part of that. The ``dedupe`` checks use an hour's
window, and one window of ``max(1 s, 3 * lease)`` that they wait out for real (by the kit's clock:
the broker's ``clock``, or its server's, must keep time).
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

# A lease no check outlives: only the expiry checks ever see a lease run out.
_HOLD = 120.0
# How long a check waits for something it expects before it fails.
_DEADLINE = 20.0
# ``wait`` of each fetch while a check collects deliveries; also the grace given to a broker that
# might misdeliver a little late (a replay, a fan-out) before a check says that nothing came.
_POLL = 0.2
# Clock granularity between the kit and a broker (a remote server, times kept in ms): a delivery
# less than this before it was due is not counted as early.
_SLACK = 0.05
_TYPE = "conformance.checked"
# Non-ASCII text in every body, so that a broker that re-encodes bodies shows itself.
_NOTE = "grüße ✓"


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
    if isinstance(error, AssertionError):
        return str(error)
    return f"{type(error).__name__}: {error}"  # a broker that crashed rather than misbehaved


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
    id: str | None = None,
    dedupe: float = 0.0,
) -> OutgoingMessage:
    # Ids are plain strings, not UUIDs: schedule ticks and user ids are strings too. The tag makes
    # a failure message readable. A copy of a message (``id`` given) differs in its body only.
    message_id = id or f"{tag}-{uuid.uuid4().hex[:12]}"
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
        dedupe=dedupe,
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
def _deadline(what: str, seconds: float | None = None) -> Iterator[None]:
    seconds = _DEADLINE if seconds is None else seconds
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


def _assert_delivery(got: Delivery, expected: str, attempt: int, what: str) -> None:
    assert (got.id, got.attempt) == (expected, attempt), (
        f"{what}: expected {expected} at attempt {attempt}, got {got.id} at attempt {got.attempt}"
    )


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
    with anyio.move_on_after(_DEADLINE):
        while len(got) < count:
            got += await broker.fetch(ref, count - len(got), lease=lease, wait=_POLL)
    assert len(got) >= count, (
        f"timed out after {_DEADLINE:g} s waiting for {what}: {len(got)} of {count} came"
    )
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
    """Every record in state ``dead``, page by page."""
    records: list[DeadLetterRecord] = []
    after: str | None = None
    while page := await broker.dead_letters(subscription, limit=50, after=after):
        # A page that repeats a record would make this loop forever.
        repeated = {r.id for r in records} & {r.id for r in page}
        assert not repeated, f"dead_letters(after={after!r}) repeats records {sorted(repeated)}"
        records += page
        after = page[-1].id
    return records


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
    """``fetch`` never returns more than ``limit`` deliveries."""
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
    """With nothing to deliver, ``fetch`` waits ``wait`` seconds, then returns [].

    Returning at once would turn every idle runner's fetch loop into a hot loop.
    """
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
        async with leaving:
            await leaving.publish([_message(leaving, ref.destination, "before")])
        await leaving.close()  # a second close is harmless
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
        lost = set(_ids(sent)) - set(holders)
        assert not lost, f"never delivered: {sorted(lost)}"


# A stream is a topic whose groups keep per-key order, so the topic contracts hold for both.
_FANOUT: tuple[Kind, ...] = ("topic", "stream")


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
        every = _ref(kind, destination, "every")
        narrow = _ref(kind, destination, "narrow", (wanted,))
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


# -- stream: one record per key at a time, in publish order --------------------------------------


class _KeyOrder:
    """What a correct stream lets consumers see: per key, only the next unacked record.

    Consumers report each fetch, and each settle just before they make it (from then on the
    broker may hand out the key's next record), so a correct broker can never trip it.
    """

    def __init__(self, sent: Sequence[OutgoingMessage]) -> None:
        self.key_of = {m.id: m.key for m in sent}
        self.expected: dict[str | None, list[str]] = defaultdict(list)
        for message in sent:
            self.expected[message.key].append(message.id)
        self.acked: dict[str | None, list[str]] = defaultdict(list)
        self.leased: dict[str, str] = {}  # key -> id of its record now leased
        self.violations: list[str] = []

    @property
    def finished(self) -> bool:
        done = sum(len(ids) for ids in self.acked.values())
        return bool(self.violations) or done >= len(self.key_of)

    def fetched(self, delivery: Delivery) -> None:
        key = self.key_of.get(delivery.id)
        if key is None:
            return  # keyless records have no order to keep
        if key in self.leased:
            self.violations.append(f"{delivery.id} leased while {self.leased[key]} still was")
        position = len(self.acked[key])
        due = self.expected[key][position] if position < len(self.expected[key]) else None
        if delivery.id != due:
            self.violations.append(f"{delivery.id} delivered while {due} was the next of {key}")
        self.leased[key] = delivery.id

    def settling(self, delivery: Delivery, outcome: Outcome) -> None:
        key = self.key_of.get(delivery.id)
        if key is not None:
            self.leased.pop(key, None)
        if outcome == "ack":
            self.acked[key].append(delivery.id)

    def problems(self) -> list[str]:
        problems = list(self.violations)
        for key, ids in self.expected.items():
            acked = self.acked[key]
            as_expected = acked == ids if key is not None else sorted(acked) == sorted(ids)
            if not as_expected:
                problems.append(f"key {key}: acked {acked}, published {ids}")
        return problems


async def _consume_in_random_order(
    broker: Broker, ref: SubscriptionRef, book: _KeyOrder, rng: random.Random
) -> None:
    """Hold up to 6 deliveries like a runner's lanes; settle a random few, in random order."""
    hand: list[Delivery] = []
    while not book.finished:
        room = 6 - len(hand)
        if room:
            batch = await broker.fetch(ref, room, lease=_HOLD, wait=0 if hand else _POLL)
            for delivery in batch:
                book.fetched(delivery)
            hand += batch
        rng.shuffle(hand)
        count = rng.randint(1, min(3, len(hand))) if hand else 0
        settle_now, hand = hand[:count], hand[count:]
        for delivery in settle_now:
            # A first attempt sometimes fails: its retry must still come before the key's next.
            outcome: Outcome = "retry" if delivery.attempt == 1 and rng.random() < 0.2 else "ack"
            book.settling(delivery, outcome)
            await _settle(broker, outcome, delivery)
            await anyio.lowlevel.checkpoint()  # let the other consumer in between settles


@_check
async def check_stream_key_order_with_two_consumers(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """Two consumers settling in random order (with retries) ack each key's records in order."""
    ref = _ref("stream", _unique("order"))
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    async with _session(make_broker, [ref], 3) as (publisher, *consumers):
        keys = [f"key{k}" for k in range(6)] + [None]  # keyless records mixed in, unordered
        sent = [
            _message(publisher, ref.destination, f"m{n}", key=rng.choice(keys)) for n in range(60)
        ]
        for start in range(0, len(sent), 20):  # in a few batches, as publishers do
            await publisher.publish(sent[start : start + 20])
        book = _KeyOrder(sent)
        with _deadline("two consumers to work through the stream"):
            async with _together() as group:
                for broker in consumers:
                    group.start_soon(
                        _consume_in_random_order, broker, ref, book, random.Random(rng.random())
                    )
        problems = book.problems()
        assert not problems, f"per-key order broken (seed {seed}): " + "; ".join(problems[:5])


@_check
async def check_stream_leased_head_blocks_only_its_key(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """While a key's head is leased its next record waits; other keys and groups go on."""
    ref, other_group = _groups("stream", "blocks", "g", "other")
    async with _session(make_broker, [ref, other_group], 2) as (holder, other):
        a1, a2, b1, b2 = (
            _message(holder, ref.destination, tag, key=tag[0]) for tag in ("a1", "a2", "b1", "b2")
        )
        await holder.publish([a1, a2, b1, b2])
        head = await _take_one(holder, ref, what="the oldest record")
        assert head.id == a1.id, f"the oldest record {a1.id} must come first, not {head.id}"
        got = await _take_one(other, ref, what="key b's head while key a's head is leased")
        assert got.id == b1.id, f"expected {b1.id}, got {got.id} while {a1.id} is leased"
        await _expect_none(other, ref, "each key's head is leased, so nothing may come")
        # The other group keeps its own order: its copy of a1 is not held by this group's lease.
        copy = await _take_one(other, other_group, what=f"{a1.id} on {other_group.name}")
        assert copy.id == a1.id, f"{other_group.name} got {copy.id} before {a1.id}"
        await _settle(holder, "ack", head)
        nxt = await _take_one(other, ref, what=f"{a2.id} once {a1.id} was acked")
        assert nxt.id == a2.id, f"expected {a2.id} after {a1.id}, got {nxt.id}"


@_check
async def check_stream_delayed_retry_blocks_its_key(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A head waiting for a delayed retry holds back its key until due, then comes first."""
    ref = _ref("stream", _unique("delayed_head"))
    delay = 2 * lease
    async with _session(make_broker, [ref]) as (broker,):
        a1, a2, b1 = (_message(broker, ref.destination, t, key=t[0]) for t in ("a1", "a2", "b1"))
        await broker.publish([a1, a2, b1])
        head = await _take_one(broker, ref, what="the oldest record")
        assert head.id == a1.id, f"the oldest record {a1.id} must come first, not {head.id}"
        retried_at = time.monotonic()
        await _settle(broker, "retry", head, delay=delay, failure=_failure(broker, "a1"))
        seen: list[Delivery] = []
        with _deadline(f"{a1.id} to come back once its retry was due", _DEADLINE + delay):
            while a1.id not in _ids(seen):
                seen += await broker.fetch(ref, 10, lease=_HOLD, wait=_POLL)
        _assert_not_before(retried_at + delay, f"the delayed retry of {a1.id} came")
        assert a2.id not in _ids(seen), f"{a2.id} came while {a1.id} waited for its retry"
        assert b1.id in _ids(seen), f"key b was held back by key a's delayed retry: {_ids(seen)}"
        await _settle(broker, "ack", *[d for d in seen if d.id == a1.id])
        nxt = await _take_one(broker, ref, what=f"{a2.id} once {a1.id} was acked")
        _assert_delivery(nxt, a2.id, 1, f"once {a1.id} was acked")


@_check
async def check_stream_keyless_records_are_not_blocked(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """Records without a key have no order: several are leased at once, beside a keyed head."""
    ref = _ref("stream", _unique("keyless"))
    async with _session(make_broker, [ref]) as (broker,):
        a1, a2 = (_message(broker, ref.destination, t, key="a") for t in ("a1", "a2"))
        loose = [_message(broker, ref.destination, f"x{n}") for n in range(3)]
        await broker.publish([a1, a2, *loose])
        got = await _take(broker, ref, 4, what="key a's head and the three keyless records")
        assert sorted(_ids(got)) == sorted(_ids([a1, *loose])), f"leased {_ids(got)}"
        await _expect_none(broker, ref, f"{a2.id} waits for {a1.id}; nothing else is left")


@_check
async def check_stream_head_comes_back_first(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A released head, or one whose lease ran out, comes back before its key's next record."""
    ref = _ref("stream", _unique("head_back"))
    async with _session(make_broker, [ref], 2) as (crashed, survivor):
        a1, a2 = (_message(crashed, ref.destination, t, key="a") for t in ("a1", "a2"))
        await crashed.publish([a1, a2])
        head = await _take_one(crashed, ref, what=f"{a1.id}")
        await _settle(crashed, "release", head)  # a runner shutting down gives it back
        taken_at = time.monotonic()
        again = await _take_one(survivor, ref, what=f"{a1.id} after its release", lease=lease)
        _assert_delivery(again, a1.id, 1, "after a release")
        # The survivor now "crashes" too: once its short lease ends, a1 comes back, not a2.
        last = await _take_one(crashed, ref, what=f"{a1.id} after its lease ran out")
        _assert_delivery(last, a1.id, 2, "after the lease ran out")
        _assert_not_before(taken_at + lease, f"{a1.id} came back")


# -- leases --------------------------------------------------------------------------------------


@_check
async def check_lease_expiry_redelivers(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A delivery never settled (its runner died) comes back after the lease, at attempt 2."""
    ref = _queue("expiry")
    async with _session(make_broker, [ref], 2) as (crashed, survivor):
        message = _message(crashed, ref.destination, "m")
        await crashed.publish([message])
        leased_at = time.monotonic()
        first = await _take_one(crashed, ref, what="the message", lease=lease)
        again = await _take_one(survivor, ref, what="the message after its lease ran out")
        _assert_not_before(leased_at + lease, "a leased delivery came back")
        _assert_delivery(again, first.id, 2, "after the lease ran out")
        await _settle(survivor, "ack", again)


@_check
async def check_extend_keeps_delivery_hidden(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """An extended lease hides the delivery past its first lease; its receipt still settles."""
    ref = _queue("extend")
    async with _session(make_broker, [ref], 2) as (worker, other):
        await worker.publish([_message(worker, ref.destination, "m")])
        delivery, first_lease = await _fetch_and_extend(worker, ref, lease)
        # The first lease started before the fetch returned, so one more of it takes us past
        # its end: only the extension can keep the delivery hidden now.
        await anyio.sleep(first_lease)
        await _expect_none(other, ref, "the extended lease still holds")
        await _settle(worker, "ack", delivery)
        assert (await other.stats(ref)).pending == 0, "an ack after extend was ignored"


async def _fetch_and_extend(
    broker: Broker, ref: SubscriptionRef, lease: float
) -> tuple[Delivery, float]:
    """Fetch with a short lease and extend it while it surely holds; the first lease's length.

    A loaded machine can stall past a short lease between the two calls, so the lease grows
    until the extend is seen to finish in time: a slow run must not fail the check.
    """
    for first_lease in (lease, 4 * lease, 16 * lease):
        started = time.monotonic()
        delivery = await _take_one(broker, ref, what="the message", lease=first_lease)
        await broker.extend([delivery], _HOLD)
        if time.monotonic() < started + first_lease:
            return delivery, first_lease
        await _settle(broker, "release", delivery)
    raise AssertionError(f"fetch and extend took over {16 * lease:g} s; pass a longer lease")


@_check
async def check_stale_receipt_is_ignored(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """After a lease is taken over, settles with the old receipt change nothing (fencing)."""
    ref, sink = _queue("fence"), _queue("fence_sink")
    async with _session(make_broker, [ref, sink], 2) as (slow, fast):
        await slow.publish([_message(slow, ref.destination, "m")])
        stale = await _take_one(slow, ref, what="the message", lease=lease)
        current = await _take_one(fast, ref, what="the message after its lease ran out")
        # The slow runner wakes up and settles what it no longer holds, every way it could.
        effect = _message(slow, sink.destination, "effect")
        await _settle(slow, "ack", stale, emitted=[effect])
        await _settle(slow, "retry", stale, delay=_HOLD, failure=_failure(slow, "stale"))
        await _settle(slow, "dead", stale, failure=_failure(slow, "stale"))
        stats = await fast.stats(ref)
        assert (stats.in_flight, stats.ready, stats.delayed, stats.dead) == (1, 0, 0, 0), (
            f"a stale settle changed the delivery now held by another runner: {stats}"
        )
        assert (await fast.stats(sink)).pending == 0, "a stale ack published its emitted message"
        await _settle(fast, "ack", current)
        await _settle(fast, "ack", current)  # settling twice is harmless
        assert (await fast.stats(ref)).pending == 0, "the current receipt's ack was ignored"


@_check
async def check_stale_receipt_after_release_is_ignored(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A receipt given back by ``release`` no longer settles the message once re-fetched."""
    ref = _queue("release_fence")
    async with _session(make_broker, [ref], 2) as (leaving, taking):
        await leaving.publish([_message(leaving, ref.destination, "m")])
        released = await _take_one(leaving, ref, what="the message")
        await _settle(leaving, "release", released)  # shutdown: given back unstarted
        current = await _take_one(taking, ref, what="the released message")
        await _settle(leaving, "ack", released)  # a late settle from the runner that left
        stats = await taking.stats(ref)
        assert stats.in_flight == 1, f"a released receipt settled the new delivery: {stats}"
        await _settle(taking, "ack", current)


# -- retries and release -------------------------------------------------------------------------


@_check
async def check_delayed_retry_waits_until_due(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A retry with a delay is not fetched before due, then comes with its attempt counted."""
    ref = _queue("retry")
    delay = 2 * lease
    async with _session(make_broker, [ref]) as (broker,):
        await broker.publish([_message(broker, ref.destination, "m")])
        first = await _take_one(broker, ref, what="the message")
        failure = _failure(broker, "first", ago=1.0)
        retried_at = time.monotonic()
        await _settle(broker, "retry", first, delay=delay, failure=failure)
        early = await broker.fetch(ref, 10, lease=_HOLD)
        if early:  # only a broker slower than the delay may return it here
            _assert_not_before(retried_at + delay, "a delayed retry was fetched")
        with _deadline("the retry once due", _DEADLINE + delay):
            again = early[0] if early else await _take_one(broker, ref, what="the retry")
        _assert_not_before(retried_at + delay, "a delayed retry was fetched")
        _assert_delivery(again, first.id, 2, "the retry")
        assert _close(again.first_failed_at, failure.at), (
            f"first_failed_at {again.first_failed_at} is not the failure's time {failure.at}"
        )


@_check
async def check_delayed_publish_waits_until_due(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A message published with ``delay`` is not fetched before due, then at attempt 1."""
    ref = _queue("later")
    delay = 2 * lease
    async with _session(make_broker, [ref]) as (broker,):
        published_at = time.monotonic()
        await broker.publish([_message(broker, ref.destination, "m", delay=delay)])
        got = await _take_one(broker, ref, what="the delayed message once due")
        _assert_not_before(published_at + delay, "a delayed message was fetched")
        assert got.attempt == 1, f"a first delivery has attempt 1, not {got.attempt}"


@_check
async def check_release_returns_without_attempt(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A released delivery is fetchable at once (not after its lease), attempt not counted."""
    ref = _queue("release")
    async with _session(make_broker, [ref], 2) as (leaving, taking):
        await leaving.publish([_message(leaving, ref.destination, "m")])
        released = await _take_one(leaving, ref, what="the message")
        await _settle(leaving, "release", released)
        # The lease was _HOLD seconds: only the release can make it come back in time.
        again = await _take_one(taking, ref, what="the released message")
        _assert_delivery(again, released.id, 1, "after a release")


# -- dead letters --------------------------------------------------------------------------------


@_check
async def check_dead_letter_record(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """``dead`` stores why, how often and since when it failed, with the original message."""
    ref = _queue("dead")
    async with _session(make_broker, [ref]) as (broker,):
        message = _message(broker, ref.destination, "m", key="k")
        await broker.publish([message])
        first_failure, last_failure = _failure(broker, "one", ago=2.0), _failure(broker, "two")
        first = await _take_one(broker, ref, what="the message")
        await _settle(broker, "retry", first, failure=first_failure)
        second = await _take_one(broker, ref, what="the retry")
        await _settle(broker, "dead", second, failure=last_failure)
        stats = await broker.stats(ref)
        assert (stats.pending, stats.dead) == (0, 1), f"after a dead letter: {stats}"
        await _expect_none(broker, ref, "the message was dead-lettered")
        record = await _record_of(broker, ref, message.id)
        kept = (record.subscription, record.body, record.key, record.attempts, record.state)
        assert kept == (ref.name, message.body, message.key, 2, "dead"), f"record: {record}"
        why = (record.error_type, record.error_message, record.traceback)
        assert why == (last_failure.error_type, last_failure.message, last_failure.traceback), (
            f"the record does not keep the last failure: {why}"
        )
        assert _close(record.first_failed_at, first_failure.at), f"first failure: {record}"
        assert _close(record.last_failed_at, last_failure.at), f"last failure: {record}"
        assert _close(record.published_at, message.published_at), f"published_at: {record}"
        assert record.replayed == 0, f"a record never replayed has replayed={record.replayed}"
        assert await broker.dead_letter(record.id) == record, "dead_letter(id) differs"


@_check
async def check_dead_letters_paginate(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """``dead_letters`` pages oldest first with ``limit`` and ``after``, per subscription or all."""
    ref = _queue("pages")
    async with _session(make_broker, [ref]) as (broker,):
        # Twelve, so that numbered record ids pass from 9 to 10: ids compared as text misorder.
        sent = [_message(broker, ref.destination, f"m{n}") for n in range(12)]
        await broker.publish(sent)
        for message in sent:  # dead-lettered one by one, in publish order
            await _kill(broker, ref, message)
        pages: list[list[DeadLetterRecord]] = []
        after: str | None = None
        while not pages or pages[-1]:
            assert len(pages) <= len(sent), "dead_letters(after=...) never reaches the end"
            pages.append(await broker.dead_letters(ref.name, limit=5, after=after))
            after = pages[-1][-1].id if pages[-1] else after
        sizes = [len(page) for page in pages]
        assert sizes == [5, 5, 2, 0], f"pages of limit=5 over 12 records had sizes {sizes}"
        assert [r.message_id for p in pages for r in p] == _ids(sent), "not oldest first"
        everywhere = [
            r for r in await _all_dead_letters(broker, None) if r.subscription == ref.name
        ]
        assert _ids(everywhere) == _ids(sent), "dead_letters() of all subscriptions misses some"


@_check
async def check_replay_goes_to_own_subscription_only(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """Replay re-delivers to the failing group only, same id, attempt 1; the record says so."""
    failing, fine = _groups("topic", "replay", "failing", "fine")
    async with _session(make_broker, [failing, fine]) as (broker,):
        message = _message(broker, failing.destination, "m")
        await broker.publish([message])
        await _settle(broker, "ack", await _take_one(broker, fine, what="the fine copy"))
        record = await _kill(broker, failing, message)
        assert await broker.replay([record.id]) == 1, "replay did not count the record"
        again = await _take_one(broker, failing, what="the replayed message")
        assert (again.id, again.body, again.attempt) == (message.id, message.body, 1), (
            f"replayed as {again.id} at attempt {again.attempt}"
        )
        await _expect_none(broker, fine, "replay is for the failing group only", wait=_POLL)
        replayed = await broker.dead_letter(record.id)
        assert replayed is not None, "replay deleted the dead-letter record"
        assert (replayed.state, replayed.replayed) == ("replayed", 1), f"after replay: {replayed}"
        assert await broker.dead_letters(failing.name) == [], "a replayed record is still listed"
        assert (await broker.stats(failing)).dead == 0, "a replayed record still counts as dead"
        assert await broker.replay([record.id]) == 0, "a replayed record was replayed again"
        await _settle(broker, "ack", again)


@_check
async def check_replayed_failure_reuses_record(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """A replayed message that fails again puts the same record back to ``dead``."""
    ref = _queue("refail")
    async with _session(make_broker, [ref]) as (broker,):
        message = _message(broker, ref.destination, "m")
        await broker.publish([message])
        record = await _kill(broker, ref, message)
        await broker.replay([record.id])
        again = await _take_one(broker, ref, what="the replayed message")
        failure = _failure(broker, "again")
        await _settle(broker, "dead", again, failure=failure)
        back = await _record_of(broker, ref, message.id)
        assert back.id == record.id, f"a second record {back.id} was made beside {record.id}"
        assert (back.state, back.replayed, back.attempts) == ("dead", 1, 1), f"record: {back}"
        assert back.error_message == failure.message, "the record keeps the first failure"


@_check
async def check_purge_deletes_records(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """``purge`` deletes a subscription's records in either state and says how many."""
    purged, kept = _queue("purged"), _queue("kept")
    async with _session(make_broker, [purged, kept]) as (broker,):
        sent = [_message(broker, purged.destination, f"m{n}") for n in range(2)]
        other = _message(broker, kept.destination, "other")
        await broker.publish([*sent, other])
        records = [await _kill(broker, purged, message) for message in sent]
        await _kill(broker, kept, other)
        await broker.replay([records[0].id])  # one record in each state
        assert await broker.purge(purged.name) == 2, "purge did not count both records"
        for record in records:
            assert await broker.dead_letter(record.id) is None, f"{record.id} survived purge"
        assert await broker.replay([records[1].id]) == 0, "a purged record was replayed"
        assert (await broker.stats(purged)).dead == 0, "purged records still count as dead"
        assert len(await broker.dead_letters(kept.name)) == 1, "purge touched another subscription"
        assert await broker.purge(kept.name) == 1, "purge did not count the other record"


# -- stats ---------------------------------------------------------------------------------------


@_check
async def check_stats_counts(make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE) -> None:
    """``stats`` counts ready, delayed (retry or publish delay), in-flight and dead messages."""
    ref = _queue("stats")
    async with _session(make_broker, [ref]) as (broker,):
        await broker.publish([_message(broker, ref.destination, f"m{n}") for n in range(5)])
        await broker.publish([_message(broker, ref.destination, "later", delay=_HOLD)])
        retried, dead, _still_held = await _take(broker, ref, 3, what="three messages")
        await _settle(broker, "retry", retried, delay=_HOLD, failure=_failure(broker, "retry"))
        await _settle(broker, "dead", dead, failure=_failure(broker, "dead"))
        stats = await broker.stats(ref)
        counts = (stats.ready, stats.delayed, stats.in_flight, stats.dead, stats.pending)
        assert counts == (2, 2, 1, 1, 5), (
            f"expected ready=2 delayed=2 in_flight=1 dead=1 pending=5, got {stats}"
        )
        assert stats.subscription == ref.name, f"stats of {stats.subscription!r}"


# -- de-duplication (``OutgoingMessage.dedupe``) --------------------------------------------------

# A window no check outlives, and longer than any broker's built-in duplicate window (NATS keeps
# message ids two minutes): a copy published within it is always dropped.
_WINDOW = 3600.0


def _label(item: Delivery | OutgoingMessage) -> str:
    """``id(tag)``: copies of one id differ in the tag of their body."""
    try:
        tag = msgspec.json.decode(item.body)["data"]["tag"]
    except (msgspec.DecodeError, KeyError, TypeError):
        tag = "?"
    return f"{item.id}({tag})"


async def _expect_exactly(
    broker: Broker, ref: SubscriptionRef, expected: Sequence[OutgoingMessage], why: str
) -> None:
    """``ref`` delivers each of ``expected`` (by id and body) once, and then nothing more."""
    got = await _take(broker, ref, len(expected), what=f"{len(expected)} messages on {ref.name}")
    labels = sorted(map(_label, got))
    assert sorted((d.id, d.body) for d in got) == sorted((m.id, m.body) for m in expected), (
        f"{why}: {ref.name} delivered {labels}, expected {sorted(map(_label, expected))}"
    )
    await _settle(broker, "ack", *got)
    await _expect_none(broker, ref, why, wait=_POLL)


@_check
async def check_dedupe_drops_copies_within_window(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """Copies of an id published with ``dedupe`` within its window, by any instance, are
    dropped: the first is delivered once, to a queue's consumer and to each group of a topic."""
    for refs in ([_queue("dedupe")], _groups("topic", "dedupe", "a", "b")):
        destination = refs[0].destination
        async with _session(make_broker, refs, 2) as (first, second):
            tick = _message(first, destination, "first", dedupe=_WINDOW)
            await first.publish([tick])
            # Other runners publish the same tick: the next moment, and again a little later.
            await second.publish(
                [_message(second, destination, "second", id=tick.id, dedupe=_WINDOW)]
            )
            await anyio.sleep(_POLL)
            late = _message(first, destination, "third", id=tick.id, dedupe=_WINDOW)
            await first.publish([late])
            other = _message(second, destination, "other", dedupe=_WINDOW)
            await second.publish([other])  # another id: stored, and it ends the test's wait
            for ref in refs:
                why = f"copies of {tick.id} published within its window must be dropped"
                await _expect_exactly(second, ref, [tick, other], why)


@_check
async def check_dedupe_accepts_id_again_after_window(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """Once ``dedupe`` seconds have passed since its id was stored, a message is stored again,
    and that copy starts a window of its own."""
    async with _session(make_broker, [], 2) as (first, second):
        # A short window, waited out for real. The copy must come well within it, which a
        # loaded machine may not manage: then the window grows, on a new queue.
        for window in (max(1.0, 3 * lease), max(4.0, 12 * lease), max(16.0, 48 * lease)):
            ref = _queue("dedupe_after")
            await first.declare([ref])
            tick = _message(first, ref.destination, "first", dedupe=window)
            started = time.monotonic()
            await first.publish([tick])
            stored = time.monotonic()
            await second.publish(
                [_message(second, ref.destination, "copy", id=tick.id, dedupe=window)]
            )
            if time.monotonic() - started < window / 2:
                break
        else:
            raise AssertionError(f"publishing took over {window / 2:g} s; pass a longer lease")
        await anyio.sleep(stored + window + _POLL - time.monotonic())
        again = _message(second, ref.destination, "again", id=tick.id, dedupe=window)
        started = time.monotonic()
        await second.publish([again])
        if time.monotonic() - started < window / 2:  # else a copy might come after the window
            copy = _message(first, ref.destination, "copy2", id=tick.id, dedupe=window)
            await first.publish([copy])
        why = f"{tick.id} must be stored again {window:g} s after it was, and only once"
        await _expect_exactly(first, ref, [tick, again], why)


@_check
async def check_dedupe_same_id_twice_in_one_batch(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """One batch with two messages of one id (both with ``dedupe``) stores one of them."""
    for refs in ([_queue("dedupe_batch")], _groups("topic", "dedupe_batch", "a", "b")):
        destination = refs[0].destination
        async with _session(make_broker, refs) as (broker,):
            tick = _message(broker, destination, "one", dedupe=_WINDOW)
            copy = _message(broker, destination, "two", id=tick.id, dedupe=_WINDOW)
            other = _message(broker, destination, "other", dedupe=_WINDOW)
            await broker.publish([tick, copy, other])
            await broker.publish(
                [_message(broker, destination, "later", id=tick.id, dedupe=_WINDOW)]
            )
            for ref in refs:
                got = await _take(broker, ref, 2, what=f"two messages on {ref.name}")
                labels = sorted(map(_label, got))
                assert sorted(_ids(got)) == sorted([tick.id, other.id]), (
                    f"{ref.name} delivered {labels} of a batch with {tick.id} twice"
                )
                [kept] = [d for d in got if d.id == tick.id]
                assert kept.body in (tick.body, copy.body), f"{ref.name} changed {_label(kept)}"
                await _settle(broker, "ack", *got)
                why = f"{tick.id} came twice in one batch and once after: it is stored once"
                await _expect_none(broker, ref, why, wait=_POLL)


@_check
async def check_dedupe_destinations_are_independent(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """The window of an id is per destination: the same id is stored once on each."""
    left, right, third = _queue("dedupe_left"), _queue("dedupe_right"), _queue("dedupe_third")
    async with _session(make_broker, [left, right, third], 2) as (first, second):
        on_left = _message(first, left.destination, "left", dedupe=_WINDOW)
        on_right = _message(first, right.destination, "right", id=on_left.id, dedupe=_WINDOW)
        await first.publish([on_left, on_right])  # in one batch
        on_third = _message(second, third.destination, "third", id=on_left.id, dedupe=_WINDOW)
        await second.publish([on_third])  # and on its own, from another instance
        again = _message(second, right.destination, "again", id=on_left.id, dedupe=_WINDOW)
        await second.publish([again])  # a copy within the window of its own destination
        for ref, message in ((left, on_left), (right, on_right), (third, on_third)):
            why = f"{on_left.id} goes once to each destination it was published to"
            await _expect_exactly(first, ref, [message], why)


@_check
async def check_dedupe_zero_never_drops(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """Messages without ``dedupe`` are all stored, whatever their ids, and a window neither
    starts with them nor applies to them."""
    ref = _queue("no_dedupe")
    destination = ref.destination
    async with _session(make_broker, [ref], 2) as (first, second):
        plain = _message(first, destination, "plain")
        twin = _message(first, destination, "twin", id=plain.id)
        await first.publish([plain, twin])  # one id twice in a batch
        again = _message(second, destination, "again", id=plain.id)
        await second.publish([again])  # and again, from another instance
        tick = _message(first, destination, "tick", id=plain.id, dedupe=_WINDOW)
        await first.publish([tick])  # stored: no message was stored with dedupe
        dropped = _message(second, destination, "dropped", id=plain.id, dedupe=_WINDOW)
        await second.publish([dropped])  # within the window of the tick
        last = _message(second, destination, "last", id=plain.id)
        await second.publish([last])  # without dedupe: never dropped
        why = "messages without dedupe are never dropped, and do not start a window"
        await _expect_exactly(first, ref, [plain, twin, again, tick, last], why)


@_check
async def check_dedupe_applies_to_emitted(
    make_broker: BrokerFactory, *, lease: float = DEFAULT_LEASE
) -> None:
    """An ack's emitted message with ``dedupe`` is de-duplicated like a published one."""
    source, sink = _queue("dedupe_cause"), _queue("dedupe_sink")
    async with _session(make_broker, [source, sink], 2) as (first, second):
        await first.publish([_message(first, source.destination, f"cause{n}") for n in range(2)])
        one, two = await _take(first, source, 2, what="the two messages to handle")
        tick = _message(first, sink.destination, "emitted", dedupe=_WINDOW)
        await _settle(first, "ack", one, emitted=[tick])
        copy = _message(first, sink.destination, "copy", id=tick.id, dedupe=_WINDOW)
        await _settle(first, "ack", two, emitted=[copy])
        published = _message(second, sink.destination, "published", id=tick.id, dedupe=_WINDOW)
        await second.publish([published])
        assert (await first.stats(source)).pending == 0, "an ack that emitted a copy was ignored"
        why = f"{tick.id} emitted twice and published once within its window is stored once"
        await _expect_exactly(second, sink, [tick], why)
