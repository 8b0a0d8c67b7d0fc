"""Traces and metrics by the OpenTelemetry messaging conventions, free when nothing listens.

eventfn uses the OpenTelemetry API only. It records spans and metrics when an SDK provider is in
place: one installed by ``eventfn run --otel otlp|console`` (or ``auto`` with the standard
``OTEL_EXPORTER_OTLP_*`` variables set), by ``opentelemetry-instrument``, by your own code with
``trace.set_tracer_provider(...)``, or handed to eventfn alone with :func:`instrument`. With the
API's default (proxy) or no-op providers it records nothing and the hot path skips every step.

Spans: ``send <destination>`` (PRODUCER) for each published message, whose context travels in the
envelope's ``traceparent``/``tracestate``; ``process <destination>`` (CONSUMER) for each attempt,
a child of that ``send``, so one trace follows a message through every hop. The handler runs in
the ``process`` span's context: its own spans and the ``send`` of what it emits are its children.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import (
    NonRecordingSpan,
    NoOpTracerProvider,
    ProxyTracerProvider,
    Span,
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from eventfn.exceptions import ConfigurationError

if TYPE_CHECKING:
    from eventfn.brokers.base import OutgoingMessage

Mode = Literal["auto", "otlp", "console", "none"]
MODES: tuple[Mode, ...] = ("auto", "otlp", "console", "none")

SCOPE = "eventfn"

# attribute names of the OpenTelemetry messaging conventions, and eventfn's own
SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
GROUP = "messaging.consumer.group.name"
MESSAGE_ID = "messaging.message.id"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
BATCH_COUNT = "messaging.batch.message_count"
EVENT_TYPE = "cloudevents.event_type"
ERROR_TYPE = "error.type"
ATTEMPT = "eventfn.attempt"
OUTCOME = "eventfn.outcome"
SUBSCRIPTION = "eventfn.subscription"
HANDLER = "eventfn.handler"

_tracer_override: trace.TracerProvider | None = None
_meter_override: metrics.MeterProvider | None = None
_lock = threading.Lock()


def instrument(
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> None:
    """Make eventfn record with these providers instead of the global ones.

    For tests (an SDK provider with an in-memory exporter) and for apps that keep their own
    providers. ``instrument()`` with no arguments goes back to the global providers. Call it
    before a runner starts: a running runner keeps what it found at start-up.

    >>> exporter = InMemorySpanExporter()
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(SimpleSpanProcessor(exporter))
    >>> eventfn.telemetry.instrument(tracer_provider=provider)
    """
    global _tracer_override, _meter_override, _metrics_cache
    with _lock:
        _tracer_override = tracer_provider
        _meter_override = meter_provider
        _metrics_cache = None


_tracer_cache: tuple[trace.TracerProvider, trace.Tracer] | None = None


def tracer() -> trace.Tracer | None:
    """eventfn's tracer, or ``None`` when nothing would record its spans."""
    global _tracer_cache
    provider = _tracer_override or trace.get_tracer_provider()
    if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
        return None
    cached = _tracer_cache
    if cached is None or cached[0] is not provider:
        cached = _tracer_cache = (provider, provider.get_tracer(SCOPE, _version()))
    return cached[1]


def _real_meter_provider() -> metrics.MeterProvider | None:
    provider = _meter_override or metrics.get_meter_provider()
    if isinstance(provider, metrics.NoOpMeterProvider) or type(provider).__name__ in (
        "_ProxyMeterProvider",
        "ProxyMeterProvider",
    ):
        return None
    return provider


# -- W3C trace context in the envelope ------------------------------------------------------


def traceparent(span: Span) -> tuple[str, str | None]:
    """The W3C ``traceparent`` and ``tracestate`` values of a span."""
    ctx = span.get_span_context()
    state = ctx.trace_state.to_header() if ctx.trace_state else None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}", state or None


