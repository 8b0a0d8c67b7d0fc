"""The runner's contracts per trigger kind, on every embedded broker."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

import anyio
import msgspec

import eventfn
from eventfn.brokers import Broker, OutgoingMessage, from_url


class Job(msgspec.Struct, frozen=True):
    n: int


class Done(msgspec.Struct, frozen=True):
    n: int


class Click(msgspec.Struct, frozen=True):
    user: str
    seq: int


def fast_app(name: str = "test", **options: object) -> eventfn.App:
    return eventfn.App(name, retry=eventfn.Retry(attempts=3, backoff=0.01, cap=0.05), **options)  # type: ignore[arg-type]


async def burst(app: eventfn.App, broker: Broker, **options: object) -> eventfn.Summary:
    runner = eventfn.Runner(app, broker, burst=True, poll=0.05, **options)  # type: ignore[arg-type]
    with anyio.fail_after(60):
        return await runner.run()


async def test_queue_each_message_handled_once_across_two_runners(broker_url: str) -> None:
    app = fast_app()
    handled: list[int] = []

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        handled.append(job.n)
        await anyio.sleep(random.random() / 1000)

    async with from_url(broker_url) as one, from_url(broker_url) as two:
        await app.connect(one)
        await app.publish_many(app.message("jobs", Job(n)) for n in range(600))
        async with anyio.create_task_group() as tg:
            tg.start_soon(burst, app, one)
            tg.start_soon(burst, app, two)
        await app.close()
    assert sorted(handled) == list(range(600))


async def test_topic_every_group_gets_every_message_and_failures_stay_in_their_group(
    broker: Broker,
) -> None:
    app = fast_app()
    seen: dict[str, Counter[int]] = defaultdict(Counter)

    @app.on_topic("facts", group="steady")
    async def steady(job: Job) -> None:
        seen["steady"][job.n] += 1

    @app.on_topic("facts", group="flaky")
    async def flaky(job: Job, ctx: eventfn.Context) -> None:
        seen["flaky"][job.n] += 1
        if job.n % 5 == 0 and ctx.attempt < 3:
            raise ConnectionError("downstream busy")

    await app.connect(broker)
    await app.publish_many(app.message("facts", Job(n)) for n in range(100))
    summary = await burst(app, broker)
    assert seen["steady"] == Counter(range(100))  # never re-run for the flaky group's retries
    assert all(seen["flaky"][n] == (3 if n % 5 == 0 else 1) for n in range(100))
    by_name = {s.subscription: s for s in summary.subscriptions}
    assert by_name["facts/flaky"].retried == 40
    assert by_name["facts/steady"].retried == 0


async def test_topic_group_added_later_starts_at_new_messages(broker: Broker) -> None:
    first = fast_app()
    early: list[int] = []

    @first.on_topic("news", group="early")
    async def on_early(job: Job) -> None:
        early.append(job.n)

    await first.connect(broker)
    await first.publish("news", Job(1))
    late_app = fast_app()
    late: list[int] = []

    @late_app.on_topic("news", group="early")
    async def on_early_again(job: Job) -> None:
        early.append(job.n)

    @late_app.on_topic("news", group="late")
    async def on_late(job: Job) -> None:
        late.append(job.n)

    await late_app.declare(broker)
    await first.publish("news", Job(2))
    await burst(late_app, broker)
    assert sorted(early) == [1, 2]
    assert late == [2]


async def test_stream_keeps_per_key_order_under_concurrency(broker: Broker) -> None:
    app = fast_app()
    order: dict[str, list[int]] = defaultdict(list)
    running: set[str] = set()
    overlaps: list[str] = []

    @app.on_stream("clicks", key="user", group="sessions")
    async def sessionize(click: Click, ctx: eventfn.Context) -> None:
        if click.user in running:
            overlaps.append(click.user)
        running.add(click.user)
        try:
            await anyio.sleep(random.random() / 500)
            if click.seq % 17 == 3 and ctx.attempt == 1:
                raise ConnectionError("retry me, my key must wait")
            order[click.user].append(click.seq)
        finally:
            running.discard(click.user)

    await app.connect(broker)
    users = [f"u{i}" for i in range(12)]
    clicks = [Click(user=random.choice(users), seq=n) for n in range(400)]
    await app.publish_many(app.message("clicks", c) for c in clicks)
    await burst(app, broker, concurrency=32)
    expected: dict[str, list[int]] = defaultdict(list)
    for click in clicks:
        expected[click.user].append(click.seq)
    assert order == expected
    assert overlaps == []


async def test_poison_messages_are_dead_lettered_with_the_reason_and_never_retried(
    broker: Broker,
) -> None:
    app = fast_app()
    calls: list[int] = []

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        calls.append(job.n)

    await app.connect(broker)
    bad_json = OutgoingMessage(destination="jobs", id="bad-json", type="t", body=b"{not json")
    await broker.publish([bad_json])
    await app.publish("jobs", {"n": "not a number"}, id="bad-schema")
    await app.publish("jobs", Job(7))
    summary = await burst(app, broker)
    assert calls == [7]
    records = {r.message_id: r for r in await broker.dead_letters("jobs")}
    assert set(records) == {"bad-json", "bad-schema"}
    assert "malformed envelope" in records["bad-json"].error_message
    assert "Expected `int`, got `str`" in records["bad-schema"].error_message
    assert all(r.attempts == 1 for r in records.values())
    assert summary.retried == 0 and summary.dead_lettered == 2 and summary.handled == 1


async def test_exhausted_retries_dead_letter_with_traceback(broker: Broker) -> None:
    app = fast_app()

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        raise RuntimeError(f"job {job.n} always fails")

    await app.connect(broker)
    await app.publish("jobs", Job(1))
    summary = await burst(app, broker)
    (record,) = await broker.dead_letters("jobs")
    assert record.attempts == 3
    assert record.error_type == "RuntimeError"
    assert "job 1 always fails" in record.traceback
    assert record.first_failed_at <= record.last_failed_at
    assert summary.retried == 2 and summary.dead_lettered == 1


async def test_control_flow_signals(broker: Broker) -> None:
    app = fast_app()
    attempts: Counter[int] = Counter()

    @app.on_queue("jobs")
    async def work(job: Job, ctx: eventfn.Context) -> None:
        attempts[job.n] += 1
        if job.n == 1:
            raise eventfn.Drop("not for us")
        if job.n == 2:
            raise eventfn.DeadLetter("customer does not exist")
        if job.n == 3 and ctx.attempt == 1:
            raise eventfn.Retry(after=0.01)
        if job.n == 4:
            raise ValueError("never retried") from None

    app.subscriptions[0].retry = eventfn.Retry(attempts=3, backoff=0.01, never=(ValueError,))
    await app.connect(broker)
    await app.publish_many(app.message("jobs", Job(n)) for n in (1, 2, 3, 4))
    summary = await burst(app, broker)
    assert attempts == Counter({1: 1, 2: 1, 3: 2, 4: 1})
    dead = {r.error_message for r in await broker.dead_letters("jobs")}
    assert dead == {"customer does not exist", "never retried"}
    (stats,) = summary.subscriptions
    assert (stats.handled, stats.dropped, stats.dead_lettered, stats.retried) == (1, 1, 2, 1)


async def test_bounded_concurrency_and_prefetch(broker: Broker) -> None:
    app = fast_app()
    running = 0
    peak = 0

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.002)
        running -= 1

    await app.connect(broker)
    await app.publish_many(app.message("jobs", Job(n)) for n in range(300))
    runner = eventfn.Runner(app, broker, burst=True, poll=0.05, concurrency=8, prefetch=4)
    with anyio.fail_after(60):
        summary = await runner.run()
    assert summary.handled == 300
    assert peak == 8  # reached, never exceeded
    assert runner.peak_held <= 8 + 4


async def test_per_handler_concurrency_limit(broker: Broker) -> None:
    app = fast_app()
    running = 0
    peak = 0

    @app.on_queue("jobs", concurrency=3)
    async def work(job: Job) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.002)
        running -= 1

    await app.connect(broker)
    await app.publish_many(app.message("jobs", Job(n)) for n in range(60))
    await burst(app, broker, concurrency=32)
    assert peak == 3


async def test_emitted_events_are_published_only_when_the_handler_succeeds(
    broker: Broker,
) -> None:
    app = fast_app()
    received: list[int] = []

    @app.on_queue("jobs")
    async def work(job: Job, ctx: eventfn.Context) -> None:
        await ctx.emit(Done(job.n))
        await app.publish("audit", {"n": job.n})  # inside a handler: held back too
        if job.n == 2:
            raise eventfn.DeadLetter("fails after emitting")

    @app.on_event(Done, group="after")
    async def after(done: Done) -> None:
        received.append(done.n)

    @app.on_queue("audit")
    async def audit(data: dict[str, int]) -> None:
        received.append(100 + data["n"])

    await app.connect(broker)
    await app.publish_many(app.message("jobs", Job(n)) for n in (1, 2, 3))
    await burst(app, broker)
    assert sorted(received) == [1, 3, 101, 103]


async def test_leases_are_extended_while_a_handler_runs(broker_url: str) -> None:
    app = fast_app()
    attempts: list[tuple[int, int]] = []

    @app.on_queue("slow")
    async def slow(job: Job, ctx: eventfn.Context) -> None:
        attempts.append((job.n, ctx.attempt))
        await anyio.sleep(1.0)  # three times the lease

    async with from_url(broker_url) as one, from_url(broker_url) as two:
        await app.connect(one)
        await app.publish_many(app.message("slow", Job(n)) for n in range(4))
        async with anyio.create_task_group() as tg:
            for broker in (one, two):
                tg.start_soon(partial(burst, app, broker, lease=0.3, concurrency=4))
        await app.close()
    assert sorted(attempts) == [(n, 1) for n in range(4)]  # never taken over, never redelivered


async def test_emitting_to_an_undeclared_destination_dead_letters_the_message(
    broker: Broker,
) -> None:
    app = fast_app()
    handled: list[int] = []

    @app.on_queue("jobs")
    async def work(job: Job, ctx: eventfn.Context) -> None:
        if job.n == 2:
            await ctx.publish("nobody-declared-this", {"n": job.n})
        handled.append(job.n)

    await app.connect(broker)
    await app.publish_many(app.message("jobs", Job(n)) for n in (1, 2, 3))
    await burst(app, broker)
    assert sorted(handled) == [1, 2, 3]
    (record,) = await broker.dead_letters("jobs")
    assert "nobody-declared-this" in record.error_message
    assert record.error_message.startswith("an emitted event was refused")
    assert (await broker.stats(app.subscriptions[0].ref)).pending == 0


async def test_attempts_survive_a_runner_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'restart.db'}"
    app = eventfn.App("restart", retry=eventfn.Retry(attempts=3, backoff=0.2, jitter="none"))
    attempts: list[int] = []
    failed_once = anyio.Event()

    @app.on_queue("jobs")
    async def flaky(job: Job, ctx: eventfn.Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            failed_once.set()
            raise ConnectionError("first try fails")

    async with from_url(url) as first:
        await app.connect(first)
        await app.publish("jobs", Job(1))
        runner = eventfn.Runner(app, first, poll=0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)
            with anyio.fail_after(30):
                await failed_once.wait()
            runner.stop()
        await app.close()
    async with from_url(url) as second:  # a new process, in effect: nothing kept in memory
        await app.connect(second)
        await burst(app, second)
        await app.close()
    assert attempts == [1, 2]
