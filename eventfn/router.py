"""``eventfn.Router``: handlers registered in their own module, included into the app later."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

from eventfn.exceptions import RegistrationError
from eventfn.options import HandlerOptions, check_known
from eventfn.sources.records import UploadEvent
from eventfn.subscriptions import KeyFunc

if TYPE_CHECKING:
    from eventfn.app import App

H = TypeVar("H", bound=Callable[..., Any])
Registration = Callable[["App", str, dict[str, Any]], None]
"""Replays one decorator on an app, with a name prefix and the enclosing routers' defaults."""


class Router:
    """The decorators of :class:`eventfn.App`, recorded, and replayed by ``app.include``.

    Handler options given to the router are defaults for its handlers: the app's defaults
    apply under them, a decorator's own options over them. Registration errors surface when
    the router is included, naming the handler, as they do on the app.

    >>> router = eventfn.Router(retry=eventfn.Retry(attempts=8))
    >>> @router.on_event(InvoicePaid, group="ledger")
    ... async def book(event: InvoicePaid) -> None: ...
    >>> app.include(router)
    """

    def __init__(self, **defaults: Unpack[HandlerOptions]) -> None:
        check_known(defaults, "Router(...)")
        if "emits" in defaults:
            raise RegistrationError(
                "Router(emits=...): emits= says what one handler publishes; give it to that "
                "handler's decorator"
            )
        self.defaults: dict[str, Any] = dict(defaults)
        self._registrations: list[Registration] = []

    def include(self, router: Router, *, prefix: str = "") -> None:
        """Nest another router's handlers in this one (their names get ``prefix``)."""
        self._registrations.append(
            lambda app, outer, defaults: router.register(app, outer + prefix, defaults)
        )

    def register(self, app: App, prefix: str = "", defaults: dict[str, Any] | None = None) -> None:
        """Replay every registration on ``app`` (``app.include`` calls this)."""
        merged = {**(defaults or {}), **self.defaults}
        for registration in self._registrations:
            registration(app, prefix, merged)

    def _record(
        self, method: str, args: tuple[Any, ...], options: dict[str, Any], *, prefixed: str
    ) -> Callable[[H], H]:
        """Record ``app.<method>(*args, **options)(fn)``; ``prefixed`` says which name gets
        the prefix: the first argument, the schedule ``name``, or none."""

        def decorate(fn: H) -> H:
            def register(app: App, prefix: str, defaults: dict[str, Any]) -> None:
                kwargs = {**defaults, **options}
                call_args = args
                if prefix and prefixed == "first":
                    call_args = (prefix + args[0], *args[1:])
                elif prefix and prefixed == "name":
                    kwargs["name"] = prefix + (kwargs.get("name") or fn.__name__.replace("_", "-"))
                getattr(app, method)(*call_args, **kwargs)(fn)

            self._registrations.append(register)
            return fn

        return decorate

    def on_queue(
        self,
        name: str,
        *,
        batch: int | None = None,
        batch_wait: float = 0.5,
        **options: Unpack[HandlerOptions],
    ) -> Callable[[H], H]:
        """:meth:`eventfn.App.on_queue`, recorded."""
        extra = {"batch": batch, "batch_wait": batch_wait}
        return self._record("on_queue", (name,), {**extra, **options}, prefixed="first")

    def on_topic(
        self,
        name: str,
        *,
        group: str | None = None,
        batch: int | None = None,
        batch_wait: float = 0.5,
        **options: Unpack[HandlerOptions],
    ) -> Callable[[H], H]:
        """:meth:`eventfn.App.on_topic`, recorded."""
        extra = {"group": group, "batch": batch, "batch_wait": batch_wait}
        return self._record("on_topic", (name,), {**extra, **options}, prefixed="first")

    def on_stream(
        self,
        name: str,
        *,
        key: str | KeyFunc | None = None,
        group: str | None = None,
        partitions: int | None = None,
        skip_key_on_error: bool = False,
        **options: Unpack[HandlerOptions],
    ) -> Callable[[H], H]:
        """:meth:`eventfn.App.on_stream`, recorded."""
        extra: dict[str, Any] = {"key": key, "group": group}
        extra["skip_key_on_error"] = skip_key_on_error
        if partitions is not None:
            extra["partitions"] = partitions
        return self._record("on_stream", (name,), {**extra, **options}, prefixed="first")

    def on_event(
        self, event: type[Any], *, group: str | None = None, **options: Unpack[HandlerOptions]
    ) -> Callable[[H], H]:
        """:meth:`eventfn.App.on_event`, recorded (event types take no prefix)."""
        return self._record("on_event", (event,), {"group": group, **options}, prefixed="none")

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
        """:meth:`eventfn.App.on_upload`, recorded (bucket names take no prefix)."""
        extra = {"match": match, "prefix": prefix, "suffix": suffix, "events": events}
        extra["group"] = group
        return self._record("on_upload", (bucket,), {**extra, **options}, prefixed="none")

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
        """:meth:`eventfn.App.on_schedule`, recorded (the schedule's name takes the prefix)."""
        extra = {"cron": cron, "every": every, "tz": tz, "missed": missed, "name": name}
        return self._record("on_schedule", (), {**extra, **options}, prefixed="name")
