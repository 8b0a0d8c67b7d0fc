"""What each decorator produces: a :class:`Subscription`, checked when it is registered.

Registration mistakes fail at import time with a message that names the handler and the fix,
so a runner never starts with a handler it cannot call.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec

from eventfn.brokers.base import Kind, SubscriptionRef
from eventfn.context import Context
from eventfn.events import Envelope
from eventfn.exceptions import DecodeError, InvalidDestination, RegistrationError
from eventfn.options import Options
from eventfn.retry import Retry
from eventfn.sources.upload import Upload, UploadFilter, upload_step

Trigger = Literal["queue", "topic", "stream", "event", "upload", "schedule"]
Handler = Callable[..., Awaitable[Any]]
KeyFunc = Callable[[Any], str | None]
ArgBuilder = Callable[[Envelope, Context[Any] | None], list[Any]]
UploadSpec = tuple[UploadFilter, Callable[[str], Any]]
"""What an ``Upload`` parameter needs: the handler's filter, and the local bucket by name."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")


def check_name(name: str, what: str) -> str:
    """Refuse a destination or group name that not every broker can carry."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidDestination(
            f"{what} name {name!r} is not allowed: use 1-200 characters of letters, digits, "
            "'.', '_', ':' and '-', starting with a letter or digit"
        )
    return name


def handler_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a handler, as shown in errors and ``eventfn inspect``."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class Subscription:
    """One registered handler and everything the runner needs to drive it."""

    __slots__ = (
        "batch",
        "batch_plan",
        "build_args",
        "concurrency",
        "data_type",
        "handler",
        "key",
        "name",
        "options",
        "ref",
        "retry",
        "skip_key_on_error",
        "timeout",
        "trigger",
        "wants_context",
    )

    def __init__(
        self,
        *,
        trigger: Trigger,
        ref: SubscriptionRef,
        handler: Handler,
        options: Options | None = None,
        key: KeyFunc | None = None,
        batch: tuple[int, float] | None = None,
        skip_key_on_error: bool = False,
        upload: UploadSpec | None = None,
    ) -> None:
        self.trigger = trigger
        self.ref = ref
        self.handler = handler
        self.name = handler_name(handler)
        self.options = options or Options()
        self.retry: Retry = self.options.retry
        self.concurrency = self.options.concurrency
        self.timeout = self.options.timeout
        self.key = key
        self.batch = batch
        self.skip_key_on_error = skip_key_on_error
        if batch is not None:
            self.batch_plan: BatchPlan | None = _batch_plan(handler, self.name)
            self.data_type: Any = self.batch_plan.data_type
            self.wants_context = False
            self.build_args: ArgBuilder = _no_single
            if self.options.idempotent:
                raise RegistrationError(
                    f"handler {self.name}: idempotent= is not supported on a batch handler; "
                    "make the batch's writes idempotent (e.g. upserts keyed by the event id)"
                )
        else:
            plan = _plan(handler, self.name, upload)
            if upload is not None and plan.data_type is not Upload:
                raise RegistrationError(
                    f"handler {self.name}: an on_upload handler takes an eventfn.Upload "
                    "parameter, e.g. `async def extract(upload: eventfn.Upload) -> None`"
                )
            self.batch_plan = None
            self.data_type = plan.data_type
            self.wants_context = plan.wants_context
            self.build_args = plan.build

    def describe(self) -> dict[str, Any]:
        """A plain summary, as ``eventfn inspect`` prints it."""
        return {
            "trigger": self.trigger,
            "destination": self.ref.destination,
            "kind": self.ref.kind,
            "group": self.ref.group,
            "subscription": self.ref.name,
            "types": list(self.ref.types) if self.ref.types else None,
            "handler": self.name,
            "concurrency": self.concurrency,
            "timeout": self.timeout,
            "retry": repr(self.retry),
            "rate": self.options.rate.text if self.options.rate else None,
            "idempotent": self.options.idempotent,
            "batch": self.batch[0] if self.batch else None,
            "emits": (
                list(self.options.emits.events) + list(self.options.emits.destinations)
                if self.options.emits is not None
                else None
            ),
        }


class _Plan:
    def __init__(self, data_type: Any, wants_context: bool, build: ArgBuilder) -> None:
        self.data_type = data_type
        self.wants_context = wants_context
        self.build = build


def _plan(fn: Handler, name: str, upload: UploadSpec | None = None) -> _Plan:
    steps: list[Callable[[Envelope, Context[Any] | None], Any]] = []
    data_type: Any = None
    wants_context = False
    for param, hint in _signature(fn, name):
        step, is_data = _step_for(hint, name, param, upload)
        if _is_context(hint):
            wants_context = True
        if is_data:
            if data_type is not None:
                raise RegistrationError(
                    f"handler {name}: more than one event parameter ({param!r}); a handler "
                    "receives one event, plus optionally Envelope, bytes and Context"
                )
            data_type = hint
        steps.append(step)
    return _Plan(data_type, wants_context, _builder(steps))


def _signature(fn: Handler, name: str) -> list[tuple[str, Any]]:
    """``(parameter name, annotation)`` of an async handler, or a RegistrationError."""
    if not inspect.iscoroutinefunction(fn):
        raise RegistrationError(
            f"handler {name} is not an async function; write it as `async def` "
            "(run blocking work with `await anyio.to_thread.run_sync(...)` inside it)"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise RegistrationError(
            f"handler {name}: its annotations cannot be resolved ({exc}); import the types "
            "it names at module level"
        ) from None
    found = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.KEYWORD_ONLY):
            raise RegistrationError(
                f"handler {name}: parameter {param.name!r} must be a plain positional parameter"
            )
        if param.name not in hints:
            raise RegistrationError(
                f"handler {name}: parameter {param.name!r} has no annotation; annotate it with "
                "the event type (a msgspec.Struct), eventfn.Envelope, bytes or eventfn.Context"
            )
        found.append((param.name, hints[param.name]))
    return found


class BatchPlan:
    """How a batch handler's arguments are made: per item, then assembled into lists.

    ``item(envelope)`` decodes one message (raising DecodeError for a poison one);
    ``assemble(items, ctx)`` builds the argument list from the decoded items.
    """

    def __init__(self, data_type: Any, steps: list[Callable[[Envelope, Any], Any] | None]) -> None:
        self.data_type = data_type
        self._steps = steps
        self._item_steps = [step for step in steps if step is not None]

    def item(self, envelope: Envelope) -> list[Any]:
        return [step(envelope, None) for step in self._item_steps]

    def assemble(self, items: list[list[Any]], ctx: Context[Any]) -> list[Any]:
        args: list[Any] = []
        column = 0
        for step in self._steps:
            if step is None:
                args.append(ctx)
            else:
                args.append([values[column] for values in items])
                column += 1
        return args


def _batch_plan(fn: Handler, name: str) -> BatchPlan:
    steps: list[Callable[[Envelope, Any], Any] | None] = []
    data_type: Any = None
    for param, hint in _signature(fn, name):
        if _is_context(hint):
            steps.append(None)
            continue
        if typing.get_origin(hint) is not list or not typing.get_args(hint):
            raise RegistrationError(
                f"handler {name} has batch= so parameter {param!r} must be a list, e.g. "
                "list[Row] (or list[eventfn.Envelope], list[bytes], or an eventfn.Context)"
            )
        step, is_data = _step_for(typing.get_args(hint)[0], name, param)
        if is_data:
            if data_type is not None:
                raise RegistrationError(f"handler {name}: more than one list of events")
            data_type = hint
        steps.append(step)
    return BatchPlan(data_type, steps)


def _no_single(envelope: Envelope, ctx: Context[Any] | None) -> list[Any]:
    raise TypeError("a batch handler is called with batches only")


def _builder(steps: list[Callable[[Envelope, Context[Any] | None], Any]]) -> ArgBuilder:
    if len(steps) == 1:
        (only,) = steps
        return lambda envelope, ctx: [only(envelope, ctx)]
    return lambda envelope, ctx: [step(envelope, ctx) for step in steps]


def _step_for(
    hint: Any, name: str, param: str, upload: UploadSpec | None = None
) -> tuple[Callable[[Envelope, Any], Any], bool]:
    if hint is Upload:
        if upload is None:
            raise RegistrationError(
                f"handler {name}: parameter {param!r} is an eventfn.Upload, which only an "
                "on_upload handler receives; register it with @app.on_upload(bucket=...)"
            )
        return upload_step(*upload), True
    if _is_context(hint):
        return (lambda envelope, ctx: ctx), False
    if hint is Envelope:
        return (lambda envelope, ctx: envelope), False
    if hint is bytes:
        return (lambda envelope, ctx: envelope.payload_bytes()), False
    if _decodable(hint):
        return _data_step(msgspec.json.Decoder(hint), _type_name(hint)), True
    raise RegistrationError(
        f"handler {name}: parameter {param!r} is annotated {hint!r}, which eventfn cannot "
        "supply; use a msgspec.Struct (or dict/list of JSON types), eventfn.Envelope, bytes "
        "or eventfn.Context"
    )


def _is_context(hint: Any) -> bool:
    """``Context``, or ``Context[State]`` with the type of the app's lifespan state."""
    return hint is Context or typing.get_origin(hint) is Context


