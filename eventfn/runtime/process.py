"""One delivery to one settlement: decode, invoke, classify. Each step testable alone."""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from eventfn import context as _context
from eventfn import telemetry
from eventfn.app import App
from eventfn.batch import BatchItemFailed, BatchResult
from eventfn.brokers.base import Delivery, Failure, OutgoingMessage, Settlement
from eventfn.context import Context
from eventfn.events import Envelope, decode_envelope
from eventfn.exceptions import DeadLetter, DecodeError, Drop, Duplicate, Filtered
from eventfn.middleware import (
    Call,
    Environment,
    Invocation,
    Middleware,
    build_chain,
    handler_call,
)
from eventfn.retry import Retry
from eventfn.runtime.breaker import Breaker
from eventfn.subscriptions import Subscription

log = logging.getLogger("eventfn.runner")


class Counters(msgspec.Struct):
    """Outcomes of one subscription since the runner started."""

    handled: int = 0
    retried: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    duplicates: int = 0
    released: int = 0

    def by_outcome(self) -> tuple[tuple[str, int], ...]:
        """Each count under its ``eventfn.outcome`` name."""
        return (
            ("ack", self.handled),
            ("retry", self.retried),
            ("dead", self.dead_lettered),
            ("drop", self.dropped),
            ("duplicate", self.duplicates),
            ("released", self.released),
        )


