"""Schedules: when an ``@app.on_schedule`` handler is due, and the loop that publishes its ticks.

A :class:`Schedule` is either ``cron`` (five fields, evaluated in ``tz``, default UTC) or
``every`` N seconds. Interval schedules are anchored to the epoch: their due instants are the
multiples of N seconds since 1970-01-01T00:00Z, so every runner computes the same ones without
talking to the others.

Cron expressions are parsed and evaluated by ``cronsim``, which follows Debian's (Vixie) cron,
also across daylight saving time changes:

- an expression with a fixed minute *and* a fixed hour (``30 2 * * *``, ``0 1-3 * * *``) whose
  local time is skipped by the clock going forward fires at the first instant after the gap
  (``30 2 * * *`` fires at 03:00 on that day), and whose local time happens twice when the
  clock goes back fires once, at the first of the two (summer time);
- an expression whose minute or hour field starts with ``*`` (``*/30 * * * *``,
  ``0 * * * *``, ``0 */2 * * *``, ``*/15 2 * * *``) is scheduled on real time: nothing fires
  for local times that do not exist, and both occurrences of a repeated local time fire.

A :class:`Scheduler` sleeps until each due instant and hands a :class:`Tick` to ``publish``.
``missed`` says what happens to due instants that passed while it was not watching (the process
was down, the machine was suspended, the clock jumped): see :class:`Scheduler`. A tick is
identified by :func:`tick_id`, the same in every runner, so that the broker's ``dedupe`` keeps
one copy of it whichever runners publish it; the scheduler keeps no state on disk.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import anyio.abc
import msgspec
from cronsim import CronSim, CronSimError

from eventfn.exceptions import ConfigurationError, RegistrationError

log = logging.getLogger("eventfn.sources")

Missed = Literal["skip", "last"]

_TICKS = uuid.UUID("3b0f6f0e-3f5e-4d7a-9c2b-8f5d2c1e7a64")
"""Namespace of the name-based (v5) UUIDs that identify schedule ticks."""

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
"""The shorthands Vixie cron accepts (``@reboot`` has no meaning here)."""

_FIELDS = {
    "minute": "0-59",
    "hour": "0-23",
    "day-of-month": "1-31, L or LW, on a day that exists in the months given",
    "month": "1-12 or JAN-DEC",
    "day-of-week": "0-7 or SUN-SAT, with 5L or MON#2 forms",
}
"""The five fields in order, each with what it takes (for error messages)."""

_NAP = 30.0
"""Longest single sleep: a wall-clock jump or a resume from suspend is noticed within this."""

_HORIZON = 50 * 366 * 86400.0
"""How far back :meth:`Schedule.last_due` looks (cronsim's own limit looking forward)."""

_BACKOFF = 0.5
_MAX_BACKOFF = 30.0
"""First and longest pause between attempts to publish one tick."""


class Tick(msgspec.Struct, frozen=True, kw_only=True):
    """What a schedule handler receives: which schedule came due, and when.

    ``due`` is the due instant in RFC 3339 UTC (``"2026-03-29T01:00:00Z"``), ``due_at`` the
    same in epoch seconds. ``catch_up`` is true when the tick is published more than the grace
    period after it was due (only ``missed="last"`` does that).

    >>> @app.on_schedule(every=60)
    ... async def poll(tick: Tick) -> None:
    ...     print(tick.schedule, tick.due, tick.catch_up)
    """

    schedule: str
    due: str
    due_at: float
    catch_up: bool = False


def rfc3339(at: float) -> str:
    """An epoch instant as RFC 3339 in UTC, microseconds only when there are any.

    >>> rfc3339(0.0)
    '1970-01-01T00:00:00Z'
    """
    moment = datetime.fromtimestamp(at, UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text + "Z"


def tick_id(app_name: str, schedule_name: str, due_at: float) -> str:
    """The message id of a tick: a UUID 5 of app, schedule and due instant (to the
    microsecond), the same in every runner, so that the broker keeps one copy of each tick.

    >>> tick_id("shop", "nightly", 1774746000.0) == tick_id("shop", "nightly", 1774746000.0)
    True
    """
    return str(uuid.uuid5(_TICKS, f"{app_name}\0{schedule_name}\0{rfc3339(due_at)}"))


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """When a schedule comes due: ``cron`` in ``tz``, or ``every`` seconds since the epoch.

    Build it with :meth:`parse`, which checks every option; the fields are the checked values
    (``every`` in seconds, ``cron`` as written).

    >>> nightly = Schedule.parse(
    ...     "nightly", cron="30 2 * * *", every=None, tz="Europe/Berlin", missed="last",
    ...     where="handler shop.nightly",
    ... )
    >>> rfc3339(nightly.next_due(1774735200.0))  # 2026-03-28T22:00Z; 02:30 is skipped that night
    '2026-03-29T01:00:00Z'
    """

    name: str
    cron: str | None = None
    every: float | None = None
    tz: str | None = None
    missed: Missed = "skip"

    @classmethod
    def parse(
        cls,
        name: str,
        *,
        cron: str | None,
        every: float | timedelta | None,
        tz: str | None,
        missed: str,
        where: str,
    ) -> Schedule:
        """Check the options of ``on_schedule``; raise ``RegistrationError`` naming ``where``
        and the fix.

        ``tz`` with ``every`` is refused: an interval counts seconds since the epoch, where a
        time zone changes nothing, and accepting it would suggest local-time alignment.

        >>> Schedule.parse("poll", cron=None, every=30, tz=None, missed="skip", where="handler x")
        Schedule(name='poll', cron=None, every=30.0, tz=None, missed='skip')
        """
        if missed not in ("skip", "last"):
            raise RegistrationError(
                f"{where}: missed={missed!r}; give 'skip' (ticks that were due while nothing "
                "ran are dropped) or 'last' (the latest of them runs once)"
            )
        if (cron is None) == (every is None):
            which = "neither" if cron is None else "both"
            raise RegistrationError(
                f"{where}: on_schedule got {which} of cron= and every=; give exactly one, "
                "e.g. cron='*/5 * * * *' or every=30"
            )
        if every is not None:
            if tz is not None:
                raise RegistrationError(
                    f"{where}: tz={tz!r} has no effect with every= (intervals count seconds "
                    "since the epoch); drop tz, or use cron= with tz for times of day, "
                    f"e.g. cron='0 2 * * *', tz={tz!r}"
                )
            seconds = _interval(every, where)
            return cls(name=name, every=seconds, missed=cast(Missed, missed))
        assert cron is not None
        _zone(tz, where)
        _check_cron(cron, tz, where)
        return cls(name=name, cron=cron, tz=tz, missed=cast(Missed, missed))

    def next_due(self, after: float) -> float:
        """The first due instant strictly after ``after`` (epoch seconds).

        >>> Schedule.parse("p", cron=None, every=30, tz=None, missed="skip", where="x").next_due(
        ...     1000.0
        ... )
        1020.0
        """
        if self.every is not None:
            return _steps_after(after, self.every) * self.every
        return self._cron_after(after)

    def last_due(self, at_or_before: float) -> float | None:
        """The latest due instant at or before ``at_or_before``, ``None`` if there is none
        (a cron expression with no match in the 50 years before).

        >>> Schedule.parse("p", cron=None, every=30, tz=None, missed="skip", where="x").last_due(
        ...     1020.0
        ... )
        1020.0
        """
        if self.every is not None:
            return (_steps_after(at_or_before, self.every) - 1) * self.every
        return self._cron_at_or_before(at_or_before)

    def period_hint(self, due: float) -> float:
        """Seconds from the due instant ``due`` to the next one (a de-duplication window).

        >>> daily = Schedule.parse("d", cron="@daily", every=None, tz=None, missed="skip", where="")
        >>> daily.period_hint(0.0)
        86400.0
        """
        return self.next_due(due) - due

    def tick(self, due_at: float, *, catch_up: bool = False) -> Tick:
        """The tick of this schedule due at ``due_at``."""
        return Tick(schedule=self.name, due=rfc3339(due_at), due_at=due_at, catch_up=catch_up)

    # -- cron ---------------------------------------------------------------------------------

    def _expression(self) -> str:
        assert self.cron is not None
        return _ALIASES.get(self.cron.strip().lower(), self.cron)

    def _cron_after(self, after: float) -> float:
        due = self._cron_next(after)
        if due is None:
            raise ConfigurationError(
                f"schedule {self.name}: cron={self.cron!r} does not come due in the 50 years "
                f"after {rfc3339(after)}"
            )
        return due

    def _cron_next(self, after: float) -> float | None:
        zone = _zone(self.tz, f"schedule {self.name}")
        for due in CronSim(self._expression(), datetime.fromtimestamp(after, zone)):
            # cronsim works on local wall time for Debian's DST rules; after the second pass
            # of a repeated hour it may answer the first pass, which is in the past
            if due.timestamp() > after:
                return due.timestamp()
        return None  # cronsim gives up after 50 years without a match

    def _cron_at_or_before(self, at_or_before: float) -> float | None:
        # Forward only, from ever earlier starts: forward order is what fires, and cronsim's
        # reverse iteration can loop forever around a DST change in a zone with a sub-hour
        # offset (Pacific/Chatham, cronsim 2.8).
        lookback = 3600.0
        while lookback < _HORIZON:
            due = self._cron_next(at_or_before - lookback)
            if due is None:
                return None
            if due <= at_or_before:
                while (following := self._cron_next(due)) is not None and following <= at_or_before:
                    due = following
                return due
            lookback *= 4
        return None


def _steps_after(after: float, step: float) -> int:
    """The least ``n`` with ``n * step > after``."""
    count = math.floor(after / step) + 1
    # float division can land one step off either way
    while count * step <= after:
        count += 1
    while (count - 1) * step > after:
        count -= 1
    return count


def _interval(every: float | timedelta, where: str) -> float:
    if isinstance(every, timedelta):
        seconds = every.total_seconds()
    elif isinstance(every, int | float) and not isinstance(every, bool):
        seconds = float(every)
    else:
        raise RegistrationError(
            f"{where}: every={every!r}; give seconds as a number or a timedelta, e.g. every=30"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise RegistrationError(
            f"{where}: every={every!r}; the interval must be a positive, finite number of "
            "seconds, e.g. every=30 or every=timedelta(minutes=5)"
        )
    return seconds


def _zone(tz: str | None, where: str) -> tzinfo:
    if tz is None:
        return UTC
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise RegistrationError(
            f"{where}: tz={tz!r} is not a time zone zoneinfo knows; give an IANA name such as "
            "'Europe/Berlin' or 'UTC' (where the system has no tz database, install tzdata)"
        ) from None


def _check_cron(cron: str, tz: str | None, where: str) -> None:
    if not isinstance(cron, str):
        raise RegistrationError(f"{where}: cron={cron!r}; give a string, e.g. '*/5 * * * *'")
    expression = _ALIASES.get(cron.strip().lower(), cron)
    fields = expression.split()
    usage = "five fields 'minute hour day-of-month month day-of-week', e.g. '*/5 * * * *'"
    if len(fields) != 5:
        extra = "; for less than a minute use every=" if len(fields) == 6 else ""
        raise RegistrationError(
            f"{where}: cron={cron!r} has {len(fields)} field(s); give {usage}{extra}"
        )
    try:
        dues = CronSim(expression, datetime(2000, 1, 1, tzinfo=_zone(tz, where)))
    except CronSimError as exc:
        field = str(exc).removeprefix("Bad ")
        if field not in _FIELDS:
            raise RegistrationError(f"{where}: cron={cron!r}: {exc}; give {usage}") from None
        value = fields[list(_FIELDS).index(field)]
        raise RegistrationError(
            f"{where}: cron={cron!r}: the {field} field {value!r} is not valid; it takes "
            f"{_FIELDS[field]}"
        ) from None
    if next(dues, None) is None:
        raise RegistrationError(
            f"{where}: cron={cron!r} never comes due (no match in 50 years); check the day "
            "fields: day-of-month and day-of-week must both match when one starts with '*'"
        )


class Scheduler:
    """Publishes the ticks of one schedule as they come due, until cancelled.

    ``clock`` gives epoch seconds and ``sleep`` waits (a test passes virtual ones). The
    scheduler sleeps until the next due instant by ``clock``, in naps of at most 30 s, then
    looks at the latest due instant that has passed, and at how late it is against the grace
    period (``grace``, default the larger of 1 s and 1% of the schedule's period):

    - on time (late by at most the grace): published, ``catch_up=False``;
    - late, ``missed="last"``: published with ``catch_up=True``;
    - late, ``missed="skip"``: not published.

    Earlier instants that passed during the same sleep (suspend, a clock jump) are never
    published, whatever ``missed`` says. At start, the latest due instant at or before now goes
    through the same rule, unless this scheduler already published it: so after a downtime
    ``"last"`` publishes one catch-up tick and ``"skip"`` none. Runners do not coordinate: the
    caller publishes each tick under :func:`tick_id` with the broker's ``dedupe``.

    A failed ``publish`` is logged and retried with backoff while the next due instant is
    still ahead; a tick that cannot be published before then is given up (logged as an error).
    A tick is published at most once by one scheduler.

    >>> scheduler = Scheduler(schedule, publish_tick, clock=time.time, sleep=anyio.sleep)
    >>> await task_group.start(scheduler.run)
    """

    def __init__(
        self,
        schedule: Schedule,
        publish: Callable[[Tick], Awaitable[None]],
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        grace: float | None = None,
    ) -> None:
        self.schedule = schedule
        self._publish = publish
        self._clock = clock
        self._sleep = sleep
        self._grace = grace
        self.last_published: float | None = None
        """The due instant of the newest tick this scheduler published."""

    def grace(self, due: float) -> float:
        """How late a tick due at ``due`` may be published and still count as on time."""
        if self._grace is not None:
            return self._grace
        return max(1.0, 0.01 * self.schedule.period_hint(due))

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Publish ticks as they come due; never returns (cancel it to stop).

        >>> async with anyio.create_task_group() as tasks:
        ...     await tasks.start(scheduler.run)
        """
        task_status.started()
        now = self._clock()
        latest = self.schedule.last_due(now)
        if latest is not None:
            await self._handle(latest, self._clock())
        # a clock set back since this scheduler last ran must not bring its ticks round again
        cursor = now if self.last_published is None else max(now, self.last_published)
        while True:
            due = self.schedule.next_due(cursor)
            await self._sleep_until(due)
            now = self._clock()
            latest = self._latest_passed(due, now)
            await self._handle(latest, now)
            cursor = latest

    async def _sleep_until(self, due: float) -> None:
        # by the clock, not by the length of one sleep: the clock may jump either way meanwhile
        while (left := due - self._clock()) > 0:
            await self._sleep(min(left, _NAP))

    def _latest_passed(self, due: float, now: float) -> float:
        if self.schedule.next_due(due) > now:
            return due
        latest = self.schedule.last_due(now)
        assert latest is not None and latest >= due
        log.warning(
            "schedule %s: due instants %s to %s passed in one sleep (clock jump or pause); "
            "only the last may run (missed=%r)",
            self.schedule.name,
            rfc3339(due),
            rfc3339(latest),
            self.schedule.missed,
        )
        return latest

    async def _handle(self, due: float, now: float) -> None:
        if self.last_published is not None and due <= self.last_published:
            return
        late = now - due > self.grace(due)
        if late and self.schedule.missed == "skip":
            log.info(
                "schedule %s: skipping tick %s, %.1fs late (missed='skip')",
                self.schedule.name,
                rfc3339(due),
                now - due,
            )
            return
        await self._fire(self.schedule.tick(due, catch_up=late))

    async def _fire(self, tick: Tick) -> None:
        next_due = self.schedule.next_due(tick.due_at)
        delay = min(_BACKOFF, (next_due - tick.due_at) / 10)
        attempt = 1
        while True:
            try:
                await self._publish(tick)
            except Exception as exc:
                if self._clock() + delay >= next_due:
                    log.error(
                        "schedule %s: gave up tick %s after %d attempts, the next is due: %s: %s",
                        tick.schedule,
                        tick.due,
                        attempt,
                        type(exc).__name__,
                        exc,
                    )
                    return
                log.warning(
                    "schedule %s: publishing tick %s failed (attempt %d), retrying in %.1fs: "
                    "%s: %s",
                    tick.schedule,
                    tick.due,
                    attempt,
                    delay,
                    type(exc).__name__,
                    exc,
                )
                await self._sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                attempt += 1
            else:
                self.last_published = tick.due_at
                return
