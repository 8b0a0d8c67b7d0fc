"""``eventfn.testing.TestRuntime``: the real pipeline on virtual time, without sleeps."""

from __future__ import annotations

import textwrap
import time
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import pytest

import eventfn
import eventfn.testing
from eventfn.testing import NotIdle, TestRuntime, s3_notification

# -- the README example ------------------------------------------------------------------------


class OrderAccepted(msgspec.Struct):
    order_id: str


class InventoryReserved(msgspec.Struct):
    order_id: str


app = eventfn.App("shop")


@app.on_event(OrderAccepted, group="reserve-inventory", emits=[InventoryReserved])
async def reserve_inventory(order: OrderAccepted, ctx: eventfn.Context) -> None:
    await ctx.emit(InventoryReserved(order_id=order.order_id))


@app.on_event(InventoryReserved, group="notify-warehouse")
async def notify_warehouse(event: InventoryReserved) -> None: ...


async def test_reserving_notifies_the_warehouse() -> None:
    async with TestRuntime(app) as rt:
        await rt.emit(OrderAccepted(order_id="o1"))
        await rt.drain()  # handled, emitted, handled downstream
    assert rt.handled_by(notify_warehouse) == [InventoryReserved(order_id="o1")]
    assert [e.type for e in rt.emitted] == ["inventory.reserved"]


async def test_the_example_in_the_docstring_runs() -> None:
    doc = TestRuntime.__doc__ or ""
    block = doc.split("::\n", 1)[1].split("\n    Enter it", 1)[0]
    namespace: dict[str, Any] = {"__name__": "docstring_example"}
    exec(textwrap.dedent(block), namespace)  # our own docstring
    await namespace["test_reserving_notifies_the_warehouse"]()


# -- retries and dead letters on virtual time ------------------------------------------------


async def test_backoff_reaches_the_dead_letter_queue_in_virtual_time() -> None:
    app = eventfn.App("pay")

    @app.on_queue("charges", retry=eventfn.Retry(attempts=4, backoff=30, factor=2, jitter="none"))
    async def charge(order: OrderAccepted) -> None:
        raise ConnectionError("the card processor is down")

    started = time.monotonic()
    async with TestRuntime(app, start=datetime(2026, 1, 1, tzinfo=UTC)) as rt:
        await rt.publish("charges", OrderAccepted(order_id="o1"))
        await rt.drain()
        [record] = await rt.dead_letters("charges")
    assert time.monotonic() - started < 1.0
    assert rt.clock.elapsed == 30 + 60 + 120
    assert [c.attempt for c in rt.attempts_of(charge)] == [1, 2, 3, 4]
    assert [c.at - rt.clock.start for c in rt.failures] == [0, 30, 90, 210]
    assert record.attempts == 4 and record.error_type == "ConnectionError"
    assert not rt.handled


async def test_drain_without_advance_leaves_the_retry_waiting() -> None:
    app = eventfn.App("pay")
    outcomes: list[int] = []

    @app.on_queue("charges", retry=eventfn.Retry(attempts=3, backoff=10, jitter="none"))
    async def charge(order: OrderAccepted, ctx: eventfn.Context) -> None:
        outcomes.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("flaky")

    async with TestRuntime(app) as rt:
        await rt.publish("charges", OrderAccepted(order_id="o1"))
        await rt.drain(advance=False)
        assert outcomes == [1] and rt.clock.elapsed == 0
        await rt.clock.advance(9)
        assert outcomes == [1]
        await rt.clock.advance(1)
        assert outcomes == [1, 2]
    assert rt.handled_by(charge) == [OrderAccepted(order_id="o1")]


async def test_a_handler_that_never_finishes_fails_drain_saying_what_is_pending() -> None:
    app = eventfn.App("stuck")
    never = anyio.Event()

    @app.on_queue("jobs")
    async def job(data: dict[str, int]) -> None:
        await never.wait()

    with pytest.raises(NotIdle, match=r"jobs: 0 ready, 1 leased"):
        async with TestRuntime(app) as rt:
            await rt.publish("jobs", {"n": 1})
            await rt.drain(timeout=0.2)