class Processor:
    """Runs one subscription's handler on a delivery and says how to settle it."""

    def __init__(
        self,
        app: App,
        subscription: Subscription,
        middleware: Sequence[Middleware],
        clock: Callable[[], float],
    ) -> None:
        self.app = app
        self.subscription = subscription
        self.name = subscription.ref.name
        self.middleware = middleware
        self.call: Call = handler_call(subscription)
        self.retry = subscription.retry
        # a stream record that fails goes aside at once, so that its key is not held back
        self.skip_key = subscription.skip_key_on_error and subscription.ref.kind == "stream"
        self.clock = clock
        self.counters = Counters()
        settings = subscription.options.breaker
        self.breaker = Breaker(settings, self.name, clock) if settings else None
        self.tracer: trace.Tracer | None = None
        self.meters: telemetry.Metrics | None = None
        self.attributes: dict[str, str] = {}
        self._span_attributes: dict[str, str] = {}
        self.by_outcome: dict[str, dict[str, str]] = {}
        self.running = 0  # handler calls in progress (kept while telemetry is on)
        self._span_name = ""
        self._emits_seen: set[tuple[str, str]] = set()

    def build(self, env: Environment) -> None:
        """Compose the middleware chain and look up telemetry (once, at runner start-up)."""
        self.call = build_chain(self.subscription, self.middleware, env)
        self.tracer = telemetry.tracer()
        self.meters = telemetry.meters()
        ref = self.subscription.ref
        # metrics get the few attributes that tell subscriptions apart: each one is checked on
        # every record, and the SDK's cost grows with their number
        attributes: dict[str, str] = {
            telemetry.SYSTEM: env.broker.system,
            telemetry.DESTINATION: ref.destination,
            telemetry.SUBSCRIPTION: self.name,
        }
        if ref.kind != "queue":
            attributes[telemetry.GROUP] = ref.group
        self.attributes = attributes
        self.by_outcome = {o: {**attributes, telemetry.OUTCOME: o} for o in OUTCOMES}
        self._span_attributes = {
            **attributes,
            telemetry.OPERATION_TYPE: "process",
            telemetry.OPERATION_NAME: "process",
            telemetry.HANDLER: self.subscription.name,
        }
        self._span_name = f"process {ref.destination}"

    async def __call__(self, delivery: Delivery) -> Settlement:
        if self.tracer is None and self.meters is None:
            return (await self._handle(delivery, None))[0]
        return await self._observed(delivery)

    async def _handle(
        self, delivery: Delivery, envelope: Envelope | None
    ) -> tuple[Settlement, str, Context[Any] | None]:
        """Decode, invoke, classify: the settlement, its outcome label, and the context."""
        try:
            if envelope is None:
                envelope = decode_envelope(delivery.body)
            ctx: Context[Any] = Context(self.app, self.name, delivery, envelope)
            args = self.subscription.build_args(envelope, ctx)
        except DecodeError as exc:
            return self._dead(delivery, exc, poison=True), "dead", None
        except Filtered as exc:
            return self._drop(delivery, exc), "drop", ctx
        token = _context._current.set(ctx)
        try:
            await self.call(Invocation(self.subscription, delivery, envelope, args, ctx))
        except Drop as exc:
            return self._drop(delivery, exc), _drop_label(exc), ctx
        except DeadLetter as exc:
            return self._dead(delivery, exc), "dead", ctx
        except Exception as exc:
            settlement = self._failed(delivery, exc)
            return settlement, settlement.outcome, ctx
        finally:
            _context._current.reset(token)
        self.counters.handled += 1
        if self.breaker is not None and self.breaker.state != "closed":
            self.breaker.success()
        elif self.breaker is not None:
            self.breaker.failures = 0
        if ctx.emitted:
            self._check_emits(ctx.emitted)
        if log.isEnabledFor(logging.INFO):
            log.info("handled %s id=%s attempt=%d", self.name, delivery.id, delivery.attempt)
        return Settlement(delivery=delivery, outcome="ack", emitted=tuple(ctx.emitted)), "ack", ctx

    async def _observed(self, delivery: Delivery) -> Settlement:
        """:meth:`_handle` inside a ``process`` span, with metrics."""
        envelope: Envelope | None = None
        with contextlib.suppress(DecodeError):  # a poison message is dead-lettered by _handle
            envelope = decode_envelope(delivery.body)
        span: Any = None
        token: Any = None
        if self.tracer is not None:
            span, token = self._start_span(delivery, envelope)
        meters = self.meters
        self.running += 1
        if meters is not None and delivery.published_at:
            meters.lag.record(max(0.0, self.clock() - delivery.published_at), self.attributes)
        started = time.perf_counter()
        settlement: Settlement | None = None
        outcome = "released"  # cancelled at shutdown: given back unsettled
        try:
            settlement, outcome, ctx = await self._handle(delivery, envelope)
            if outcome != "ack" and ctx is not None and ctx.emitted:
                telemetry.discard(ctx.emitted)
            return settlement
        finally:
            self.running -= 1
            if meters is not None:
                meters.duration.record(time.perf_counter() - started, self.attributes)
            if span is not None:
                _end_process_span(span, outcome, settlement)
                otel_context.detach(token)

    def _start_span(self, delivery: Delivery, envelope: Envelope | None) -> tuple[Any, Any]:
        assert self.tracer is not None
        attributes: dict[str, Any] = {
            **self._span_attributes,
            telemetry.MESSAGE_ID: envelope.id if envelope is not None else delivery.id,
            telemetry.ATTEMPT: delivery.attempt,
        }
        parent = None
        if envelope is not None:
            attributes[telemetry.EVENT_TYPE] = envelope.type
            parent = telemetry.extract(envelope.traceparent, envelope.tracestate)
        span = self.tracer.start_span(
            self._span_name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        return span, otel_context.attach(trace.set_span_in_context(span))

    def _check_emits(self, emitted: list[OutgoingMessage]) -> None:
        """Warn once per destination and type of an emit the handler did not declare."""
        for message in emitted:
            seen = (message.destination, message.type)
            if seen in self._emits_seen:
                continue
            self._emits_seen.add(seen)
            declared = self.subscription.options.emits
            if declared is not None and declared.covers(*seen, self.app.event_bus):
                continue
            log.warning(
                "handler %s emitted %r to %r without declaring it; add it to emits=[...] on "
                "its decorator so that `eventfn graph` shows this flow",
                self.subscription.name,
                message.type,
                message.destination,
            )

    async def run_batch(self, deliveries: list[Delivery]) -> list[Settlement]:
        """Run a batch handler once on several deliveries; one settlement for each."""
        if self.tracer is None and self.meters is None:
            return await self._run_batch(deliveries)
        span: Any = None
        token: Any = None
        if self.tracer is not None:
            span = self.tracer.start_span(
                self._span_name,
                kind=SpanKind.CONSUMER,
                attributes={**self._span_attributes, telemetry.BATCH_COUNT: len(deliveries)},
                links=_links(deliveries),
            )
            token = otel_context.attach(trace.set_span_in_context(span))
        meters = self.meters
        self.running += len(deliveries)
        if meters is not None:
            now = self.clock()
            for delivery in deliveries:
                if delivery.published_at:
                    meters.lag.record(max(0.0, now - delivery.published_at), self.attributes)
        started = time.perf_counter()
        settlements: list[Settlement] = []
        try:
            settlements = await self._run_batch(deliveries)
            return settlements
        finally:
            outcomes: list[str] = [
                "released" if s.outcome == "release" else s.outcome for s in settlements
            ] or ["released"] * len(deliveries)
            self.running -= len(deliveries)
            if meters is not None:
                meters.duration.record(time.perf_counter() - started, self.attributes)
            if span is not None:
                _end_batch_span(span, outcomes, settlements)
                otel_context.detach(token)

    async def _run_batch(self, deliveries: list[Delivery]) -> list[Settlement]:
        plan = self.subscription.batch_plan
        assert plan is not None
        settlements: list[Settlement] = []
        good: list[tuple[Delivery, Envelope, list[Any]]] = []
        for delivery in deliveries:
            try:
                envelope = decode_envelope(delivery.body)
                good.append((delivery, envelope, plan.item(envelope)))
            except DecodeError as exc:  # a poison item goes aside; the rest still run
                settlements.append(self._dead(delivery, exc, poison=True))
        if not good:
            return settlements
        first, envelope, _ = good[0]
        ctx: Context[Any] = Context(self.app, self.name, first, envelope)
        args = plan.assemble([values for _, _, values in good], ctx)
        token = _context._current.set(ctx)
        try:
            result = await self.call(Invocation(self.subscription, first, envelope, args, ctx))
        except Drop as exc:
            return settlements + [self._drop(d, exc) for d, _, _ in good]
        except DeadLetter as exc:
            return settlements + [self._dead(d, exc) for d, _, _ in good]
        except Exception as exc:
            if self.breaker is not None:  # one failed call of the dependency, however many items
                self.breaker.failure(min(d.attempt for d, _, _ in good))
            return settlements + [self._failed(d, exc, count=False) for d, _, _ in good]
        finally:
            _context._current.reset(token)
        return settlements + self._batch_outcome(good, result, ctx)

    def _batch_outcome(
        self, good: list[tuple[Delivery, Envelope, list[Any]]], result: Any, ctx: Context[Any]
    ) -> list[Settlement]:
        failed: set[int] = set()
        reason = ""
        if isinstance(result, BatchResult):
            reason = result.reason
            named = {id(item) for item in result.failed}
            failed = {
                i
                for i, (_, env, values) in enumerate(good)
                if id(env) in named or any(id(v) in named for v in values)
            }
        error = BatchItemFailed(
            f"the batch handler reported this item failed: {reason}".rstrip(": ")
        )
        settlements: list[Settlement] = []
        emitted = tuple(ctx.emitted)
        for index, (delivery, _, _) in enumerate(good):
            if index in failed:
                settlements.append(self._failed(delivery, error, count=False))
                continue
            self.counters.handled += 1
            settlements.append(Settlement(delivery=delivery, outcome="ack", emitted=emitted))
            emitted = ()  # the batch's emitted events go out once, with its first ack
        if len(failed) < len(good) and self.breaker is not None:
            self.breaker.success()
        log.info("handled batch %s: %d items, %d failed", self.name, len(good), len(failed))
        return settlements

    def _failure(self, exc: BaseException, *, with_traceback: bool = True) -> Failure:
        text = "".join(traceback.format_exception(exc)) if with_traceback else ""
        return Failure(
            error_type=_qualified(exc), message=str(exc), traceback=text, at=self.clock()
        )

    def _failed(self, delivery: Delivery, exc: Exception, *, count: bool = True) -> Settlement:
        if isinstance(exc, Retry):
            verdict = "retry" if delivery.attempt < self.retry.attempts else "dead"
            delay = exc.after if exc.after is not None else self.retry.delay(delivery.attempt)
        else:
            verdict = self.retry.classify(exc, delivery.attempt)
            delay = self.retry.delay(delivery.attempt)
            if self.breaker is not None and count:
                self.breaker.failure(delivery.attempt)
        if verdict == "dead" or self.skip_key:
            return self._dead(delivery, exc)
        self.counters.retried += 1
        log.warning(
            "retry %s id=%s attempt=%d in %.2fs: %s: %s",
            self.name,
            delivery.id,
            delivery.attempt,
            delay,
            _qualified(exc),
            exc,
        )
        return Settlement(
            delivery=delivery, outcome="retry", delay=delay, failure=self._failure(exc)
        )

    def _dead(self, delivery: Delivery, exc: BaseException, *, poison: bool = False) -> Settlement:
        self.counters.dead_lettered += 1
        log.error(
            "dead-letter %s id=%s attempt=%d%s: %s: %s",
            self.name,
            delivery.id,
            delivery.attempt,
            " (poison)" if poison else "",
            _qualified(exc),
            exc,
        )
        return Settlement(
            delivery=delivery,
            outcome="dead",
            failure=self._failure(exc, with_traceback=not poison),
        )

    def _drop(self, delivery: Delivery, exc: Drop) -> Settlement:
        if isinstance(exc, Duplicate):
            self.counters.duplicates += 1
            log.info("duplicate %s id=%s: %s", self.name, delivery.id, exc.reason)
            return Settlement(delivery=delivery, outcome="ack", emitted=exc.emitted)
        self.counters.dropped += 1
        level = logging.DEBUG if isinstance(exc, Filtered) else logging.INFO
        log.log(level, "dropped %s id=%s: %s", self.name, delivery.id, exc.reason)
        return Settlement(delivery=delivery, outcome="ack")

    def release(self, delivery: Delivery) -> Settlement:
        """Give a delivery back unstarted (or cancelled at shutdown), no attempt counted."""
        self.counters.released += 1
        return Settlement(delivery=delivery, outcome="release")


OUTCOMES = ("ack", "retry", "dead", "drop", "duplicate", "released")
"""The ``eventfn.outcome`` of a handled message, as spans and the ``eventfn.handled`` metric
name it."""


def _links(deliveries: list[Delivery]) -> list[Link]:
    """Links to the ``send`` span of each message of a batch (the conventions' batch shape)."""
    links = []
    for delivery in deliveries:
        with contextlib.suppress(DecodeError):
            envelope = decode_envelope(delivery.body)
            parent = telemetry.extract(envelope.traceparent, envelope.tracestate)
            if parent is not None:
                links.append(Link(trace.get_current_span(parent).get_span_context()))
    return links


def _end_batch_span(span: Any, outcomes: list[str], settlements: list[Settlement]) -> None:
    failed = [s for s in settlements if s.outcome != "ack"]
    kinds = set(outcomes)
    span.set_attribute(telemetry.OUTCOME, kinds.pop() if len(kinds) == 1 else "partial")
    span.set_attribute("eventfn.failed_count", len(failed))
    first = next((s.failure for s in failed if s.failure is not None), None)
    if first is not None:
        telemetry.record_failure(span, first.error_type, first.message, first.traceback)
    span.end()


def _drop_label(exc: Drop) -> str:
    return "duplicate" if isinstance(exc, Duplicate) else "drop"


def _end_process_span(span: Any, outcome: str, settlement: Settlement | None) -> None:
    span.set_attribute(telemetry.OUTCOME, outcome)
    failure = settlement.failure if settlement is not None else None
    if failure is not None:
        telemetry.record_failure(span, failure.error_type, failure.message, failure.traceback)
    span.end()


def _qualified(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return (
        cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
    )
