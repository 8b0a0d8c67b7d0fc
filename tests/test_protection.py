"""Downstream protection and failure discipline: rate limits, timeouts, the circuit breaker,
skipping a failing stream key."""

from __future__ import annotations

import bisect
import time
from collections import Counter

import anyio
import msgspec
import pytest

import eventfn
from eventfn.brokers import Broker
from eventfn.middleware.ratelimit import TokenBucket
from eventfn.options import parse_rate
from eventfn.runtime.breaker import Breaker, CircuitBreaker


class Job(msgspec.Struct, frozen=True):
    n: int


class Click(msgspec.Struct, frozen=True):
    user: str
    seq: int


async def burst(app: eventfn.App, broker: Broker, **options: object) -> eventfn.Summary:
    runner = eventfn.Runner(app, broker, burst=True, poll=0.05, **options)  # type: ignore[arg-type]
    with anyio.fail_after(90):
        return await runner.run()


def most_in_any_window(starts: list[float], window: float) -> int:
    starts = sorted(starts)
    return max(bisect.bisect_left(starts, s + window) - i for i, s in enumerate(starts))


@pytest.mark.slow
async def test_rate_limit_never_exceeded_in_any_one_second_window(broker: Broker) -> None:
    app = eventfn.App("rated")
    starts: list[float] = []

    @app.on_queue("writes", rate="100/s")
    async def write(job: Job) -> None:
        starts.append(time.monotonic())

    await app.connect(broker)
    await app.publish_many(app.message("writes", Job(n)) for n in range(2000))
    summary = await burst(app, broker, concurrency=64)
    assert summary.handled == 2000
    assert most_in_any_window(starts, 1.0) <= 100
    # and the limiter does not throttle far below the rate: 2,000 starts take about 20 s
    assert starts[-1] - starts[0] < 25


async def test_token_bucket_spacing_with_a_fake_clock() -> None:
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(per_second=10, burst=3, clock=lambda: now[0])
    original = anyio.sleep
    anyio.sleep = fake_sleep  # type: ignore[assignment]
    try:
        for _ in range(5):
            await bucket.acquire()
    finally:
        anyio.sleep = original
    assert slept == pytest.approx([0.1] * 2)  # a fresh bucket starts full: 3 at once
    now[0] += 10  # idle for long: at most `burst` tokens accrue
    slept.clear()
    anyio.sleep = fake_sleep  # type: ignore[assignment]
    try:
        for _ in range(4):
            await bucket.acquire()
    finally:
        anyio.sleep = original
    assert slept == pytest.approx([0.1])


@pytest.mark.parametrize("per_second", [100.0, 2000.0, 5000.0])
async def test_token_bucket_keeps_its_rate_when_every_wait_ends_late(per_second: float) -> None:
    """An event loop wakes timers late (about a millisecond with epoll, more when busy): the
    schedule must not lose that per grant, nor let the catching up exceed the rate."""
    now = [0.0]

    async def late_sleep(seconds: float) -> None:
        now[0] += seconds + 0.0012

    bucket = TokenBucket(per_second=per_second, clock=lambda: now[0])
    grants: list[float] = []
    original = anyio.sleep
    anyio.sleep = late_sleep  # type: ignore[assignment]
    try:
        for _ in range(int(per_second * 3)):
            await bucket.acquire()
            grants.append(now[0])
            now[0] += 0.00001  # the handler's own start
    finally:
        anyio.sleep = original
    achieved = (len(grants) - 1) / (grants[-1] - grants[0])
    assert achieved == pytest.approx(per_second, rel=0.02)
    assert most_in_any_window(grants, 1.0) <= per_second


async def test_token_bucket_per_minute_never_exceeds_its_count_in_a_minute() -> None:
    now = [0.0]

    async def late_sleep(seconds: float) -> None:
        now[0] += seconds + 0.005

    rate = parse_rate("30/m", "test")
    bucket = TokenBucket(rate.per_second, rate.burst, clock=lambda: now[0], window=rate.period)
    grants: list[float] = []
    original = anyio.sleep
    anyio.sleep = late_sleep  # type: ignore[assignment]
    try:
        for _ in range(120):
            await bucket.acquire()
            grants.append(now[0])
    finally:
        anyio.sleep = original
    assert most_in_any_window(grants, 60.0) <= 30
    assert grants[-1] - grants[0] == pytest.approx(119 * 2.0, rel=0.01)


async def test_timeout_counts_as_a_failure(broker: Broker) -> None:
    app = eventfn.App("slow", retry=eventfn.Retry(attempts=2, backoff=0.01))

    @app.on_queue("jobs", timeout=0.05)
    async def hang(job: Job) -> None:
        await anyio.sleep(10)

    await app.connect(broker)
    await app.publish("jobs", Job(1))
    summary = await burst(app, broker)
    (record,) = await broker.dead_letters("jobs")
    assert record.error_type == "TimeoutError" and record.attempts == 2
    assert summary.retried == 1


