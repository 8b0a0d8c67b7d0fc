"""Traces and metrics, read back from the OpenTelemetry SDK's in-memory exporter and reader."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import anyio
import msgspec
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import eventfn
from eventfn import telemetry
from eventfn.brokers import Broker
from eventfn.brokers.memory import MemoryBroker


class OrderAccepted(msgspec.Struct, frozen=True):
    order_id: str


class InventoryReserved(msgspec.Struct, frozen=True):
    order_id: str


class Job(msgspec.Struct, frozen=True):
    n: int


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.instrument(tracer_provider=provider)
    yield exporter
    telemetry.instrument()
    provider.shutdown()


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    telemetry.instrument(meter_provider=provider)
    yield reader
    telemetry.instrument()
    provider.shutdown()


def fresh_memory() -> MemoryBroker:
    return MemoryBroker(f"memory://telemetry-{uuid.uuid4().hex}")


def fast_app(**options: object) -> eventfn.App:
    retry = eventfn.Retry(attempts=3, backoff=0.01, cap=0.02, jitter="none")
    return eventfn.App("shop", retry=retry, event_bus="events", **options)  # type: ignore[arg-type]


async def burst(app: eventfn.App, broker: Broker) -> eventfn.Summary:
    runner = eventfn.Runner(app, broker, burst=True, poll=0.05)
    with anyio.fail_after(30):
        return await runner.run()


def chain_app(reserved: list[str]) -> eventfn.App:
    app = fast_app()

    @app.on_topic("order-events", group="reserve-inventory", emits=[InventoryReserved])
    async def reserve(order: OrderAccepted, ctx: eventfn.Context) -> None:
        await ctx.emit(InventoryReserved(order_id=order.order_id))

    @app.on_topic("order-events", group="send-email")
    async def email(order: OrderAccepted) -> None:
        return None

    @app.on_topic("order-events", group="analytics")
    async def analytics(order: OrderAccepted) -> None:
        return None

    @app.on_event(InventoryReserved, group="notify-warehouse")
    async def notify(event: InventoryReserved) -> None:
        reserved.append(event.order_id)

    return app


def by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in finished:
        found.setdefault(span.name, []).append(span)
    return found


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_three_hop_chain_is_one_trace_with_the_right_tree(
    spans: InMemorySpanExporter, broker: Broker
) -> None:
    reserved: list[str] = []
    app = chain_app(reserved)
    await app.connect(broker)
    await app.publish("order-events", OrderAccepted(order_id="o-1"), type="order.accepted")
    await burst(app, broker)
    assert reserved == ["o-1"]

    finished = spans.get_finished_spans()
    assert len({s.context.trace_id for s in finished}) == 1, [s.name for s in finished]
    named = by_name(finished)
    (send,) = named["send order-events"]
    assert send.kind is SpanKind.PRODUCER and send.parent is None
    assert send.attributes is not None
    assert send.attributes["messaging.destination.name"] == "order-events"
    assert send.attributes["messaging.operation.type"] == "send"
    assert send.attributes["messaging.system"] == broker.system
    assert send.attributes["cloudevents.event_type"] == "order.accepted"
    message_id = send.attributes["messaging.message.id"]

    processes = named["process order-events"]
    groups = {s.attributes["messaging.consumer.group.name"]: s for s in processes if s.attributes}
    assert set(groups) == {"reserve-inventory", "send-email", "analytics"}
    for group, span in groups.items():
        assert span.kind is SpanKind.CONSUMER
        assert parent_of(span) == send.context.span_id, group
        assert span.attributes is not None
        assert span.attributes["messaging.message.id"] == message_id
        assert span.attributes["messaging.operation.type"] == "process"
        assert span.attributes["messaging.destination.name"] == "order-events"
        assert span.attributes["eventfn.attempt"] == 1
        assert span.attributes["eventfn.outcome"] == "ack"
        assert span.status.status_code is StatusCode.UNSET

    (emitted,) = named["send events"]
    assert emitted.kind is SpanKind.PRODUCER
    assert parent_of(emitted) == groups["reserve-inventory"].context.span_id
    assert emitted.attributes is not None
    assert emitted.attributes["cloudevents.event_type"] == "inventory.reserved"
    (notified,) = named["process events"]
    assert parent_of(notified) == emitted.context.span_id
    assert notified.attributes is not None
    assert notified.attributes["messaging.consumer.group.name"] == "notify-warehouse"
    assert len(finished) == 6


async def test_each_attempt_is_a_span_and_a_dead_letter_shows_its_error(
    spans: InMemorySpanExporter,
) -> None:
    app = fast_app()

    @app.on_queue("jobs")
    async def work(job: Job, ctx: eventfn.Context) -> None:
        if job.n == 1 and ctx.attempt < 2:
            raise ConnectionError("flaky")
        if job.n == 2:
            raise ValueError("never works")

    async with fresh_memory() as broker:
        await app.connect(broker)
        await app.publish("jobs", Job(1))
        await app.publish("jobs", Job(2))
        await burst(app, broker)

    processes = [s for s in spans.get_finished_spans() if s.name == "process jobs"]
    sends = {
        s.attributes["messaging.message.id"]: s
        for s in spans.get_finished_spans()
        if s.name == "send jobs" and s.attributes
    }
    attempts: dict[int, list[ReadableSpan]] = {}
    for span in processes:
        attempts.setdefault(span.context.trace_id, []).append(span)
    assert sorted(len(a) for a in attempts.values()) == [2, 3]
    for trace_spans in attempts.values():
        trace_spans.sort(key=lambda s: s.attributes["eventfn.attempt"] if s.attributes else 0)
        assert [s.attributes["eventfn.attempt"] for s in trace_spans if s.attributes] == list(
            range(1, len(trace_spans) + 1)
        )
        message_id = (
            trace_spans[0].attributes["messaging.message.id"] if trace_spans[0].attributes else ""
        )
        assert all(parent_of(s) == sends[message_id].context.span_id for s in trace_spans)
        outcomes = [s.attributes["eventfn.outcome"] for s in trace_spans if s.attributes]
        if len(trace_spans) == 2:  # the flaky one: a retry, then done
            assert outcomes == ["retry", "ack"]
            retried = trace_spans[0]
            assert retried.status.status_code is StatusCode.ERROR
            assert retried.attributes is not None
            assert retried.attributes["error.type"] == "ConnectionError"
        else:
            assert outcomes == ["retry", "retry", "dead"]
            dead = trace_spans[-1]
            assert dead.status.status_code is StatusCode.ERROR
            assert dead.status.description == "ValueError: never works"
            (event,) = [e for e in dead.events if e.name == "exception"]
            assert event.attributes is not None
            assert event.attributes["exception.type"] == "ValueError"
            assert "never works" in str(event.attributes["exception.stacktrace"])


async def test_a_poison_message_gets_a_dead_span_without_a_parent(
    spans: InMemorySpanExporter,
) -> None:
    app = fast_app()

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        return None

    async with fresh_memory() as broker:
        await app.connect(broker)
        from eventfn.brokers import OutgoingMessage

        await broker.publish([OutgoingMessage(destination="jobs", id="bad", type="t", body=b"{")])
        await burst(app, broker)
    (span,) = spans.get_finished_spans()
    assert span.name == "process jobs" and span.parent is None
    assert span.attributes is not None
    assert span.attributes["eventfn.outcome"] == "dead"
    assert span.attributes["error.type"] == "eventfn.exceptions.DecodeError"


async def test_what_a_failed_handler_emitted_is_discarded_not_sent(
    spans: InMemorySpanExporter,
) -> None:
    app = eventfn.App("shop", retry=eventfn.Retry(attempts=1))

    @app.on_queue("jobs", emits=[InventoryReserved])
    async def work(job: Job, ctx: eventfn.Context) -> None:
        await ctx.emit(InventoryReserved(order_id=str(job.n)))
        raise RuntimeError("after the emit")

    async with fresh_memory() as broker:
        await app.connect(broker)
        await app.publish("jobs", Job(7))
        await burst(app, broker)
    (discarded,) = [s for s in spans.get_finished_spans() if s.name == "send events"]
    assert discarded.attributes is not None
    assert discarded.attributes["eventfn.outcome"] == "discarded"


async def test_batch_handler_span_links_every_message(spans: InMemorySpanExporter) -> None:
    app = fast_app()

    @app.on_queue("rows", batch=10, batch_wait=0.05)
    async def store(rows: list[Job]) -> None:
        return None

    async with fresh_memory() as broker:
        await app.connect(broker)
        await app.publish_many(app.message("rows", Job(n)) for n in range(10))
        await burst(app, broker)
    sends = {s.context.span_id for s in spans.get_finished_spans() if s.name == "send rows"}
    batches = [s for s in spans.get_finished_spans() if s.name == "process rows"]
    assert sum(s.attributes["messaging.batch.message_count"] for s in batches if s.attributes) == 10
    assert {link.context.span_id for s in batches for link in s.links} == sends


async def test_logs_carry_trace_and_span_ids(
    spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry.correlate_logs()
    app = fast_app()

    @app.on_queue("jobs")
    async def work(job: Job, ctx: eventfn.Context) -> None:
        ctx.log.warning("working on %d", job.n)

    async with fresh_memory() as broker:
        await app.connect(broker)
        with caplog.at_level(logging.INFO):
            await app.publish("jobs", Job(3))
            await burst(app, broker)
    (process,) = [s for s in spans.get_finished_spans() if s.name == "process jobs"]
    records = [
        r
        for r in caplog.records
        if r.getMessage() in ("working on 3",) or "handled" in r.getMessage()
    ]
    assert len(records) == 2
    for record in records:
        assert record.otelTraceID == f"{process.context.trace_id:032x}"
        assert record.otelSpanID == f"{process.context.span_id:016x}"


async def test_metrics_count_outcomes_and_time_handlers(reader: InMemoryMetricReader) -> None:
    app = fast_app()

    @app.on_queue("jobs")
    async def work(job: Job) -> None:
        if job.n < 2:
            raise eventfn.DeadLetter("bad job")

    async with fresh_memory() as broker:
        await app.connect(broker)
        await app.publish_many(app.message("jobs", Job(n)) for n in range(5))
        await burst(app, broker)
    points = metric_points(reader)
    handled = {attrs["eventfn.outcome"]: value for attrs, value in points["eventfn.handled"]}
    assert handled == {"ack": 3, "dead": 2, "retry": 0, "drop": 0, "duplicate": 0, "released": 0}
    ((attrs, count),) = points["messaging.process.duration"]
    assert count == 5 and attrs["messaging.destination.name"] == "jobs"
    ((_, lag_count),) = points["eventfn.lag"]
    assert lag_count == 5
    assert "eventfn.in_flight" not in points  # a stopped runner runs nothing, reports nothing
    ((sent_attrs, sent),) = points["messaging.client.sent.messages"]
    assert sent == 5 and sent_attrs["messaging.destination.name"] == "jobs"


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, object], float]]]:
    """Each metric's points: (attributes, value), a histogram's value being its count."""
    data = reader.get_metrics_data()
    found: dict[str, list[tuple[dict[str, object], float]]] = {}
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is None:
                        value = point.count  # type: ignore[union-attr]
                    found.setdefault(metric.name, []).append((dict(point.attributes or {}), value))
    return found


async def test_backlog_gauges_report_the_broker_counts(
    reader: InMemoryMetricReader, tmp_path: object
) -> None:
    app = fast_app()

    @app.on_queue("jobs", rate="1/s")
    async def work(job: Job) -> None:
        return None

    async with fresh_memory() as broker:
        await app.connect(broker)
        await app.publish_many(app.message("jobs", Job(n)) for n in range(50))
        runner = eventfn.Runner(app, broker, poll=0.05, grace=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)
            with anyio.fail_after(10):
                while True:
                    points = metric_points(reader)
                    if "eventfn.backlog" in points:
                        break
                    await anyio.sleep(0.02)
            runner.stop()
    ((attrs, backlog),) = points["eventfn.backlog"]
    assert attrs["eventfn.subscription"] == "jobs"
    ((_, leased),) = points["eventfn.leased"]
    assert backlog + leased >= 48  # one a second: at most a couple handled before the read
    ((_, dead),) = points["eventfn.dead_letters"]
    assert dead == 0
    ((_, in_flight),) = points["eventfn.in_flight"]
    assert 0 <= in_flight <= 64  # waiting for the rate limit's tokens, inside the handler call


async def test_telemetry_off_records_nothing_and_leaves_the_envelope_bare() -> None:
    telemetry.instrument()
    assert telemetry.tracer() is None and telemetry.meters() is None
    app = fast_app()
    message = app.message("jobs", Job(1))
    assert message.span is None and b"traceparent" not in message.body


async def test_an_undeclared_emit_warns_once_per_handler_and_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = fast_app()

    @app.on_queue("jobs", emits=[InventoryReserved])
    async def work(job: Job, ctx: eventfn.Context) -> None:
        await ctx.emit(InventoryReserved(order_id="x"))  # declared
        await ctx.emit(OrderAccepted(order_id="x"))  # not declared
        await ctx.publish("audit", {"n": job.n})  # not declared

    @app.on_event(OrderAccepted, group="sink")
    async def sink(event: OrderAccepted) -> None:
        return None

    @app.on_queue("audit")
    async def audit(entry: dict[str, int]) -> None:
        return None

    async with fresh_memory() as broker:
        await app.connect(broker)
        await app.publish_many(app.message("jobs", Job(n)) for n in range(5))
        with caplog.at_level(logging.WARNING, logger="eventfn.runner"):
            await burst(app, broker)
    warnings = [r.getMessage() for r in caplog.records if "without declaring" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert any("'order.accepted'" in w and "'events'" in w for w in warnings)
    assert any("'audit'" in w for w in warnings)


def test_emits_is_checked_at_registration() -> None:
    app = fast_app()
    with pytest.raises(eventfn.RegistrationError, match="emits= has 42"):

        @app.on_queue("jobs", emits=[InventoryReserved, 42])  # type: ignore[list-item]
        async def work(job: Job) -> None: ...

    with pytest.raises(eventfn.RegistrationError, match="not 'emails'"):

        @app.on_queue("jobs", emits="emails")
        async def other(job: Job) -> None: ...

    with pytest.raises(eventfn.RegistrationError, match="give it to that handler's decorator"):
        eventfn.App("shop", emits=[InventoryReserved])
