"""The OTLP receiver fixture on its own, without eventfn: spans that the OpenTelemetry SDK exports
over OTLP/HTTP protobuf come back from the receiver's query API with their names, ids, parent
link, kinds, attributes and status. If the receiver is not reached the export fails and so
does the test; nothing here is faked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode

if TYPE_CHECKING:  # imported by pytest_plugins below, so that pytest can rewrite its asserts
    from tests.otlp_collector import OtlpCollector

pytest_plugins = ["tests.otlp_collector"]


class RecordingExporter(SpanExporter):
    """Passes spans on to the real exporter and keeps what each export answered."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.results: list[SpanExportResult] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        self.results.append(result)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


def test_exported_spans_read_back_from_the_receiver(otlp_collector: OtlpCollector) -> None:
    exporter = RecordingExporter(
        OTLPSpanExporter(endpoint=f"{otlp_collector.endpoint}/v1/traces", timeout=10)
    )
    provider = TracerProvider(resource=Resource.create({"service.name": "otlp-smoke"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("tests.otlp_smoke")
    try:
        with tracer.start_as_current_span(
            "orders publish",
            kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "eventfn", "messaging.batch.message_count": 3},
        ) as parent:
            parent.set_status(Status(StatusCode.OK))
            with tracer.start_as_current_span(
                "orders process",
                kind=SpanKind.CONSUMER,
                attributes={"messaging.operation.type": "process", "retry": True},
            ) as child:
                child.set_status(Status(StatusCode.ERROR, "handler raised"))
        assert provider.force_flush(20_000), "the batch processor did not flush in time"
    finally:
        provider.shutdown()
    assert exporter.results, "nothing was exported"
    assert set(exporter.results) == {SpanExportResult.SUCCESS}, (
        f"{otlp_collector.endpoint} did not accept the export: {exporter.results}\n"
        f"{otlp_collector.log()}"
    )

    parent_ctx, child_ctx = parent.get_span_context(), child.get_span_context()
    trace_id = format(parent_ctx.trace_id, "032x")
    spans = otlp_collector.spans(trace_id, expect=2)

    assert [s["name"] for s in spans] == ["orders publish", "orders process"]  # by start time
    published, processed = spans
    assert {s["trace_id"] for s in spans} == {trace_id}
    assert published["span_id"] == format(parent_ctx.span_id, "016x")
    assert processed["span_id"] == format(child_ctx.span_id, "016x")
    assert published["parent_id"] is None
    assert processed["parent_id"] == published["span_id"]
    assert (published["kind"], processed["kind"]) == ("PRODUCER", "CONSUMER")
    assert published["attributes"] == {
        "messaging.system": "eventfn",
        "messaging.batch.message_count": 3,
    }
    assert processed["attributes"] == {"messaging.operation.type": "process", "retry": True}
    assert (published["status_code"], processed["status_code"]) == ("OK", "ERROR")
    assert processed["status_message"] == "handler raised"
    assert published["resource"]["service.name"] == "otlp-smoke"
    assert published["scope"] == "tests.otlp_smoke"