async def test_it_exits_cleanly_when_the_test_body_raises() -> None:
    app = eventfn.App("boom")

    @app.on_queue("jobs")
    async def job(data: dict[str, int]) -> None: ...

    with pytest.raises(ZeroDivisionError):
        async with TestRuntime(app) as rt:
            root = app.buckets.root
            assert root.is_dir()
            await rt.publish("jobs", {"n": 1})
            1 / 0  # noqa: B018
    assert not root.exists()
    with pytest.raises(eventfn.ConfigurationError):
        _ = app.broker  # the runtime disconnected the app
    async with TestRuntime(app) as again:  # and it can run again
        await again.publish("jobs", {"n": 2})
        await again.drain()
    assert again.handled_by(job) == [{"n": 2}]


# -- schedules ----------------------------------------------------------------------------------


async def test_a_five_minute_schedule_fires_288_times_in_a_virtual_day() -> None:
    app = eventfn.App("clock")
    dues: list[str] = []

    @app.on_schedule(cron="*/5 * * * *")
    async def every_five(tick: eventfn.Tick) -> None:
        dues.append(tick.due)

    started = time.monotonic()
    async with TestRuntime(app, start=datetime(2026, 5, 1, 0, 0, 30, tzinfo=UTC)) as rt:
        await rt.clock.advance(24 * 3600)
    assert time.monotonic() - started < 1.0
    assert len(dues) == len(set(dues)) == 288
    assert dues[0] == "2026-05-01T00:05:00Z" and dues[-1] == "2026-05-02T00:00:00Z"
    assert len(rt.handled) == 288