def test_breaker_states_with_a_fake_clock() -> None:
    now = [0.0]
    breaker = Breaker(
        CircuitBreaker(threshold=3, cooldown=1.0, max_cooldown=4.0), "s", lambda: now[0]
    )
    for _ in range(2):
        breaker.failure()
    assert breaker.state == "closed" and breaker.room(10) == 10
    breaker.failure()
    assert breaker.state == "open" and breaker.blocks and breaker.room(10) == 0
    assert breaker.wait_time() == pytest.approx(1.0)
    now[0] = 1.0
    assert breaker.room(10) == 1 and breaker.state == "half-open"
    assert breaker.room(10) == 0  # one probe at a time
    breaker.failure()
    assert breaker.state == "open" and breaker.wait_time() == pytest.approx(2.0)
    now[0] = 3.0
    assert breaker.room(10) == 1
    breaker.failure()
    now[0] = 7.0
    assert breaker.room(10) == 1
    breaker.failure()
    assert breaker.wait_time() == pytest.approx(4.0)  # capped
    now[0] = 11.0
    assert breaker.room(5) == 1
    breaker.success()
    assert breaker.state == "closed" and breaker.room(5) == 5 and breaker.cooldown == 1.0


@pytest.mark.slow
async def test_breaker_keeps_a_dependency_outage_from_dead_lettering_the_backlog(
    broker: Broker,
) -> None:
    app = eventfn.App("storm", retry=eventfn.Retry(attempts=4, backoff=0.05, cap=0.2))
    down_until = time.monotonic() + 5.0
    calls = Counter[int]()

    @app.on_queue(
        "jobs", breaker=eventfn.CircuitBreaker(threshold=5, cooldown=0.5, max_cooldown=2.0)
    )
    async def call_dependency(job: Job) -> None:
        calls[job.n] += 1
        if time.monotonic() < down_until:
            raise ConnectionError("dependency is down")

    await app.connect(broker)
    await app.publish_many(app.message("jobs", Job(n)) for n in range(300))
    summary = await burst(app, broker, concurrency=16)
    assert summary.dead_lettered == 0
    assert summary.handled == 300
    assert await broker.dead_letters("jobs") == []
    failed_attempts = sum(calls.values()) - 300
    assert failed_attempts < 60  # not 300 x 4: the backlog waited instead of burning attempts


async def test_breaker_can_be_turned_off(broker: Broker) -> None:
    app = eventfn.App("nobreaker", retry=eventfn.Retry(attempts=2, backoff=0.01, cap=0.01))

    @app.on_queue("jobs", breaker=False)
    async def fail(job: Job) -> None:
        raise ConnectionError("down")

    await app.connect(broker)
    await app.publish_many(app.message("jobs", Job(n)) for n in range(30))
    summary = await burst(app, broker, concurrency=8)
    assert summary.dead_lettered == 30  # without the guard every message burns its attempts


async def test_skip_key_on_error_dead_letters_and_moves_the_key_on(broker: Broker) -> None:
    app = eventfn.App("skip", retry=eventfn.Retry(attempts=5, backoff=10.0))
    handled: list[int] = []

    @app.on_stream("clicks", key="user", group="g", skip_key_on_error=True)
    async def sessionize(click: Click) -> None:
        if click.seq == 1:
            raise ValueError("cannot sessionize this click")
        handled.append(click.seq)

    await app.connect(broker)
    await app.publish_many(app.message("clicks", Click("ada", n)) for n in range(4))
    summary = await burst(app, broker)
    assert handled == [0, 2, 3]  # the key went on without waiting 10 s for a retry
    (record,) = await broker.dead_letters("clicks/g")
    assert record.error_type == "ValueError" and record.attempts == 1
    assert summary.retried == 0


async def test_unknown_and_bad_options_fail_at_registration() -> None:
    app = eventfn.App("opts")
    with pytest.raises(
        eventfn.RegistrationError, match=r"unknown option retires=3; did you mean retry=\?"
    ):

        @app.on_queue("jobs", retires=3)  # type: ignore[call-arg]
        async def handler(job: Job) -> None: ...

    with pytest.raises(
        eventfn.RegistrationError, match="rate='fast' is not a rate; write it like '200/s'"
    ):

        @app.on_queue("jobs2", rate="fast")
        async def handler2(job: Job) -> None: ...

    with pytest.raises(eventfn.RegistrationError, match="unknown option"):
        eventfn.App("bad", concurency=3)  # type: ignore[call-arg]
