"""Tools for testing with eventfn: :class:`TestRuntime`, :func:`s3_notification`, and the broker
conformance kit.

``TestRuntime`` runs an app on the real pipeline (the runner, its retries, dead letters,
idempotency and per-key order) over a private in-memory broker whose clock is virtual: backoff
delays and schedules pass in ``await rt.clock.advance(...)`` or ``await rt.drain()``, not in
real time. See :class:`TestRuntime` for an example.

``check_broker`` runs every contract of ``DESIGN.md`` section 7 against a broker, so that a third
party's adapter is held to the same rules as eventfn's own (the project's broker suite uses it)::

    from eventfn.testing import check_broker

    async def test_my_broker() -> None:
        await check_broker(lambda: MyBroker("my://127.0.0.1/test"))
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.lowlevel

from eventfn._conformance import CHECKS, check_broker
from eventfn._testing_records import Emitted, HandlerCall, record, s3_notification
from eventfn._virtual import NotIdle, VirtualBroker, VirtualClock, epoch, wait_changed
from eventfn.app import App
from eventfn.brokers.base import DeadLetterRecord
from eventfn.exceptions import ConfigurationError, Drop, Duplicate
from eventfn.idempotency import MemoryIdempotencyStore
from eventfn.middleware import DEFAULT_MIDDLEWARE, Call, Environment, Invocation, Middleware
from eventfn.runtime.runner import Runner
from eventfn.runtime.sources import publish_tick, run_sources
from eventfn.sources.records import UploadRecord
from eventfn.sources.schedule import Schedule, Tick
from eventfn.subscriptions import Subscription

__all__ = [
    "CHECKS",
    "Emitted",
    "HandlerCall",
    "NotIdle",
    "TestRuntime",
    "VirtualClock",
    "check_broker",
    "s3_notification",
]


class TestRuntime:
    """Runs an app on the real runner over a private ``memory://`` broker on virtual time.

    Handlers go through the default middleware (idempotency, rate limits, timeouts), the
    runner's retries with backoff, dead letters and per-key order. Time moves only by
    ``await rt.clock.advance(s)`` and ``await rt.drain()``, which steps through every backoff
    and schedule on the way, so a test of retries or a day of schedules takes milliseconds.
    Schedulers run on the virtual clock; bucket watchers are off unless ``watch=True``
    (``rt.upload`` publishes its event itself). ``app.buckets.root`` is a temporary directory
    for the runtime's life. What happened stays readable after the block::

        import msgspec

        import eventfn
        from eventfn.testing import TestRuntime


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

    Enter it in the test's own task (``async with`` in the test body), not in a fixture that
    pytest-asyncio may set up in another task.

    Args:
        start: the virtual time at entry: epoch seconds or a datetime (naive: UTC); default now.
        watch: also run the bucket watchers (real file events, outside :meth:`drain`'s view).
        timeout: real seconds :meth:`drain` and each step of ``advance`` wait to become idle
            before raising :class:`NotIdle`, which says what is pending.
        concurrency: the runner's ``concurrency``.
        middleware: the chain inside the recorder (default: the runner's default chain).
    """

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(
        self,
        app: App,
        *,
        start: float | datetime | None = None,
        watch: bool = False,
        timeout: float = 10.0,
        concurrency: int = 64,
        middleware: Sequence[Middleware] = DEFAULT_MIDDLEWARE,
    ) -> None:
        self.app = app
        self.watch = watch
        self.timeout = timeout
        self.clock = VirtualClock(start)
        self.url = f"memory://testruntime-{uuid.uuid4().hex}"
        self.broker = VirtualBroker(self.url, self.clock)
        self.runner = Runner(
            app,
            self.broker,
            concurrency=concurrency,
            grace=1.0,
            middleware=(self._recorder, *middleware),
            sources=False,
        )
        self.calls: list[HandlerCall] = []
        """Every call of a handler, in the order they ended (duplicates skipped by the
        idempotency layer are left out)."""
        self.emitted: list[Emitted] = []
        self._stack = AsyncExitStack()
        self._built = 0
        self._up = anyio.Event()
        self._done = anyio.Event()
        self._crash: BaseException | None = None

    # -- what happened ------------------------------------------------------------------------

    @property
    def handled(self) -> list[HandlerCall]:
        """Calls that returned: the handler succeeded."""
        return [c for c in self.calls if c.error is None]

    @property
    def failures(self) -> list[HandlerCall]:
        """Calls that raised (an error, ``Retry`` or ``DeadLetter``; not ``Drop``)."""
        return [c for c in self.calls if c.error is not None and not isinstance(c.error, Drop)]

    def handled_by(self, handler: Callable[..., Any]) -> list[Any]:
        """The events ``handler`` handled successfully, in order.

        >>> assert rt.handled_by(reserve_inventory) == [OrderAccepted(order_id="o1")]
        """
        return [c.event for c in self.handled if c.function is handler]

    def attempts_of(self, handler: Callable[..., Any]) -> list[HandlerCall]:
        """Every call of ``handler``, failed ones included."""
        return [c for c in self.calls if c.function is handler]

    async def dead_letters(self, subscription: str | None = None) -> list[DeadLetterRecord]:
        """The dead-letter records on the runtime's broker (all, or one subscription's).

        >>> [record] = await rt.dead_letters("order-events/charge")
        """
        return await self.broker.dead_letters(subscription, limit=1_000_000)

    # -- making things happen -----------------------------------------------------------------

    async def publish(self, destination: str, data: Any, **options: Any) -> str:
        """``app.publish`` on the runtime's broker (``type=``, ``key=``, ``id=``, ``delay=``...)."""
        return await self.app.publish(destination, data, **options)

    async def emit(self, event: Any, *, key: str | None = None, subject: str | None = None) -> str:
        """``app.emit``: a domain event on the app's event bus."""
        return await self.app.emit(event, key=key, subject=subject)

    async def upload(
        self,
        bucket: str,
        key: str,
        data: bytes | AsyncIterable[bytes] | BinaryIO = b"",
        *,
        content_type: str | None = None,
    ) -> UploadRecord:
        """Store an object in the runtime's temporary bucket and publish its ``created`` event
        (when the app has an ``on_upload`` handler for the bucket).

        >>> await rt.upload("invoices", "2026/scan 1.pdf", b"%PDF", content_type="application/pdf")
        """
        return await self.app.buckets[bucket].put(key, data, content_type=content_type)

    async def tick(
        self, schedule: str | Callable[..., Any], at: float | datetime | None = None
    ) -> Tick:
        """Publish one tick of a schedule (its name or its handler), due ``at`` (default: its
        next due instant). The scheduler's own tick of that instant is then a duplicate.

        >>> await rt.tick("nightly")
        """
        spec = self._schedule(schedule)
        due = spec.next_due(self.clock()) if at is None else epoch(at)
        tick = spec.tick(due)
        await publish_tick(self.app, self.broker, spec, tick)
        return tick

    def _schedule(self, schedule: str | Callable[..., Any]) -> Schedule:
        for sub in self.app.subscriptions:
            spec = self.app.schedules.get(sub.ref.name)
            if spec is not None and (spec.name == schedule or sub.handler is schedule):
                return spec
        known = sorted(s.name for s in self.app.schedules.values())
        raise ConfigurationError(f"app {self.app.name!r} has no schedule {schedule!r}: {known}")

    async def drain(
        self,
        *,
        advance: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 (its error names what is pending)
    ) -> None:
        """Return once idle: nothing ready, nothing running, every settlement applied.

        With ``advance`` (the default) it also moves the virtual clock to each delayed
        delivery (retries waiting out their backoff) until none is left; schedules on the way
        fire. ``advance=False`` handles only what is due now. Raises :class:`NotIdle` after
        ``timeout`` real seconds (default: the runtime's).

        >>> await rt.drain()  # five attempts with backoff, then the dead-letter queue
        """
        limit = self.timeout if timeout is None else timeout
        with anyio.move_on_after(limit) as scope:
            await self.settle()
            while advance and (due := self.broker.next_due()) is not None:
                await self.clock.advance_to(due)
        if scope.cancelled_caught:
            raise NotIdle(self._pending(f"drain() not idle after {limit}s of real time"))

    # -- the clock's driver -------------------------------------------------------------------

    async def settle(self) -> None:
        """Wait until idle at the current virtual time (what the clock does at each step).

        Idle is read from the broker: no message ready, none leased (a leased one is running,
        prefetched or being settled), and no woken scheduler still to run; seen twice, with
        the other tasks having had a turn in between.
        """
        deadline = anyio.current_time() + self.timeout
        quiet = 0
        while quiet < 2:
            if self._done.is_set():
                raise RuntimeError("the TestRuntime's runner has stopped") from self._crash
            backlog = self.broker.backlog()
            leased = any(b.leased for b in backlog)
            if leased or self.clock.busy or any(b.ready for b in backlog):
                quiet = 0
                if anyio.current_time() > deadline:
                    raise NotIdle(self._pending(f"not idle after {self.timeout}s of real time"))
            else:
                quiet += 1
            if leased:  # handlers run, maybe awaiting real I/O: wait for a settle
                await wait_changed(self.broker, 0.05)
            else:
                await anyio.lowlevel.checkpoint()

    def next_due(self) -> float | None:
        return self.broker.next_due()

    def moved(self) -> None:
        # only when a delayed delivery came due: a publish wakes the fetches itself, and waking
        # them at every scheduler nap would cost a fetch round each
        if any(b.ready for b in self.broker.backlog()):
            self.broker.wake()

    def _pending(self, what: str) -> str:
        parts = [str(b) for b in self.broker.backlog() if b.ready or b.leased]
        if self.clock.busy:
            parts.append("a scheduler woke and has not run yet")
        return (
            f"TestRuntime: {what} ({'; '.join(parts) or 'nothing pending now'}); a leased "
            "message is a handler still running: is it waiting for something the test does later?"
        )

    # -- recording ----------------------------------------------------------------------------

    def _recorder(self, call_next: Call, subscription: Subscription, env: Environment) -> Call:
        self._built += 1
        if self._built == len(self.app.subscriptions):
            self._up.set()  # every chain is built: the runner is past its lifespan and stores

        async def call(invocation: Invocation) -> Any:
            try:
                result = await call_next(invocation)
            except Exception as exc:
                self._record(invocation, exc)
                raise
            self._record(invocation, None)
            return result

        return call

    def _record(self, invocation: Invocation, error: Exception | None) -> None:
        if isinstance(error, Duplicate):
            return  # the idempotency layer skipped the handler
        record(invocation, error, self.clock, self.calls, self.emitted)

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> TestRuntime:
        if self._built:
            raise RuntimeError("a TestRuntime runs once: make a new one for another run")
        try:
            await self._open(self._stack)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # closed as if the block had ended well, so that the task group does not wrap what the
        # test body raised in an ExceptionGroup: it propagates as it is
        await self._stack.aclose()

    async def _open(self, stack: AsyncExitStack) -> None:
        root = Path(tempfile.mkdtemp(prefix="eventfn-test-buckets-"))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        stack.callback(_restore_root, self.app, _swap_root(self.app, root))
        stack.callback(MemoryIdempotencyStore.reset, self.url)
        stack.callback(VirtualBroker.reset, self.url)
        self.clock.driver = self
        if await self.app.connect(self.broker) is not self.broker:
            raise ConfigurationError(
                f"app {self.app.name!r} is connected to a broker already; TestRuntime runs it "
                "on its own: close it first (await app.close())"
            )
        stack.push_async_callback(self.app.close)
        tasks = await stack.enter_async_context(anyio.create_task_group())
        stack.push_async_callback(self._stop, tasks.cancel_scope)
        tasks.start_soon(self._run)
        await self._up.wait()
        if self._crash is not None:
            raise self._crash
        if self.app.schedules or (self.watch and self.app.watched):
            sources = partial(run_sources, watch=self.watch, sleep=self.clock.sleep)
            await tasks.start(sources, self.app, self.broker)

    async def _run(self) -> None:
        try:
            await self.runner.run()
        except Exception as exc:
            self._crash = exc
        finally:
            self._done.set()
            self._up.set()

    async def _stop(self, scope: anyio.CancelScope) -> None:
        self.runner.stop()
        self.broker.interrupt()
        with anyio.move_on_after(self.runner.grace + 5.0):
            await self._done.wait()
        scope.cancel()


def _swap_root(app: App, root: Path) -> Path | None:
    # Buckets has no public way back to "not chosen": keep what was chosen, if anything
    previous: Path | None = app.buckets._chosen
    app.buckets.root = root
    return previous


def _restore_root(app: App, previous: Path | None) -> None:
    app.buckets._chosen = previous
    app.buckets._open.clear()