async def test_a_berlin_cron_schedule_across_the_spring_dst_change() -> None:
    app = eventfn.App("clock")
    dues: list[str] = []

    @app.on_schedule(cron="30 2 * * *", tz="Europe/Berlin")
    async def nightly(tick: eventfn.Tick) -> None:
        dues.append(tick.due)

    async with TestRuntime(app, start=datetime(2026, 3, 27, 12, tzinfo=UTC)) as rt:
        await rt.clock.advance(3 * 86400)
    # 02:30 CET, then 03:00 CEST (02:30 does not exist on the 29th), then 02:30 CEST
    assert dues == ["2026-03-28T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]


async def test_a_published_tick_is_not_handled_again_when_it_comes_due() -> None:
    app = eventfn.App("clock")
    dues: list[float] = []

    @app.on_schedule(every=3600, name="hourly")
    async def hourly(tick: eventfn.Tick) -> None:
        dues.append(tick.due_at)

    async with TestRuntime(app, start=7300.0) as rt:  # too late for the tick of 7200
        tick = await rt.tick("hourly")
        await rt.drain(advance=False)
        assert dues == [10800.0] == [tick.due_at]
        await rt.clock.advance(3600)
    assert dues == [10800.0]


# -- fan-out, idempotency, order ----------------------------------------------------------------


async def test_fan_out_emits_are_recorded_and_handled_downstream() -> None:
    app = eventfn.App("fan")
    emailed: list[str] = []

    @app.on_topic("order-events", group="reserve", emits=[InventoryReserved])
    async def reserve(order: OrderAccepted) -> None:
        await app.emit(InventoryReserved(order_id=order.order_id))

    @app.on_topic("order-events", group="email", emits=["emails"])
    async def email(order: OrderAccepted, ctx: eventfn.Context) -> None:
        await ctx.publish("emails", {"to": order.order_id})

    @app.on_queue("emails")
    async def send(message: dict[str, str]) -> None:
        emailed.append(message["to"])

    @app.on_event(InventoryReserved, group="warehouse")
    async def warehouse(event: InventoryReserved) -> None: ...

    async with TestRuntime(app) as rt:
        for n in range(3):
            await rt.publish("order-events", OrderAccepted(order_id=f"o{n}"))
        await rt.drain()
    assert sorted(emailed) == ["o0", "o1", "o2"]
    assert sorted(e.order_id for e in rt.handled_by(warehouse)) == ["o0", "o1", "o2"]
    reserved = [e.decode(InventoryReserved) for e in rt.emitted if e.destination == "events"]
    assert sorted(r.order_id for r in reserved) == ["o0", "o1", "o2"]
    assert {e.by for e in rt.emitted} == {
        reserve.__module__ + "." + reserve.__qualname__,
        email.__module__ + "." + email.__qualname__,
    }


async def test_an_idempotent_handler_skips_a_republished_message() -> None:
    app = eventfn.App("once")
    charged: list[str] = []

    @app.on_queue("charges", idempotent=True)
    async def charge(order: OrderAccepted) -> None:
        charged.append(order.order_id)

    async with TestRuntime(app) as rt:
        await rt.publish("charges", OrderAccepted(order_id="o1"), id="message-1")
        await rt.drain()
        await rt.publish("charges", OrderAccepted(order_id="o1"), id="message-1")
        await rt.drain()
    assert charged == ["o1"]
    assert len(rt.handled) == 1


class Click(msgspec.Struct):
    user_id: str
    n: int


async def test_stream_order_per_key_holds_across_a_retry() -> None:
    app = eventfn.App("clicks")
    seen: list[tuple[str, int]] = []
    failed = set[int]()

    @app.on_stream(
        "clicks",
        key="user_id",
        group="sessionize",
        retry=eventfn.Retry(attempts=3, backoff=5, jitter="none"),
    )
    async def sessionize(click: Click) -> None:
        if click.user_id == "a" and click.n == 1 and click.n not in failed:
            failed.add(click.n)
            raise ConnectionError("once")
        seen.append((click.user_id, click.n))

    async with TestRuntime(app) as rt:
        for n in range(5):
            for user in ("a", "b"):
                await rt.publish("clicks", Click(user_id=user, n=n))
        await rt.drain()
    assert [n for user, n in seen if user == "a"] == [0, 1, 2, 3, 4]
    assert [n for user, n in seen if user == "b"] == [0, 1, 2, 3, 4]
    assert rt.clock.elapsed == 5


# -- uploads ------------------------------------------------------------------------------------


async def test_an_upload_reaches_the_handler_with_its_bytes() -> None:
    app = eventfn.App("docs")
    got: list[tuple[str, int, str | None, bytes]] = []

    @app.on_upload(bucket="invoices", match="*.pdf")
    async def extract(upload: eventfn.Upload) -> None:
        got.append((upload.key, upload.size, upload.content_type, await upload.read()))

    async with TestRuntime(app) as rt:
        record = await rt.upload(
            "invoices", "2026/scan 1.pdf", b"%PDF-1", content_type="application/pdf"
        )
        await rt.upload("invoices", "notes.txt", b"skip me")
        await rt.drain()
    assert got == [("2026/scan 1.pdf", 6, "application/pdf", b"%PDF-1")]
    assert record.bucket == "invoices" and record.event == "created"


@pytest.mark.parametrize("minio", [False, True], ids=["s3", "minio"])
async def test_an_s3_notification_with_an_awkward_key_reaches_the_handler(minio: bool) -> None:
    app = eventfn.App("docs")
    got: list[eventfn.Upload] = []

    @app.on_upload(bucket="invoices", events=["created", "deleted"])
    async def extract(upload: eventfn.Upload) -> None:
        got.append(upload)

    key = "2026/März scan (1).pdf"
    created = s3_notification("invoices", key, size=42, etag="abc", version_id="v1", minio=minio)
    assert "M%C3%A4rz+scan+%281%29.pdf" in created["Records"][0]["s3"]["object"]["key"]
    async with TestRuntime(app) as rt:
        await rt.publish("bucket.invoices", created, type="aws.s3.notification")
        await rt.publish(
            "bucket.invoices",
            s3_notification("invoices", key, event="deleted", minio=minio),
            type="aws.s3.notification",
        )
        await rt.drain()
    assert [(u.bucket, u.key, u.event) for u in got] == [
        ("invoices", key, "created"),
        ("invoices", key, "deleted"),
    ]
    assert (got[0].size, got[0].etag, got[0].version) == (42, "abc", "v1")
    with pytest.raises(eventfn.ObjectNotLocal):
        await got[0].read()


def test_the_public_names() -> None:
    assert {"TestRuntime", "s3_notification", "check_broker", "CHECKS"} <= set(
        eventfn.testing.__all__
    )
