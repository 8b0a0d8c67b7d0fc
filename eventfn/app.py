"""``App``: the registry of handlers, their decorators, and publishing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

import anyio
import msgspec
from opentelemetry.trace import SpanKind

from eventfn import context as _context
from eventfn import telemetry
from eventfn.brokers import DEFAULT_URL, Broker, OutgoingMessage, from_url
from eventfn.deadletters import DeadLetterQueue
from eventfn.events import (
    DEFAULT_MAX_PAYLOAD,
    Envelope,
    encode_data,
    encode_envelope,
    event_type,
    new_id,
    now_rfc3339,
)
from eventfn.exceptions import ConfigurationError, RegistrationError
from eventfn.options import HandlerOptions, resolve
from eventfn.retry import Retry
from eventfn.sources.bucketset import Buckets
from eventfn.sources.records import UploadEvent
from eventfn.sources.records import destination as upload_destination
from eventfn.sources.schedule import Schedule
from eventfn.sources.upload import UploadFilter
from eventfn.subscriptions import (
    KeyFunc,
    Subscription,
    Trigger,
    UploadSpec,
    check_name,
    handler_name,
    key_func,
    make_ref,
)

if TYPE_CHECKING:
    from eventfn.router import Router

H = TypeVar("H", bound=Callable[..., Any])
L = TypeVar("L", bound=Callable[["App"], AbstractAsyncContextManager[Any]])

DEFAULT_PARTITIONS = 16


class App:
    """An eventfn application: handlers registered by decorators, and a way to publish.

    >>> app = eventfn.App("shop")
    >>> @app.on_queue("emails")
    ... async def send(email: Email) -> None: ...

    Args:
        name: the app's name; the CloudEvents ``source`` of what it publishes is ``/name``.
        broker: broker URL used when neither ``--broker`` nor ``EVENTFN_BROKER`` says otherwise.
        event_bus: the topic that carries the domain events of ``on_event`` and ``emit``.
        max_payload: the largest encoded envelope accepted by ``publish``, in bytes.
        buckets: the directory that holds the app's local buckets (one sub-directory each),
            when neither ``--buckets`` nor ``EVENTFN_BUCKETS`` says otherwise; default
            ``./buckets``.
        max_object_size: the largest object ``Upload.read()`` loads into memory, in bytes
            (default 64 MiB); a larger one is refused with an error that points to ``open()``.
        **defaults: handler options (``retry``, ``timeout``, ``concurrency``, ``rate``,
            ``idempotent``, ...; see :class:`eventfn.options.HandlerOptions`) that every handler
            gets unless its decorator says otherwise.
    """

    def __init__(
        self,
        name: str,
        *,
        broker: str | None = None,
        event_bus: str = "events",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        buckets: str | os.PathLike[str] | None = None,
        max_object_size: int = 64 << 20,
        **defaults: Unpack[HandlerOptions],
    ) -> None:
        self.name = check_name(name, "app")
        self.source = f"/{name}"
        self.broker_url = broker
        self.event_bus = check_name(event_bus, "event bus")
        self.max_payload = max_payload
        if "emits" in defaults:
            raise RegistrationError(
                f"App({name!r}): emits= says what one handler publishes; give it to that "
                "handler's decorator, not to App(...)"
            )
        self.defaults = resolve({}, defaults, f"App({name!r})")
        self._defaults: dict[str, Any] = dict(defaults)
        self.subscriptions: list[Subscription] = []
        self._stream_keys: dict[str, KeyFunc] = {}
        self._broker: Broker | None = None
        self._owns_broker = False
        self._connect_lock = anyio.Lock()
        self.buckets = Buckets(self, buckets, max_object_size=max_object_size)
        self._lifespan: Lifespan | None = None
        self._state: Any = _NO_STATE
        self.schedules: dict[str, Schedule] = {}  # by subscription name
        self.watched: dict[str, bool] = {}  # bucket -> whether deletions are wanted

    def __repr__(self) -> str:
        return f"App({self.name!r}, subscriptions={len(self.subscriptions)})"

    @property
    def retry(self) -> Retry:
        """The app's default retry policy."""
        return self.defaults.retry

    # -- registration ---------------------------------------------------------------------

    def on_queue(
        self,
        name: str,
        *,
        batch: int | None = None,
        batch_wait: float = 0.5,
        **options: Unpack[HandlerOptions],
    ) -> Callable[[H], H]:
        """Handle work from a queue: each message goes to one consumer among all runners.

        With ``batch=N`` the handler takes a ``list`` of up to N events, gathered for at most
        ``batch_wait`` seconds, and may return ``eventfn.BatchResult(failed=[...])``.

        >>> @app.on_queue("thumbnails", concurrency=8, retry=eventfn.Retry(attempts=3))
        ... async def make_thumbnail(job: Thumbnail) -> None: ...
        """
        return self._decorator(
            "queue", name, None, options, batch=_batch(batch, batch_wait, f"on_queue({name!r})")
        )

    def on_topic(
        self,
        name: str,
        *,
        group: str | None = None,
        batch: int | None = None,
        batch_wait: float = 0.5,
        **options: Unpack[HandlerOptions],
    ) -> Callable[[H], H]:
        """Handle facts from a topic: every group gets its own copy, retries and dead letters.

        ``group`` defaults to the handler's name with ``_`` as ``-``; name it explicitly in
        production, since a renamed group starts again at new messages.

        >>> @app.on_topic("order-events", group="send-customer-email")
        ... async def email(order: OrderAccepted) -> None: ...
        """
        return self._decorator(
            "topic", name, group, options, batch=_batch(batch, batch_wait, f"on_topic({name!r})")
        )

    def on_stream(
        self,
        name: str,
        *,
        key: str | KeyFunc | None = None,
        group: str | None = None,
        partitions: int = DEFAULT_PARTITIONS,
        skip_key_on_error: bool = False,
        **options: Unpack[HandlerOptions],
    ) -> Callable[[H], H]:
        """Handle an ordered stream: records of one key one at a time, in publish order.

        ``key`` (an attribute name or a function of the event) gives the partition key of
        records this app publishes to the stream without an explicit ``key=``. A record that
        fails holds back the later records of its key while it waits for its retry; with
        ``skip_key_on_error=True`` it is dead-lettered at once instead and its key moves on.

        >>> @app.on_stream("clicks", key="user_id", group="sessionize")
        ... async def sessionize(click: Click) -> None: ...
        """
        keyfn = key_func(key, f"on_stream({name!r})")
        if keyfn is not None:
            self._stream_keys[name] = keyfn
        return self._decorator(
            "stream",
            name,
            group,
            options,
            key=keyfn,
            partitions=partitions,
            skip_key_on_error=skip_key_on_error,
        )

    def on_event(
        self,
        event: type[Any],
        *,
        group: str | None = None,
        **options: Unpack[HandlerOptions],
    ) -> Callable[[H], H]:
        """Handle a domain event (a ``msgspec.Struct``) from the app's event bus.

        >>> @app.on_event(OrderAccepted, group="reserve-inventory")
        ... async def reserve(event: OrderAccepted) -> None: ...
        """
        if not (isinstance(event, type) and issubclass(event, msgspec.Struct)):
            raise RegistrationError(
                f"on_event({event!r}): the event must be a msgspec.Struct class; "
                "define it as `class OrderAccepted(msgspec.Struct): ...`"
            )
        return self._decorator(
            "event", self.event_bus, group, options, types=(event_type(event),), event=event
        )

    def on_upload(
        self,
        bucket: str,
        *,
        match: str | Sequence[str] | None = None,
        prefix: str | None = None,
        suffix: str | None = None,
        events: Sequence[UploadEvent] = ("created",),
        group: str | None = None,
        **options: Unpack[HandlerOptions],
    ) -> Callable[[H], H]:
        """Handle objects stored in a bucket, once each, after they are complete.

        ``match`` is a shell pattern on the key (``*`` also crosses ``/``), or a list of them
        (any may match); ``prefix`` and ``suffix`` narrow it further;
        ``events=["created", "deleted"]`` adds deletions. The runner watches the local bucket
        directory (``--buckets``); S3 and MinIO notifications published to the bucket's
        destination (``bucket.<name>``) reach the same handlers.

        >>> @app.on_upload(bucket="invoices", match="*.pdf")
        ... async def extract(upload: eventfn.Upload) -> None: ...
        """
        where = f"on_upload(bucket={bucket!r})"
        check_name(bucket, "bucket")
        wanted = _upload_filter(events, match, prefix, suffix, where)
        self.watched[bucket] = self.watched.get(bucket, False) or "deleted" in wanted.events
        return self._decorator(
            "upload",
            upload_destination(bucket),
            group,
            options,
            upload=(wanted, self.buckets.local),
        )

    def on_schedule(
        self,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        tz: str | None = None,
        missed: str = "skip",
        name: str | None = None,
        **options: Unpack[HandlerOptions],
    ) -> Callable[[H], H]:
        """Run a handler on a schedule: ``cron`` (in ``tz``, default UTC) or ``every`` seconds.

        Each tick is a message whose id comes from the schedule's name and due time, so with
        several runners it is handled once. ``missed`` says what a runner that starts after
        ticks were due does: ``"skip"`` them, or run the ``"last"`` one.

        >>> @app.on_schedule(cron="0 2 * * *", tz="Europe/Berlin", missed="last")
        ... async def reconcile(tick: eventfn.Tick) -> None: ...
        """

        def register(fn: H) -> H:
            chosen = name or fn.__name__.replace("_", "-")
            where = f"handler {handler_name(fn)}"
            check_name(chosen, "schedule")
            spec = Schedule.parse(chosen, cron=cron, every=every, tz=tz, missed=missed, where=where)
            self._decorator("schedule", f"schedule.{chosen}", None, options)(fn)
            self.schedules[self.subscriptions[-1].ref.name] = spec
            return fn

        return register

    def _decorator(
        self,
        trigger: Trigger,
        destination: str,
        group: str | None,
        options: Mapping[str, Any],
        *,
        key: KeyFunc | None = None,
        partitions: int = 1,
        types: tuple[str, ...] | None = None,
        event: type[Any] | None = None,
        batch: tuple[int, float] | None = None,
        skip_key_on_error: bool = False,
        upload: UploadSpec | None = None,
    ) -> Callable[[H], H]:
        check_name(destination, "destination")
        if group is not None:
            check_name(group, "group")

        def register(fn: H) -> H:
            where = f"handler {handler_name(fn)}"
            chosen = group
            if trigger not in ("queue", "schedule") and group is None:
                chosen = fn.__name__.replace("_", "-")
            sub = Subscription(
                trigger=trigger,
                ref=make_ref(trigger, destination, chosen, types=types, partitions=partitions),
                handler=fn,
                options=resolve(self._defaults, options, where),
                key=key,
                batch=batch,
                skip_key_on_error=skip_key_on_error,
                upload=upload,
            )
            if event is not None and sub.data_type not in (None, event):
                raise RegistrationError(
                    f"{where} subscribes to {event.__name__} but its event parameter is "
                    f"{sub.data_type!r}; annotate it as {event.__name__}"
                )
            self._add(sub)
            return fn

        return register

    def _add(self, sub: Subscription) -> None:
        for other in self.subscriptions:
            if other.ref.name == sub.ref.name:
                fix = (
                    "a queue has one handler; use a topic for several reactions"
                    if sub.ref.kind == "queue"
                    else "give each handler its own group="
                )
                raise RegistrationError(
                    f"handler {sub.name}: {sub.ref.name!r} is already handled by "
                    f"{other.name}; {fix}"
                )
            if other.ref.destination == sub.ref.destination and other.ref.kind != sub.ref.kind:
                raise RegistrationError(
                    f"handler {sub.name}: {sub.ref.destination!r} is a {other.ref.kind} "
                    f"(handled by {other.name}), not a {sub.ref.kind}; use another name"
                )
        self.subscriptions.append(sub)

    # -- structure: routers and the lifespan ------------------------------------------------------

    def include(self, router: Router, *, prefix: str = "") -> None:
        """Register a router's handlers on this app; ``prefix`` goes before the names of its
        queues, topics, streams and schedules (not event types or buckets).

        >>> app.include(billing.router, prefix="billing.")
        """
        router.register(self, prefix)

    def lifespan(
        self, fn: Callable[[App], AbstractAsyncContextManager[Any]]
    ) -> Callable[[App], AbstractAsyncContextManager[Any]]:
        """Register the app's lifespan: an async context manager that opens resources once
        per runner, before the first message, and closes them at shutdown. What it yields
        is ``ctx.state`` in handlers (annotate ``ctx: eventfn.Context[Resources]``).

        >>> @app.lifespan
        ... @contextlib.asynccontextmanager
        ... async def resources(app: eventfn.App) -> AsyncIterator[Resources]:
        ...     async with httpx.AsyncClient() as http:
        ...         yield Resources(http=http)
        """
        if self._lifespan is not None:
            raise RegistrationError(
                f"app {self.name!r} has a lifespan already ({_qualname(self._lifespan)}); "
                "open every resource in one, or nest them with contextlib.AsyncExitStack"
            )
        if not callable(fn):
            raise RegistrationError(
                "@app.lifespan takes a function returning an async context manager"
            )
        self._lifespan = fn
        return fn

    @property
    def state(self) -> Any:
        """What the lifespan yielded, while a runner runs the app."""
        if self._state is _NO_STATE:
            raise ConfigurationError(
                f"app {self.name!r} has no lifespan state here: it exists while a runner (or "
                "eventfn.testing.TestRuntime) runs the app and the app has an @app.lifespan"
            )
        return self._state

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Enter the app's lifespan (if any) for the duration of a run."""
        if self._lifespan is None:
            yield
            return
        manager = self._lifespan(self)
        if not hasattr(manager, "__aenter__"):
            raise ConfigurationError(
                f"lifespan {_qualname(self._lifespan)} returned {type(manager).__name__}, not "
                "an async context manager; decorate it with @contextlib.asynccontextmanager"
            )
        async with manager as state:
            self._state = state
            try:
                yield
            finally:
                self._state = _NO_STATE

    # -- broker -----------------------------------------------------------------------------

    def resolve_url(self, url: str | None = None) -> str:
        """The broker URL: ``url``, else ``EVENTFN_BROKER``, else ``App(broker=)``, else default."""
        return url or os.environ.get("EVENTFN_BROKER") or self.broker_url or DEFAULT_URL

    @property
    def broker(self) -> Broker:
        """The connected broker (raises if the app is not connected)."""
        if self._broker is None:
            raise ConfigurationError(
                f"app {self.name!r} is not connected to a broker; use `async with app:` "
                "or `await app.connect()`, or run it with `eventfn run`"
            )
        return self._broker

    async def connect(self, url: str | Broker | None = None) -> Broker:
        """Connect to the broker (once) and declare this app's subscriptions on it."""
        async with self._connect_lock:
            if self._broker is not None:
                return self._broker
            if isinstance(url, Broker):
                broker = url
            else:
                broker = from_url(self.resolve_url(url))
                await broker.connect()
                self._owns_broker = True
            await self.declare(broker)
            self._broker = broker
            return broker

    def dead_letters(self, subscription: str | None = None) -> DeadLetterQueue:
        """The dead letters on this app's broker (all, or one subscription's).

        >>> async with app:
        ...     records = await app.dead_letters("order-events/email").list(error="DecodeError")
        ...     await app.dead_letters().replay([r.id for r in records])
        """
        return DeadLetterQueue(self.broker, subscription)

    async def declare(self, broker: Broker | None = None) -> None:
        """Create this app's destinations and subscriptions on the broker (idempotent)."""
        await (broker or self.broker).declare([sub.ref for sub in self.subscriptions])

    async def close(self) -> None:
        """Close the broker connection if this app opened it."""
        broker, self._broker = self._broker, None
        if broker is not None and self._owns_broker:
            await broker.close()
        self._owns_broker = False

    async def __aenter__(self) -> App:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- publishing ---------------------------------------------------------------------------

    def message(
        self,
        destination: str,
        data: Any,
        *,
        type: str | None = None,
        key: str | None = None,
        subject: str | None = None,
        id: str | None = None,
        delay: float = 0.0,
        now: float | None = None,
    ) -> OutgoingMessage:
        """Build (and check) the message ``publish`` would send, without sending it."""
        check_name(destination, "destination")
        published_at = self._broker.clock() if now is None and self._broker else now
        published_at = published_at if published_at is not None else _time()
        if key is None and destination in self._stream_keys:
            key = self._stream_keys[destination](data)
        if type is None:
            type = event_type(data.__class__) if isinstance(data, msgspec.Struct) else "message"
        raw, b64, content_type = encode_data(data)
        message_id = id or new_id(published_at)
        span = self._send_span(destination, message_id, type)
        parent, state = telemetry.traceparent(span) if span is not None else (None, None)
        envelope = Envelope(
            specversion="1.0",
            id=message_id,
            source=self.source,
            type=type,
            time=now_rfc3339(published_at),
            subject=subject,
            datacontenttype=content_type,
            data=raw,
            data_base64=b64,
            traceparent=parent,
            tracestate=state,
            partitionkey=key,
        )
        try:
            body = encode_envelope(envelope, self.max_payload)
        except Exception as exc:
            if span is not None:
                _end_span(span, exc)
            raise
        return OutgoingMessage(
            destination=destination,
            id=message_id,
            type=type,
            body=body,
            key=key,
            published_at=published_at,
            delay=delay,
            span=span,
        )

    def _send_span(self, destination: str, message_id: str, type: str) -> Any:
        tracer = telemetry.tracer()
        if tracer is None:
            return None
        system = self._broker.system if self._broker is not None else "eventfn"
        return tracer.start_span(
            f"send {destination}",
            kind=SpanKind.PRODUCER,
            attributes={
                telemetry.SYSTEM: system,
                telemetry.DESTINATION: destination,
                telemetry.OPERATION_TYPE: "send",
                telemetry.OPERATION_NAME: "send",
                telemetry.MESSAGE_ID: message_id,
                telemetry.EVENT_TYPE: type,
            },
        )

    async def publish(
        self,
        destination: str,
        data: Any,
        *,
        type: str | None = None,
        key: str | None = None,
        subject: str | None = None,
        id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        """Publish ``data`` to a queue, topic or stream; returns the message id.

        Inside a handler the message is held back and published only if the handler succeeds.

        >>> await app.publish("order-events", {"orderId": "o1"}, type="order.accepted")
        """
        message = self.message(
            destination, data, type=type, key=key, subject=subject, id=id, delay=delay
        )
        ctx = _context.current()
        if ctx is not None:
            ctx.emitted.append(message)
        else:
            await self.publish_many([message])
        return message.id

    async def publish_many(
        self, messages: Iterable[OutgoingMessage], *, broker: Broker | None = None
    ) -> None:
        """Publish messages built with :meth:`message` in one batch (on ``broker`` if given,
        else on the app's own connection)."""
        broker = broker or self._broker or await self.connect()
        batch = list(messages)
        try:
            await broker.publish(batch)
        except BaseException as exc:
            telemetry.sent(batch, broker.system, exc)
            raise
        telemetry.sent(batch, broker.system)

    async def emit(self, event: Any, *, key: str | None = None, subject: str | None = None) -> str:
        """Publish a domain event (a ``msgspec.Struct``) on the app's event bus.

        >>> await app.emit(OrderAccepted(order_id="o1", customer_id="c1"))
        """
        if not isinstance(event, msgspec.Struct):
            raise TypeError(
                f"emit() takes a msgspec.Struct event, not {event.__class__.__name__}; "
                "use publish() for other payloads"
            )
        return await self.publish(self.event_bus, event, key=key, subject=subject)


def _end_span(span: Any, exc: BaseException) -> None:
    telemetry.record_failure(span, type(exc).__qualname__, str(exc))
    span.end()


def _time() -> float:
    import time

    return time.time()


_NO_STATE: Any = object()

Lifespan = Callable[["App"], AbstractAsyncContextManager[Any]]


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _upload_filter(
    events: Sequence[UploadEvent],
    match: str | Sequence[str] | None,
    prefix: str | None,
    suffix: str | None,
    where: str,
) -> UploadFilter:
    if (
        isinstance(events, str)
        or not events
        or any(e not in ("created", "deleted") for e in events)
    ):
        raise RegistrationError(
            f"{where}: events={events!r}; give a list of 'created' and/or 'deleted'"
        )
    patterns = [match] if isinstance(match, str) else list(match or [])
    if match is not None and (not patterns or not all(isinstance(p, str) and p for p in patterns)):
        raise RegistrationError(
            f"{where}: match= takes a pattern such as '*.pdf' or a list of them, not {match!r}"
        )
    for label, value in (("prefix", prefix), ("suffix", suffix)):
        if value is not None and (not isinstance(value, str) or not value):
            raise RegistrationError(f"{where}: {label}= takes a non-empty string, not {value!r}")
    return UploadFilter(events=events, match=match, prefix=prefix, suffix=suffix)


def _batch(size: int | None, wait: float, where: str) -> tuple[int, float] | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or not wait > 0:
        raise RegistrationError(
            f"{where}: batch={size!r}, batch_wait={wait!r}: batch must be a whole number >= 1 "
            "and batch_wait a positive number of seconds"
        )
    return size, float(wait)