def extract(parent: str | None, state: str | None) -> otel_context.Context | None:
    """The remote context carried by an envelope, or ``None`` if it carries none (or junk)."""
    if not parent:
        return None
    parts = parent.split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if len(parts[1]) != 32 or len(parts[2]) != 16 or not trace_id or not span_id:
        return None
    span_context = SpanContext(
        trace_id=trace_id,
        span_id=span_id,
        is_remote=True,
        trace_flags=TraceFlags(flags & 0xFF),
        trace_state=TraceState.from_header([state]) if state else TraceState(),
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def record_failure(span: Span, error_type: str, message: str, stack: str = "") -> None:
    """Mark a span failed, with an ``exception`` event the way ``record_exception`` makes one."""
    span.set_attribute(ERROR_TYPE, error_type)
    span.add_event(
        "exception",
        {"exception.type": error_type, "exception.message": message, "exception.stacktrace": stack},
    )
    span.set_status(Status(StatusCode.ERROR, f"{error_type}: {message}"))


def sent(
    messages: Sequence[OutgoingMessage], system: str, error: BaseException | None = None
) -> None:
    """End the ``send`` spans of messages the broker took (or refused), and count them."""
    instruments = meters() if error is None else None
    counts = instruments.sent_counts if instruments is not None else None
    for message in messages:
        span = message.span
        if span is not None:
            if error is not None:
                record_failure(span, type(error).__qualname__, str(error))
            span.end()
        if counts is not None:
            key = (system, message.destination)
            counts[key] = counts.get(key, 0) + 1


def discard(messages: Sequence[OutgoingMessage]) -> None:
    """End the ``send`` spans of messages a failed handler emitted: they are never sent."""
    for message in messages:
        if message.span is not None:
            message.span.set_attribute(OUTCOME, "discarded")
            message.span.end()


# -- metrics -------------------------------------------------------------------------------------


Observed = Iterable[tuple[float, Mapping[str, Any]]]


class Source(Protocol):
    """Something with counts to report: ``observe("handled")`` yields ``(value, attributes)``."""

    def observe(self, metric: str) -> Observed: ...


class Metrics:
    """eventfn's instruments on one meter provider.

    Only the two histograms are recorded per message. Counts (handled by outcome, in flight,
    sent) are kept as plain integers by the runner and the publisher, and read with the broker's
    backlog counts by observable instruments when the reader collects: a message costs no
    metric call for them. A runner reports through a :class:`Source` it adds to ``sources``
    while it runs, and leaves a snapshot of its final counts there when it stops, so that they
    reach the last export.
    """

    def __init__(self, provider: metrics.MeterProvider) -> None:
        self.sources: set[Source] = set()
        self.sent_counts: dict[tuple[str, str], int] = {}
        meter = provider.get_meter(SCOPE, _version())
        self.duration = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Duration of one handler call."
        )
        self.lag = meter.create_histogram(
            "eventfn.lag", unit="s", description="From publish to the start of its handler."
        )
        meter.create_observable_counter(
            "eventfn.handled",
            callbacks=[self._observer("handled")],
            unit="{message}",
            description="Messages whose handling ended, by eventfn.outcome (ack, retry, dead, "
            "drop, duplicate, released).",
        )
        meter.create_observable_up_down_counter(
            "eventfn.in_flight",
            callbacks=[self._observer("in_flight")],
            unit="{message}",
            description="Handler calls running now in this process.",
        )
        meter.create_observable_counter(
            "messaging.client.sent.messages",
            callbacks=[self._observe_sent],
            unit="{message}",
            description="Messages this process published (emitted ones once their ack is in).",
        )
        gauges = {
            "backlog": "Messages of a subscription waiting to be handled (ready or delayed).",
            "leased": "Messages of a subscription leased to a consumer now, in any runner.",
            "dead_letters": "Messages in a subscription's dead-letter store.",
        }
        for name, description in gauges.items():
            meter.create_observable_gauge(
                f"eventfn.{name}",
                callbacks=[self._observer(name)],
                unit="{message}",
                description=description,
            )

    def _observer(
        self, metric: str
    ) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
        def callback(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            return [
                metrics.Observation(value, dict(attributes))
                for source in list(self.sources)
                for value, attributes in source.observe(metric)
            ]

        return callback

    def _observe_sent(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [
            metrics.Observation(count, {SYSTEM: system, DESTINATION: destination})
            for (system, destination), count in list(self.sent_counts.items())
        ]


_metrics_cache: tuple[metrics.MeterProvider, Metrics] | None = None


def meters() -> Metrics | None:
    """eventfn's instruments, or ``None`` when nothing would export them."""
    global _metrics_cache
    provider = _real_meter_provider()
    if provider is None:
        return None
    cached = _metrics_cache
    if cached is not None and cached[0] is provider:
        return cached[1]
    with _lock:
        if _metrics_cache is None or _metrics_cache[0] is not provider:
            _metrics_cache = (provider, Metrics(provider))
        return _metrics_cache[1]


# -- logs ------------------------------------------------------------------------------------------


_factory_installed = False


def correlate_logs() -> None:
    """Give every log record ``otelTraceID`` and ``otelSpanID`` (``0`` outside a span), the names
    the OpenTelemetry logging instrumentation uses, so a log format can print them."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        ctx = trace.get_current_span().get_span_context()
        record.otelTraceID = f"{ctx.trace_id:032x}" if ctx.is_valid else "0"
        record.otelSpanID = f"{ctx.span_id:016x}" if ctx.is_valid else "0"
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


# -- set-up for the command line -----------------------------------------------------------------


def setup(mode: Mode, service_name: str, *, stream: TextIO | None = None) -> Callable[[], None]:
    """Install global SDK providers as ``mode`` says; returns the function that flushes them.

    - ``auto``: ``otlp`` if an ``OTEL_EXPORTER_OTLP_*ENDPOINT`` or ``OTEL_TRACES_EXPORTER=otlp``
      is set, else leave the providers alone (an ``opentelemetry-instrument`` wrapper, or
      nothing at all, which costs nothing).
    - ``otlp``: OTLP/HTTP (or gRPC, by ``OTEL_EXPORTER_OTLP_PROTOCOL``) exporters for spans and
      metrics, configured by the standard ``OTEL_*`` variables.
    - ``console``: one line per finished span on stderr.
    - ``none``: nothing, whatever the environment says.
    """
    if not wanted(mode):
        return _nothing
    if mode == "auto":
        mode = "otlp"
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create(
        {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    )
    provider = TracerProvider(resource=resource)
    shutdowns: list[Callable[[], object]] = [provider.shutdown]
    if mode == "console":
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider.add_span_processor(SimpleSpanProcessor(_line_exporter(stream or sys.stderr)))
    else:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        span_exporter, metric_exporter = _otlp_exporters()
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
        meter_provider = MeterProvider(
            resource=resource, metric_readers=[PeriodicExportingMetricReader(metric_exporter)]
        )
        metrics.set_meter_provider(meter_provider)
        shutdowns.append(meter_provider.shutdown)
    trace.set_tracer_provider(provider)
    correlate_logs()

    def shutdown() -> None:
        for step in shutdowns:
            step()

    return shutdown


def wanted(mode: Mode) -> bool:
    """Whether :func:`setup` with this mode installs providers (and logs should carry ids)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or mode == "none":
        return False
    return mode != "auto" or _otlp_configured()


def _nothing() -> None:
    return None


def _otlp_configured() -> bool:
    names = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return any(os.environ.get(n) for n in names) or os.environ.get("OTEL_TRACES_EXPORTER") == "otlp"


def _otlp_exporters() -> tuple[Any, Any]:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf").strip()
    package = "grpc" if protocol == "grpc" else "http"
    module = f"opentelemetry.exporter.otlp.proto.{package}"
    try:
        spans = importlib.import_module(f"{module}.trace_exporter")
        points = importlib.import_module(f"{module}.metric_exporter")
    except ImportError:
        extra = "otlp-grpc" if package == "grpc" else "otlp"
        raise ConfigurationError(
            f"OTLP export over {protocol} needs its exporter: pip install 'eventfn[{extra}]' "
            "(or run with --otel none / --otel console)"
        ) from None
    return spans.OTLPSpanExporter(), points.OTLPMetricExporter()


def _line_exporter(stream: TextIO) -> Any:
    """A span exporter that prints one short line per finished span (``--otel console``)."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class LineExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            for span in spans:
                stream.write(format_span(span) + "\n")
            stream.flush()
            return SpanExportResult.SUCCESS

    return LineExporter()


def format_span(span: Any) -> str:
    """One line for a finished SDK span: name, kind, duration, ids, status and attributes."""
    ctx = span.context
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else "-"
    took = (span.end_time - span.start_time) / 1e6 if span.end_time and span.start_time else 0.0
    attributes = " ".join(f"{k}={v}" for k, v in sorted((span.attributes or {}).items()))
    status = span.status.status_code.name
    return (
        f"span {span.name!r} {span.kind.name} {took:.2f}ms trace={ctx.trace_id:032x} "
        f"span={ctx.span_id:016x} parent={parent} status={status} {attributes}"
    ).rstrip()


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("eventfn")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "0"


__all__ = ["MODES", "Mode", "correlate_logs", "format_span", "instrument", "setup"]
