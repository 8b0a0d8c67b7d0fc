"""Handler options: the keywords every decorator takes, app-wide defaults, and their checks.

An option given to a decorator wins over the same option given to ``App(...)``. A misspelt or
unknown option fails at import time, naming the handler and the closest valid option.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypedDict

import msgspec

from eventfn.events import event_type
from eventfn.exceptions import RegistrationError
from eventfn.retry import Retry
from eventfn.runtime.breaker import CircuitBreaker

OnDuplicate = Literal["wait", "retry"]


class HandlerOptions(TypedDict, total=False):
    """Keyword options of ``on_queue``, ``on_topic``, ``on_stream``, ``on_event`` and ``App``.

    - ``concurrency``: handlers of this subscription running at once in one runner.
    - ``retry``: the retry policy, e.g. ``eventfn.Retry(attempts=5, backoff=1.0)``.
    - ``timeout``: seconds before a running handler fails with ``TimeoutError``.
    - ``rate``: at most this many handler starts per runner process, e.g. ``"200/s"``,
      ``"30/m"``, ``"1000/h"`` (a token bucket; with N runners the total is N times this).
    - ``idempotent``: skip a message whose key was already handled successfully.
    - ``idempotency_key``: a function of the decoded event giving its key (implies
      ``idempotent``); by default the key is the message id.
    - ``idempotency_ttl``: seconds a completed key is remembered (default one day).
    - ``on_duplicate``: when the same key is being handled elsewhere: ``"wait"`` for it (the
      default, bounded) or ``"retry"`` later.
    - ``store_result``: keep the handler's return value with the completed key.
    - ``breaker``: the retry-storm guard, ``eventfn.CircuitBreaker(threshold=5, cooldown=1.0)``
      by default; ``False`` turns it off.
    - ``emits``: what the handler publishes: event classes (on the app's event bus) and
      destination names, e.g. ``emits=[InventoryReserved, "emails"]``. ``eventfn graph`` draws
      these flows; emitting anything undeclared logs a warning (once per handler and type).
    """

    concurrency: int | None
    retry: Retry | None
    timeout: float | None
    rate: str | None
    idempotent: bool
    idempotency_key: Callable[[Any], str] | None
    idempotency_ttl: float
    on_duplicate: OnDuplicate
    store_result: bool
    breaker: CircuitBreaker | Literal[False] | None
    emits: Sequence[type[Any] | str] | None


class Emits(msgspec.Struct, frozen=True):
    """What a handler declares it publishes: event types on the bus, and other destinations."""

    events: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()

    def covers(self, destination: str, type: str, event_bus: str) -> bool:
        """Whether publishing a ``type`` message to ``destination`` is declared."""
        if destination == event_bus and type in self.events:
            return True
        return destination in self.destinations


class Rate(msgspec.Struct, frozen=True):
    """A parsed ``rate=``: ``per_second`` handler starts a second, evenly spaced, and never more
    than the rate's count in any window of its ``period`` (seconds: 1, 60 or 3600)."""

    text: str
    per_second: float
    burst: float
    period: float = 1.0


class Options(msgspec.Struct, frozen=True, kw_only=True):
    """The resolved options of one subscription."""

    concurrency: int | None = None
    retry: Retry = msgspec.field(default_factory=Retry)
    timeout: float | None = None
    rate: Rate | None = None
    idempotent: bool = False
    idempotency_key: Callable[[Any], str] | None = None
    idempotency_ttl: float = 86_400.0
    on_duplicate: OnDuplicate = "wait"
    store_result: bool = False
    breaker: CircuitBreaker | None = msgspec.field(default_factory=CircuitBreaker)
    emits: Emits | None = None


_KNOWN = tuple(HandlerOptions.__annotations__)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PERIOD = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
_PERIOD |= {"h": 3600, "hour": 3600}


def check_known(options: Mapping[str, Any], where: str) -> None:
    """Refuse options that do not exist, suggesting the closest one."""
    for name in options:
        if name not in _KNOWN:
            close = difflib.get_close_matches(name, _KNOWN, n=1)
            hint = f"; did you mean {close[0]}=?" if close else ""
            raise RegistrationError(
                f"{where}: unknown option {name}={options[name]!r}{hint} "
                f"(options: {', '.join(_KNOWN)})"
            )


def parse_rate(text: str, where: str) -> Rate:
    """``"200/s"`` -> 200 per second, evenly spaced (no bursts above the rate)."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if not match or float(match.group(1)) <= 0:
        raise RegistrationError(
            f"{where}: rate={text!r} is not a rate; write it like '200/s', '30/m' or '1000/h'"
        )
    period = _PERIOD[match.group(2)]
    per_second = float(match.group(1)) / period
    return Rate(text=text.strip(), per_second=per_second, burst=1.0, period=float(period))


def resolve(defaults: Mapping[str, Any], given: Mapping[str, Any], where: str) -> Options:
    """Merge app defaults with a handler's own options (the handler's win) and check them."""
    check_known(given, where)
    merged = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    retry = merged.get("retry")
    if retry is not None and (not isinstance(retry, Retry) or retry.after is not None):
        raise RegistrationError(
            f"{where}: retry= takes a policy such as eventfn.Retry(attempts=5, backoff=1.0); "
            "Retry(after=...) is raised from inside a handler"
        )
    for name in ("concurrency", "timeout", "idempotency_ttl"):
        value = merged.get(name)
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise RegistrationError(f"{where}: {name}={value!r} must be a positive number")
    key = merged.get("idempotency_key")
    if key is not None and not callable(key):
        raise RegistrationError(
            f"{where}: idempotency_key= must be a function of the event, e.g. lambda e: e.order_id"
        )
    if merged.get("on_duplicate", "wait") not in ("wait", "retry"):
        raise RegistrationError(f"{where}: on_duplicate= must be 'wait' or 'retry'")
    rate = merged.get("rate")
    breaker = merged.get("breaker", CircuitBreaker())
    if breaker is not False and not isinstance(breaker, CircuitBreaker):
        raise RegistrationError(
            f"{where}: breaker= takes eventfn.CircuitBreaker(threshold=5, cooldown=1.0) or False"
        )
    return Options(
        concurrency=merged.get("concurrency"),
        retry=retry or Retry(),
        timeout=merged.get("timeout"),
        rate=parse_rate(rate, where) if rate is not None else None,
        idempotent=bool(merged.get("idempotent")) or key is not None,
        idempotency_key=key,
        idempotency_ttl=float(merged.get("idempotency_ttl", 86_400.0)),
        on_duplicate=merged.get("on_duplicate", "wait"),
        store_result=bool(merged.get("store_result", False)),
        breaker=breaker or None,
        emits=_emits(given.get("emits"), where),
    )


def _emits(declared: Any, where: str) -> Emits | None:
    if declared is None:
        return None
    fix = "emits= takes a list of event classes and destination names, e.g. [OrderPaid, 'emails']"
    if isinstance(declared, str | bytes) or not isinstance(declared, Sequence | set | frozenset):
        raise RegistrationError(f"{where}: {fix}, not {declared!r}")
    events: list[str] = []
    destinations: list[str] = []
    for item in declared:
        if isinstance(item, type) and issubclass(item, msgspec.Struct):
            events.append(event_type(item))
        elif isinstance(item, str) and item:
            destinations.append(item)
        else:
            raise RegistrationError(f"{where}: emits= has {item!r}; {fix}")
    return Emits(events=tuple(events), destinations=tuple(destinations))
