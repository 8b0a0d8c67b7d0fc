"""Batch handlers: lists of events, partial failure, poison items, bounds."""

from __future__ import annotations

from collections import Counter

import anyio
import msgspec
import pytest

import eventfn
from eventfn.brokers import Broker, OutgoingMessage


class Row(msgspec.Struct, frozen=True):
    n: int


class Loaded(msgspec.Struct, frozen=True):
    count: int


async def burst(app: eventfn.App, broker: Broker) -> eventfn.Summary:
    runner = eventfn.Runner(app, broker, burst=True, poll=0.05, concurrency=8)
    with anyio.fail_after(60):
        return await runner.run()


def make_app() -> eventfn.App:
    return eventfn.App("batch", retry=eventfn.Retry(attempts=3, backoff=0.01, cap=0.02))


async def test_batches_are_bounded_and_every_row_is_handled_once(broker: Broker) -> None:
    app = make_app()
    sizes: list[int] = []
    rows: Counter[int] = Counter()

    @app.on_queue("rows", batch=100, batch_wait=0.05)
    async def load(batch: list[Row]) -> None:
        sizes.append(len(batch))
        rows.update(row.n for row in batch)

    await app.connect(broker)
    await app.publish_many(app.message("rows", Row(n)) for n in range(250))
    summary = await burst(app, broker)
    assert rows == Counter(range(250))
    assert max(sizes) == 100 and sum(sizes) == 250
    assert summary.handled == 250


async def test_partial_failure_retries_only_the_failed_items(broker: Broker) -> None:
    app = make_app()
    seen: Counter[int] = Counter()
    loaded: list[int] = []

    @app.on_queue("rows", batch=50, batch_wait=0.05)
    async def load(batch: list[Row], envelopes: list[eventfn.Envelope]) -> eventfn.BatchResult:
        seen.update(row.n for row in batch)
        rejected = [row for row in batch if row.n % 10 == 0 and seen[row.n] == 1]
        loaded.extend(row.n for row in batch if row not in rejected)
        assert len(envelopes) == len(batch)
        return eventfn.BatchResult(failed=rejected, reason="constraint violated")

    await app.connect(broker)
    await app.publish_many(app.message("rows", Row(n)) for n in range(100))
    summary = await burst(app, broker)
    assert sorted(loaded) == list(range(100))  # each row loaded once
    assert all(seen[n] == (2 if n % 10 == 0 else 1) for n in range(100))
    assert summary.retried == 10 and summary.handled == 100 and summary.dead_lettered == 0


async def test_a_raising_batch_fails_every_item_and_exhausted_ones_are_dead_lettered(
    broker: Broker,
) -> None:
    app = make_app()

    @app.on_queue("rows", batch=10, batch_wait=0.05, breaker=False)
    async def load(batch: list[Row]) -> None:
        raise ConnectionError("warehouse is down")

    await app.connect(broker)
    await app.publish_many(app.message("rows", Row(n)) for n in range(10))
    summary = await burst(app, broker)
    records = await broker.dead_letters("rows")
    assert len(records) == 10 and all(r.attempts == 3 for r in records)
    assert {r.error_type for r in records} == {"ConnectionError"}
    assert summary.retried == 20


async def test_reported_failures_carry_the_reason(broker: Broker) -> None:
    app = eventfn.App("batch", retry=eventfn.Retry(attempts=1))

    @app.on_queue("rows", batch=10, batch_wait=0.05)
    async def load(batch: list[Row]) -> eventfn.BatchResult:
        return eventfn.BatchResult(failed=[r for r in batch if r.n == 3], reason="bad row")

    await app.connect(broker)
    await app.publish_many(app.message("rows", Row(n)) for n in range(5))
    await burst(app, broker)
    (record,) = await broker.dead_letters("rows")
    assert record.error_type == "eventfn.batch.BatchItemFailed"
    assert record.error_message == "the batch handler reported this item failed: bad row"


async def test_poison_items_go_aside_and_the_rest_of_the_batch_runs(broker: Broker) -> None:
    app = make_app()
    loaded: list[int] = []
    done: list[int] = []

    @app.on_queue("rows", batch=10, batch_wait=0.05)
    async def load(batch: list[Row], ctx: eventfn.Context) -> None:
        loaded.extend(row.n for row in batch)
        await ctx.emit(Loaded(count=len(batch)))

    @app.on_event(Loaded, group="count-loads")
    async def count(event: Loaded) -> None:
        done.append(event.count)

    await app.connect(broker)
    await app.publish_many(app.message("rows", Row(n)) for n in range(3))
    poison = OutgoingMessage(destination="rows", id="poison", type="t", body=b"not json")
    await broker.publish([poison])
    await app.publish("rows", {"n": "three"}, id="wrong-schema")
    await burst(app, broker)
    assert sorted(loaded) == [0, 1, 2]
    assert sum(done) == 3  # the batch's emitted event went out once
    assert {r.message_id for r in await broker.dead_letters("rows")} == {"poison", "wrong-schema"}


def test_batch_registration_errors() -> None:
    app = eventfn.App("batch")
    with pytest.raises(eventfn.RegistrationError, match=r"must be a list, e\.g\. list\[Row\]"):

        @app.on_queue("rows", batch=10)
        async def single(row: Row) -> None: ...

    with pytest.raises(eventfn.RegistrationError, match="not supported on a batch handler"):

        @app.on_queue("rows2", batch=10, idempotent=True)
        async def idem(rows: list[Row]) -> None: ...

    with pytest.raises(eventfn.RegistrationError, match="batch must be a whole number"):
        app.on_queue("rows3", batch=0)
