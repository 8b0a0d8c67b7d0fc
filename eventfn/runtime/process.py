"""One delivery to one settlement: decode, invoke, classify. Each step testable alone."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from eventfn import context as _context
from eventfn.app import App
from eventfn.batch import BatchItemFailed, BatchResult
from eventfn.brokers.base import Delivery, Failure, Settlement
from eventfn.context import Context
from eventfn.events import Envelope, decode_envelope
from eventfn.exceptions import DeadLetter, DecodeError, Drop, Duplicate
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

    def build(self, env: Environment) -> None:
        """Compose the middleware chain (once, at runner start-up)."""
        self.call = build_chain(self.subscription, self.middleware, env)

    async def __call__(self, delivery: Delivery) -> Settlement:
        try:
            envelope = decode_envelope(delivery.body)
            ctx = Context(self.app, self.name, delivery, envelope)
            args = self.subscription.build_args(envelope, ctx)
        except DecodeError as exc:
            return self._dead(delivery, exc, poison=True)
        token = _context._current.set(ctx)
        try:
            await self.call(Invocation(self.subscription, delivery, envelope, args, ctx))
        except Drop as exc:
            return self._drop(delivery, exc)
        except DeadLetter as exc:
            return self._dead(delivery, exc)
        except Exception as exc:
            return self._failed(delivery, exc)
        finally:
            _context._current.reset(token)
        self.counters.handled += 1
        if self.breaker is not None and self.breaker.state != "closed":
            self.breaker.success()
        elif self.breaker is not None:
            self.breaker.failures = 0
        if log.isEnabledFor(logging.INFO):
            log.info("handled %s id=%s attempt=%d", self.name, delivery.id, delivery.attempt)
        return Settlement(delivery=delivery, outcome="ack", emitted=tuple(ctx.emitted))

    async def run_batch(self, deliveries: list[Delivery]) -> list[Settlement]:
        """Run a batch handler once on several deliveries; one settlement for each."""
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
        ctx = Context(self.app, self.name, first, envelope)
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
        self, good: list[tuple[Delivery, Envelope, list[Any]]], result: Any, ctx: Context
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
        log.info("dropped %s id=%s: %s", self.name, delivery.id, exc.reason)
        return Settlement(delivery=delivery, outcome="ack")

    def release(self, delivery: Delivery) -> Settlement:
        """Give a delivery back unstarted (or cancelled at shutdown), no attempt counted."""
        self.counters.released += 1
        return Settlement(delivery=delivery, outcome="release")


def _qualified(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return (
        cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
    )
