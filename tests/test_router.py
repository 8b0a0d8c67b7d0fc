"""Routers (handlers in several modules) and the app's lifespan (resources opened once)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import anyio
import msgspec
import pytest

import eventfn
from eventfn.brokers.memory import MemoryBroker


class InvoicePaid(msgspec.Struct, frozen=True):
    invoice: str


class Job(msgspec.Struct, frozen=True):
    n: int


class Resources(msgspec.Struct):
    pool: list[str]
    opened: int = 0


def fresh() -> MemoryBroker:
    return MemoryBroker(f"memory://router-{uuid.uuid4().hex}")


async def burst(app: eventfn.App, broker: MemoryBroker) -> eventfn.Summary:
    with anyio.fail_after(30):
        return await eventfn.Runner(app, broker, burst=True, poll=0.05).run()


billing = eventfn.Router(retry=eventfn.Retry(attempts=7))
seen: list[str] = []


@billing.on_event(InvoicePaid, group="ledger")
async def book(event: InvoicePaid) -> None:
    seen.append(f"ledger:{event.invoice}")


@billing.on_queue("reminders", timeout=5)
async def remind(job: Job) -> None:
    seen.append(f"remind:{job.n}")


@billing.on_schedule(every=3600)
async def nightly() -> None: ...


def test_routers_register_their_handlers_with_prefixes_and_defaults() -> None:
    app = eventfn.App("shop", retry=eventfn.Retry(attempts=2), timeout=30)
    app.include(billing, prefix="billing.")
    names = {s.ref.name: s for s in app.subscriptions}
    assert set(names) == {"events/ledger", "billing.reminders", "schedule.billing.nightly"}
    assert names["events/ledger"].retry.attempts == 7  # the router's default over the app's
    assert names["billing.reminders"].timeout == 5  # the decorator's own over both
    assert names["events/ledger"].timeout == 30  # the app's, where nobody else says
    assert "schedule.billing.nightly" in app.schedules
    assert names["billing.reminders"].handler is remind  # the decorator returned it unchanged


def test_nested_routers_and_their_mistakes_name_the_handler() -> None:
    outer = eventfn.Router()
    inner = eventfn.Router()

    @inner.on_queue("a")
    async def first(job: Job) -> None: ...

    @inner.on_queue("a")
    async def second(job: Job) -> None: ...

    outer.include(inner, prefix="x.")
    app = eventfn.App("shop")
    with pytest.raises(eventfn.RegistrationError, match=r"second.*already handled by.*first"):
        app.include(outer, prefix="y.")
    with pytest.raises(eventfn.RegistrationError, match="unknown option retires"):
        eventfn.Router(retires=3)  # type: ignore[call-arg]


async def test_routed_handlers_run_like_the_apps_own() -> None:
    seen.clear()
    app = eventfn.App("shop")
    app.include(billing, prefix="billing.")
    async with fresh() as broker:
        await app.connect(broker)
        await app.emit(InvoicePaid("i-1"))
        await app.publish("billing.reminders", Job(4))
        await burst(app, broker)
    assert sorted(seen) == ["ledger:i-1", "remind:4"]


async def test_the_lifespan_opens_resources_once_and_handlers_get_them_typed() -> None:
    app = eventfn.App("shop")
    events: list[str] = []
    got: list[list[str]] = []

    @app.lifespan
    @contextlib.asynccontextmanager
    async def resources(app: eventfn.App) -> AsyncIterator[Resources]:
        events.append("open")
        yield Resources(pool=["conn-1"])
        events.append("close")

    @app.on_queue("jobs")
    async def work(job: Job, ctx: eventfn.Context[Resources]) -> None:
        got.append(ctx.state.pool)

    async with fresh() as broker:
        await app.connect(broker)
        await app.publish_many(app.message("jobs", Job(n)) for n in range(5))
        await burst(app, broker)
    assert events == ["open", "close"]
    assert got == [["conn-1"]] * 5
    with pytest.raises(eventfn.ConfigurationError, match="no lifespan state here"):
        _ = app.state


async def test_a_failing_lifespan_stops_the_runner_before_any_message() -> None:
    app = eventfn.App("shop")
    handled: list[int] = []

    @app.lifespan
    @contextlib.asynccontextmanager
    async def resources(app: eventfn.App) -> AsyncIterator[None]:
        raise ConnectionRefusedError("database is down")
        yield

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        handled.append(job.n)

    async with fresh() as broker:
        await app.connect(broker)
        await app.publish("jobs", Job(1))
        with pytest.raises(ConnectionRefusedError, match="database is down"):
            await burst(app, broker)
        assert (await broker.stats(app.subscriptions[0].ref)).ready == 1  # nothing lost
    assert handled == []


def test_one_lifespan_per_app() -> None:
    app = eventfn.App("shop")

    @app.lifespan
    @contextlib.asynccontextmanager
    async def one(app: eventfn.App) -> AsyncIterator[None]:
        yield

    with pytest.raises(eventfn.RegistrationError, match="has a lifespan already"):

        @app.lifespan
        @contextlib.asynccontextmanager
        async def two(app: eventfn.App) -> AsyncIterator[None]:
            yield