def _decodable(hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    if isinstance(origin, type) and issubclass(origin, msgspec.Struct | dict | list):
        try:
            msgspec.json.Decoder(hint)
        except TypeError:
            return False
        return True
    return False


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else repr(hint)


def _data_step(decoder: msgspec.json.Decoder[Any], name: str) -> Callable[[Envelope, Any], Any]:
    def decode(envelope: Envelope, ctx: Any) -> Any:
        if not envelope.data:
            raise DecodeError(
                f"event {envelope.id} of type {envelope.type!r} has no JSON data "
                f"(datacontenttype {envelope.datacontenttype!r}); annotate the parameter as "
                "bytes to receive binary payloads"
            )
        try:
            return decoder.decode(envelope.data)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"payload does not match {name}: {exc}") from None

    return decode


def make_ref(
    trigger: Trigger,
    destination: str,
    group: str | None,
    *,
    types: tuple[str, ...] | None = None,
    partitions: int = 1,
) -> SubscriptionRef:
    """The broker-side description of a subscription."""
    kinds: dict[str, Kind] = {"event": "topic", "upload": "topic", "schedule": "queue"}
    kind: Kind = kinds.get(trigger, trigger)  # type: ignore[arg-type]
    check_name(destination, "destination")
    if kind == "queue":
        return SubscriptionRef(destination=destination, kind="queue")
    if group is None:
        raise RegistrationError("a group is required")
    check_name(group, "group")
    return SubscriptionRef(
        destination=destination, kind=kind, group=group, types=types, partitions=partitions
    )


def key_func(key: str | KeyFunc | None, name: str) -> KeyFunc | None:
    """A stream's key: an attribute (or mapping key) name, or a function of the event."""
    if key is None or callable(key):
        return key
    if isinstance(key, str) and key:
        attr = key

        def get(event: Any) -> str | None:
            value = event.get(attr) if isinstance(event, dict) else getattr(event, attr, None)
            return None if value is None else str(value)

        return get
    raise RegistrationError(
        f"handler {name}: key={key!r} must be an attribute name or a function of the event"
    )
