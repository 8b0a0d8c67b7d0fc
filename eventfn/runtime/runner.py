"""The runner: fetch what there is room for, dispatch with bounds and per-key lanes, settle.

Capacity is counted in messages the runner holds (leased, fetched, not yet finished):
at most ``concurrency`` run at once (one worker task each) and at most ``prefetch`` more wait,
leased, to keep the workers fed. A fetch asks the broker only for free room, so memory stays
flat however large the backlog is.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, contextmanager
from functools import partial
from typing import Any

import anyio
import msgspec

from eventfn import telemetry
from eventfn.app import App
from eventfn.brokers.base import (
    Broker,
    Delivery,
    Settlement,
    SubscriptionRef,
    SubscriptionStats,
)
from eventfn.middleware import DEFAULT_MIDDLEWARE, Environment, Middleware
from eventfn.runtime.process import Counters, Processor
from eventfn.runtime.settler import Settler
from eventfn.subscriptions import Subscription

log = logging.getLogger("eventfn.runner")

BACKLOG_INTERVAL = 5.0
"""Seconds between reads of the broker counts behind the backlog gauges (metrics on only)."""


class SubscriptionSummary(msgspec.Struct, frozen=True):
    """What one subscription did during a run."""

    subscription: str
    handler: str
    handled: int
    retried: int
    dead_lettered: int
    dropped: int


class Summary(msgspec.Struct, frozen=True):
    """What a run did, per subscription, and how long it took."""

    subscriptions: list[SubscriptionSummary]
    elapsed: float

    @property
    def handled(self) -> int:
        return sum(s.handled for s in self.subscriptions)

    @property
    def retried(self) -> int:
        return sum(s.retried for s in self.subscriptions)

    @property
    def dead_lettered(self) -> int:
        return sum(s.dead_lettered for s in self.subscriptions)


class _Consumer:
    """The runner's side of one subscription."""

    def __init__(self, subscription: Subscription, processor: Processor, limit: int) -> None:
        self.subscription = subscription
        self.ref: SubscriptionRef = subscription.ref
        self.processor = processor
        self.limit = limit
        self.refill = max(1, limit // 2)
        self.held = 0
        self.ordered = subscription.ref.kind == "stream"
        self.lanes: dict[str, deque[Delivery]] = {}
        # a batch subscription keeps its own buffer and tasks, outside the worker pool
        self.batch = subscription.batch
        self.buffer: deque[Delivery] = deque()
        self.more = anyio.Event()
        if self.batch is not None:
            batches = subscription.concurrency or 1
            self.limit = self.batch[0] * (batches + 1)
            self.refill = self.batch[0]


class Runner:
    """Consumes every subscription of an app from one broker.

    Args:
        concurrency: handlers running at once, across all subscriptions.
        prefetch: leased messages held beyond ``concurrency`` (default: ``concurrency``).
        lease: seconds a delivery stays hidden from other consumers; extended while held.
        grace: seconds in-flight handlers get to finish at shutdown before they are cancelled.
        burst: stop once nothing is waiting (delayed retries included) and report.
        poll: longest wait of one fetch for new messages.
        sources: start the app's bucket watchers and schedulers (``False``: the caller runs
            them, as ``eventfn.testing.TestRuntime`` does on its virtual clock).
    """

    def __init__(
        self,
        app: App,
        broker: Broker,
        *,
        concurrency: int = 64,
        prefetch: int | None = None,
        lease: float = 30.0,
        grace: float = 30.0,
        burst: bool = False,
        poll: float = 0.5,
        fetch_max: int = 256,
        middleware: Sequence[Middleware] = DEFAULT_MIDDLEWARE,
        sources: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.app = app
        self.broker = broker
        self.concurrency = concurrency
        self.prefetch = concurrency if prefetch is None else max(0, prefetch)
        self.limit = self.concurrency + self.prefetch
        self.lease = lease
        self.grace = grace
        self.burst = burst
        self.poll = poll
        self.fetch_max = fetch_max
        self.sources = sources
        self._consumers = [
            _Consumer(
                sub,
                Processor(app, sub, middleware, broker.clock),
                min(self.limit, sub.concurrency or self.limit),
            )
            for sub in app.subscriptions
        ]
        self._ready: deque[tuple[_Consumer, Delivery]] = deque()
        self._leased: dict[int, Delivery] = {}
        self._held = 0
        self._running = 0
        self.peak_running = 0
        self.peak_held = 0
        self._waiting: deque[anyio.Event] = deque()  # one per worker with nothing to do
        self._room = anyio.Event()
        self._stop = anyio.Event()
        self._idle = anyio.Event()
        self._stopping = False
        self._settler = Settler(broker)
        self._started = 0.0
        self._metered = False
        self.env = Environment(broker, broker.clock)

    # -- control ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a graceful shutdown: stop fetching, finish in-flight work, release the rest."""
        if not self._stopping:
            log.info("stopping: finishing %d in-flight handlers", self._running)
        self._stopping = True
        self._stop.set()
        self._wake(len(self._waiting))
        self._room.set()
        for consumer in self._consumers:
            consumer.more.set()

    def summary(self) -> Summary:
        """Counts so far, per subscription."""
        return Summary(
            subscriptions=[_summarize(c) for c in self._consumers],
            elapsed=time.monotonic() - self._started if self._started else 0.0,
        )

    async def run(self) -> Summary:
        """Run until :meth:`stop` (or, in burst mode, until drained); returns the summary."""
        if not self._consumers:
            raise ValueError(f"app {self.app.name!r} has no handlers to run")
        self._started = time.monotonic()
        await self.broker.declare([c.ref for c in self._consumers])
        async with AsyncExitStack() as resources:
            await self._open(resources)
            await self._run()
        return self.summary()

    async def _open(self, resources: AsyncExitStack) -> None:
        """Enter the app's lifespan, open what the middleware needs, build every chain."""
        await resources.enter_async_context(self.app.running())
        if any(c.subscription.options.idempotent for c in self._consumers):
            from eventfn.idempotency import open_store

            self.env.idempotency = await resources.enter_async_context(
                open_store(self.app, self.broker)
            )
        for consumer in self._consumers:
            consumer.processor.build(self.env)
        processors = [c.processor for c in self._consumers]
        self._settler.observed = any(p.tracer or p.meters for p in processors)
        self._metered = any(p.meters for p in processors)

    async def _run(self) -> None:
        async with anyio.create_task_group() as outer:
            if self.sources and (self.app.watched or self.app.schedules):
                from eventfn.runtime.sources import run_sources

                await outer.start(partial(run_sources, self.app, self.broker, burst=self.burst))
            outer.start_soon(self._settler.run)
            outer.start_soon(self._keep_leases)
            if self._metered:
                outer.start_soon(self._observe_backlog)
            try:
                await self._consume()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(max(5.0, self.grace)):
                    self._release_unstarted()
                    self._settler.close()
                    await self._settler.wait_flushed()
                outer.cancel_scope.cancel()

    async def _consume(self) -> None:
        async with anyio.create_task_group() as inner:
            inner.start_soon(self._stopper, inner.cancel_scope)
            for consumer in self._consumers:
                inner.start_soon(self._fetch_loop, consumer)
                if consumer.batch is not None:
                    for _ in range(consumer.subscription.concurrency or 1):
                        inner.start_soon(self._batch_loop, consumer)
            for _ in range(self.concurrency):
                inner.start_soon(self._worker)
            if self.burst:
                inner.start_soon(self._watch_burst)

    async def _stopper(self, scope: anyio.CancelScope) -> None:
        await self._stop.wait()
        with anyio.move_on_after(self.grace):
            while self._running:
                self._idle = anyio.Event()
                await self._idle.wait()
            return
        log.warning("grace period of %.1fs over: cancelling %d handlers", self.grace, self._running)
        scope.cancel()

    # -- fetching -----------------------------------------------------------------------------

    def _room_for(self, consumer: _Consumer) -> int:
        if consumer.batch is not None:
            room = min(consumer.limit - consumer.held, self.fetch_max)
            return room if room >= consumer.refill or consumer.held == 0 else 0
        room = min(self.limit - self._held, consumer.limit - consumer.held, self.fetch_max)
        if room >= min(consumer.refill, self.limit - self._held) or consumer.held == 0:
            return room
        return 0

    async def _fetch_loop(self, consumer: _Consumer) -> None:
        backoff = 0.1
        breaker = consumer.processor.breaker
        while not self._stopping:
            room = self._room_for(consumer)
            if breaker is not None and breaker.state != "closed":
                if pause := breaker.wait_time():
                    with anyio.move_on_after(pause):
                        await self._stop.wait()
                    continue
                room = breaker.room(room)
            if room <= 0:
                self._room = anyio.Event() if self._room.is_set() else self._room
                await self._room.wait()
                continue
            try:
                with anyio.fail_after(self.poll + 60):
                    batch = await self.broker.fetch(
                        consumer.ref, room, lease=self.lease, wait=self.poll
                    )
            except Exception as exc:
                log.warning(
                    "fetch %s failed, retrying in %.1fs: %s: %s",
                    consumer.ref.name,
                    backoff,
                    type(exc).__name__,
                    exc,
                )
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.1
            if batch:
                self._accept(consumer, batch)
            elif breaker is not None:
                breaker.probing = False  # nothing came to probe with: try again

    def _accept(self, consumer: _Consumer, batch: list[Delivery]) -> None:
        if self._stopping:
            for delivery in batch:
                self._settler.add(consumer.processor.release(delivery))
            return
        consumer.held += len(batch)
        for delivery in batch:
            self._leased[id(delivery)] = delivery
        if consumer.batch is not None:
            consumer.buffer.extend(batch)
            consumer.more.set()
            consumer.more = anyio.Event()
            return
        self._held += len(batch)
        self.peak_held = max(self.peak_held, self._held)
        for delivery in batch:
            self._ready.append((consumer, delivery))
        self._wake(len(batch))

    def _wake(self, count: int) -> None:
        """Wake at most ``count`` idle workers: as many as there is new work for, not all of
        them (a broker that hands over a few messages per fetch would otherwise wake every
        idle worker for every fetch, only for most to find nothing and wait again)."""
        waiting = self._waiting
        while count > 0 and waiting:
            waiting.popleft().set()
            count -= 1

    def _release_unstarted(self) -> None:
        while self._ready:
            consumer, delivery = self._ready.popleft()
            self._finish(consumer, delivery, consumer.processor.release(delivery))
        for consumer in self._consumers:
            while consumer.buffer:
                delivery = consumer.buffer.popleft()
                self._finish(consumer, delivery, consumer.processor.release(delivery))
            for lane in consumer.lanes.values():
                while lane:
                    delivery = lane.popleft()
                    self._finish(consumer, delivery, consumer.processor.release(delivery))
            consumer.lanes.clear()

    # -- dispatching ----------------------------------------------------------------------------

    async def _worker(self) -> None:
        ready = self._ready
        while True:
            while ready and not self._stopping:
                consumer, delivery = ready.popleft()
                await self._dispatch(consumer, delivery)
            if self._stopping:
                return
            wake = anyio.Event()
            self._waiting.append(wake)
            await wake.wait()

    async def _dispatch(self, consumer: _Consumer, delivery: Delivery) -> None:
        breaker = consumer.processor.breaker
        if breaker is not None and breaker.blocks:
            # its dependency is down: give it back unstarted rather than burn an attempt
            self._finish(consumer, delivery, consumer.processor.release(delivery))
            return
        key = delivery.key if consumer.ordered else None
        if key is None:
            await self._run_one(consumer, delivery)
            return
        lane = consumer.lanes.get(key)
        if lane is not None:
            lane.append(delivery)  # its key is busy: it runs after the one before it
            return
        lane = consumer.lanes[key] = deque()
        try:
            current: Delivery | None = delivery
            while current is not None:
                outcome = await self._run_one(consumer, current)
                if outcome != "ack" or self._stopping:
                    # a retry holds its key: later records wait until it is settled
                    while lane:
                        later = lane.popleft()
                        self._finish(consumer, later, consumer.processor.release(later))
                current = lane.popleft() if lane else None
        finally:
            del consumer.lanes[key]

    @contextmanager
    def _slot(self, consumer: _Consumer, deliveries: Sequence[Delivery]) -> Iterator[None]:
        """Count a running handler call; if it is cancelled, give its deliveries back."""
        self._running += 1
        self.peak_running = max(self.peak_running, self._running)
        try:
            yield
        except anyio.get_cancelled_exc_class():
            for delivery in deliveries:
                self._finish(consumer, delivery, consumer.processor.release(delivery))
            raise
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def _run_one(self, consumer: _Consumer, delivery: Delivery) -> str:
        with self._slot(consumer, (delivery,)):
            settlement = await consumer.processor(delivery)
        self._finish(consumer, delivery, settlement)
        return settlement.outcome

    def _finish(self, consumer: _Consumer, delivery: Delivery, settlement: Settlement) -> None:
        self._settler.add(settlement)
        self._leased.pop(id(delivery), None)
        consumer.held -= 1
        if consumer.batch is None:
            self._held -= 1
        self._room.set()

    async def _batch_loop(self, consumer: _Consumer) -> None:
        assert consumer.batch is not None
        size, wait = consumer.batch
        while await self._gather(consumer, size, wait):
            items = [consumer.buffer.popleft() for _ in range(min(size, len(consumer.buffer)))]
            with self._slot(consumer, items):
                settlements = await consumer.processor.run_batch(items)
            for settlement in settlements:
                self._finish(consumer, settlement.delivery, settlement)

    async def _gather(self, consumer: _Consumer, size: int, wait: float) -> bool:
        """Wait for a full batch, or for ``wait`` seconds after its first item; False at stop."""
        while not consumer.buffer:
            if self._stopping:
                return False
            await consumer.more.wait()
        with anyio.move_on_after(wait):
            while len(consumer.buffer) < size and not self._stopping:
                await consumer.more.wait()
        return not self._stopping and bool(consumer.buffer)

    # -- background duties ---------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        while True:
            await anyio.sleep(self.lease / 3)
            held = list(self._leased.values())
            if not held:
                continue
            try:
                await self.broker.extend(held, self.lease)
            except Exception as exc:
                log.warning(
                    "extending %d leases failed: %s: %s", len(held), type(exc).__name__, exc
                )

    async def _observe_backlog(self) -> None:
        """Report counts to the observable instruments; read broker counts now and then."""
        source = _Observed(self)
        meters = self._consumers[0].processor.meters
        assert meters is not None
        meters.sources.add(source)
        try:
            while True:
                for consumer in self._consumers:
                    try:
                        source.stats[consumer.ref.name] = await self.broker.stats(consumer.ref)
                    except Exception as exc:
                        source.stats.pop(consumer.ref.name, None)  # unknown, rather than stale
                        log.debug("backlog of %s unreadable: %s", consumer.ref.name, exc)
                await anyio.sleep(BACKLOG_INTERVAL)
        finally:  # a stopped runner reports no backlog, and its final counts from then on
            meters.sources.discard(source)
            meters.sources.add(_Final(list(source.observe("handled"))))

    async def _watch_burst(self) -> None:
        pause = 0.05
        while not self._stopping:
            await anyio.sleep(pause)
            pause = 0.05
            if self._held or not self._settler.idle or any(c.held for c in self._consumers):
                continue
            pending = 0
            try:
                for consumer in self._consumers:
                    pending += (await self.broker.stats(consumer.ref)).pending
            except Exception as exc:  # the broker is down: the fetch loops reconnect; look again
                log.warning("burst: cannot read the backlog: %s: %s", type(exc).__name__, exc)
                pause = 2.0  # once per outage second or two, not every 50 ms
                continue
            if pending == 0 and not self._held and self._settler.idle:
                log.info("burst: nothing left to handle")
                self.stop()
                return


class _Observed:
    """A runner's counts for the observable instruments (read from the reader's thread)."""

    def __init__(self, runner: Runner) -> None:
        self.processors = [c.processor for c in runner._consumers]
        self.stats: dict[str, SubscriptionStats] = {}

    def observe(self, metric: str) -> telemetry.Observed:
        for processor in self.processors:
            if metric == "handled":
                for outcome, value in processor.counters.by_outcome():
                    yield value, processor.by_outcome[outcome]
            elif metric == "in_flight":
                yield processor.running, processor.attributes
            elif (stats := self.stats.get(processor.name)) is not None:
                counts = {
                    "backlog": stats.ready + stats.delayed,
                    "leased": stats.in_flight,
                    "dead_letters": stats.dead,
                }
                yield counts[metric], processor.attributes


class _Final:
    """What a stopped runner still reports: how many messages it handled, by outcome."""

    def __init__(self, handled: list[tuple[float, Mapping[str, Any]]]) -> None:
        self.handled = handled

    def observe(self, metric: str) -> telemetry.Observed:
        return self.handled if metric == "handled" else ()


def _summarize(consumer: _Consumer) -> SubscriptionSummary:
    counters: Counters = consumer.processor.counters
    return SubscriptionSummary(
        subscription=consumer.ref.name,
        handler=consumer.subscription.name,
        handled=counters.handled,
        retried=counters.retried,
        dead_lettered=counters.dead_lettered,
        dropped=counters.dropped,
    )


def format_summary(summary: Summary) -> str:
    """The summary as a small table for a terminal."""
    rows = [("subscription", "handled", "retried", "dead-lettered", "dropped")]
    rows += [
        (s.subscription, str(s.handled), str(s.retried), str(s.dead_lettered), str(s.dropped))
        for s in summary.subscriptions
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    rate = summary.handled / summary.elapsed if summary.elapsed > 0 else math.nan
    lines.append(
        f"handled {summary.handled}, retried {summary.retried}, dead-lettered "
        f"{summary.dead_lettered} in {summary.elapsed:.2f}s ({rate:,.0f}/s)"
    )
    return "\n".join(lines)
