"""Schedules and the scheduler: validation, due instants (cron across DST, epoch-anchored
intervals) and the publish loop on a virtual clock (no real sleeps)."""

from __future__ import annotations

import logging
import math
import time
import uuid
from datetime import datetime, timedelta

import anyio
import anyio.lowlevel
import pytest

from eventfn.exceptions import BrokerUnavailable, RegistrationError
from eventfn.sources.schedule import Schedule, Scheduler, Tick, rfc3339, tick_id

WHERE = "handler shop.nightly"
T = 1_800_000_000.0  # 2027-01-15T08:00:00Z, a multiple of 60 (and of 300)


def at(text: str) -> float:
    """Epoch seconds of an ISO 8601 instant with an offset."""
    return datetime.fromisoformat(text).timestamp()


def cron(expression: str, tz: str | None = None, missed: str = "skip") -> Schedule:
    return Schedule.parse("nightly", cron=expression, every=None, tz=tz, missed=missed, where=WHERE)


def every(seconds: float | timedelta, missed: str = "skip") -> Schedule:
    return Schedule.parse("poll", cron=None, every=seconds, tz=None, missed=missed, where=WHERE)


def dues(schedule: Schedule, start: str, end: str) -> list[str]:
    """The due instants strictly after ``start`` and before ``end``, in RFC 3339 UTC."""
    found, t = [], at(start)
    while (t := schedule.next_due(t)) < at(end):
        found.append(rfc3339(t))
    return found


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        ({}, ["neither of cron= and every=", "cron='*/5 * * * *'"]),
        ({"cron": "* * * * *", "every": 30}, ["both of cron= and every="]),
        ({"cron": "61 * * * *"}, ["minute field '61'", "0-59"]),
        ({"cron": "0 24 * * *"}, ["hour field '24'", "0-23"]),
        ({"cron": "0 0 * 13 *"}, ["month field '13'", "1-12"]),
        ({"cron": "0 0 * * FUNDAY"}, ["day-of-week field 'FUNDAY'"]),
        ({"cron": "0 0 31 2 *"}, ["day-of-month field '31'", "exists in the months"]),
        ({"cron": "*/0 * * * *"}, ["minute field '*/0'"]),
        ({"cron": "* * * *"}, ["has 4 field(s)", "minute hour day-of-month month day-of-week"]),
        ({"cron": "0 * * * * *"}, ["has 6 field(s)", "every="]),
        ({"cron": "@reboot"}, ["has 1 field(s)"]),
        ({"cron": "* * */20 * 1L"}, ["never comes due"]),
        ({"every": 0}, ["every=0", "positive"]),
        ({"every": -5.0}, ["every=-5.0", "positive"]),
        ({"every": timedelta(0)}, ["positive"]),
        ({"every": math.nan}, ["finite"]),
        ({"every": True}, ["every=True", "number or a timedelta"]),
        ({"every": "30"}, ["every='30'", "number or a timedelta"]),
        ({"cron": "0 2 * * *", "tz": "Mars/Olympus_Mons"}, ["tz='Mars/Olympus_Mons'", "IANA"]),
        ({"cron": "0 2 * * *", "tz": "../etc/passwd"}, ["tz='../etc/passwd'"]),
        ({"every": 86400, "tz": "Europe/Berlin"}, ["no effect with every=", "cron='0 2 * * *'"]),
        ({"every": 30, "missed": "all"}, ["missed='all'", "'skip'", "'last'"]),
        ({"cron": "0 2 * * *", "missed": "LAST"}, ["missed='LAST'"]),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else None,
)
def test_parse_refuses_with_where_and_fix(options: dict[str, object], fragments: list[str]) -> None:
    arguments: dict[str, object] = {"cron": None, "every": None, "tz": None, "missed": "skip"}
    arguments.update(options)
    with pytest.raises(RegistrationError) as raised:
        Schedule.parse("nightly", where=WHERE, **arguments)  # type: ignore[arg-type]
    message = str(raised.value)
    assert message.startswith(f"{WHERE}: ")
    for fragment in fragments:
        assert fragment in message


def test_parse_accepts_the_documented_forms() -> None:
    assert every(timedelta(minutes=5)).every == 300.0
    assert every(30).every == 30.0
    berlin = cron("*/5 * * * *", tz="Europe/Berlin", missed="last")
    assert (berlin.cron, berlin.tz, berlin.missed) == ("*/5 * * * *", "Europe/Berlin", "last")
    assert cron("0 9 * * mon-fri").cron == "0 9 * * mon-fri"
    daily = cron("@daily")
    assert daily.next_due(at("2026-06-01T13:00:00+00:00")) == at("2026-06-02T00:00:00+00:00")


# -- intervals --------------------------------------------------------------------------------


def test_interval_is_anchored_to_the_epoch() -> None:
    poll = every(30)
    assert poll.next_due(1000.0) == 1020.0
    assert poll.next_due(1020.0) == 1050.0  # strictly after
    assert poll.next_due(1019.999) == 1020.0
    assert poll.last_due(1020.0) == 1020.0  # at or before
    assert poll.last_due(1019.999) == 990.0
    assert poll.period_hint(1020.0) == 30.0
    # runners that start at different moments agree on every due instant
    seven = every(7)
    for start in (0.5, 12345.678, T + 3.25):
        due = seven.next_due(start)
        assert due % 7 == 0 and start < due <= start + 7
    daily = every(timedelta(days=1))
    assert daily.next_due(at("2026-06-01T13:00:00+00:00")) == at("2026-06-02T00:00:00+00:00")
    fractional = every(1.5)
    assert fractional.next_due(T) == T + 1.5
    assert fractional.last_due(T + 2.9) == T + 1.5


# -- cron -------------------------------------------------------------------------------------


def test_cron_in_utc() -> None:
    five = cron("*/5 * * * *")
    assert five.next_due(T) == T + 300  # strictly after a due instant
    assert five.next_due(T - 0.5) == T
    assert five.last_due(T) == T
    assert five.last_due(T - 0.001) == T - 300
    assert five.period_hint(T) == 300.0
    weekdays = cron("0 9 * * MON-FRI")
    friday = "2026-06-05T10:00:00+00:00"
    assert dues(weekdays, friday, "2026-06-10T00:00:00+00:00") == [
        "2026-06-08T09:00:00Z",
        "2026-06-09T09:00:00Z",
    ]
    assert weekdays.last_due(at(friday)) == at("2026-06-05T09:00:00+00:00")
    assert weekdays.period_hint(at("2026-06-05T09:00:00+00:00")) == 3 * 86400


# Europe/Berlin 2026: on 29 March 02:00 CET becomes 03:00 CEST (at 01:00Z); on 25 October
# 03:00 CEST becomes 02:00 CET (at 01:00Z), so local 02:00-02:59 happens twice.


def test_berlin_spring_forward() -> None:
    berlin = "Europe/Berlin"
    # a fixed local time in the gap fires at the first instant after it: 03:00 CEST
    nightly = cron("30 2 * * *", tz=berlin)
    assert dues(nightly, "2026-03-27T12:00:00+00:00", "2026-03-31T00:00:00+00:00") == [
        "2026-03-28T01:30:00Z",  # 02:30 CET
        "2026-03-29T01:00:00Z",  # 03:00 CEST: 02:30 does not exist that night
        "2026-03-30T00:30:00Z",  # 02:30 CEST
    ]
    assert nightly.period_hint(at("2026-03-28T01:30:00+00:00")) == 23.5 * 3600
    # hourly or finer runs on real time: nothing is due in the gap, nothing is lost
    assert dues(cron("*/30 * * * *", tz=berlin), "2026-03-28T23:45Z", "2026-03-29T01:45Z") == [
        "2026-03-29T00:00:00Z",  # 01:00 CET
        "2026-03-29T00:30:00Z",  # 01:30 CET
        "2026-03-29T01:00:00Z",  # 03:00 CEST
        "2026-03-29T01:30:00Z",  # 03:30 CEST
    ]
    assert dues(cron("0 * * * *", tz=berlin), "2026-03-28T22:30Z", "2026-03-29T02:30Z") == [
        "2026-03-28T23:00:00Z",  # 00:00 CET
        "2026-03-29T00:00:00Z",  # 01:00 CET
        "2026-03-29T01:00:00Z",  # 03:00 CEST
        "2026-03-29T02:00:00Z",  # 04:00 CEST
    ]
    # Debian's rule: with a '*' minute field, hour 2 simply does not happen that night
    assert dues(cron("*/15 2 * * *", tz=berlin), "2026-03-28T12:00Z", "2026-03-29T12:00Z") == []


def test_berlin_fall_back() -> None:
    berlin = "Europe/Berlin"
    # a fixed local time that happens twice fires once, at the first (summer time) pass
    nightly = cron("30 2 * * *", tz=berlin)
    assert dues(nightly, "2026-10-23T12:00:00+00:00", "2026-10-27T00:00:00+00:00") == [
        "2026-10-24T00:30:00Z",  # 02:30 CEST
        "2026-10-25T00:30:00Z",  # 02:30 CEST, and not again at 02:30 CET
        "2026-10-26T01:30:00Z",  # 02:30 CET
    ]
    assert nightly.period_hint(at("2026-10-25T00:30:00+00:00")) == 25 * 3600
    # asked during the second pass, the next is tomorrow's, never the first pass again
    assert nightly.next_due(at("2026-10-25T01:15:00+00:00")) == at("2026-10-26T01:30:00+00:00")
    assert nightly.last_due(at("2026-10-25T01:45:00+00:00")) == at("2026-10-25T00:30:00+00:00")
    # hourly or finer runs on real time: the repeated local times fire on both passes
    assert dues(cron("*/30 * * * *", tz=berlin), "2026-10-24T23:45Z", "2026-10-25T01:45Z") == [
        "2026-10-25T00:00:00Z",  # 02:00 CEST
        "2026-10-25T00:30:00Z",  # 02:30 CEST
        "2026-10-25T01:00:00Z",  # 02:00 CET
        "2026-10-25T01:30:00Z",  # 02:30 CET
    ]
    assert dues(cron("0 * * * *", tz=berlin), "2026-10-24T22:30Z", "2026-10-25T02:30Z") == [
        "2026-10-24T23:00:00Z",  # 01:00 CEST
        "2026-10-25T00:00:00Z",  # 02:00 CEST
        "2026-10-25T01:00:00Z",  # 02:00 CET
        "2026-10-25T02:00:00Z",  # 03:00 CET
    ]


@pytest.mark.parametrize("expression", ["30 2 * * *", "*/30 * * * *", "0 * * * *", "0 1-3 * * *"])
@pytest.mark.parametrize("night", ["2026-03-28T12:00:00+00:00", "2026-10-24T12:00:00+00:00"])
def test_last_due_agrees_with_next_due_across_dst(expression: str, night: str) -> None:
    schedule = cron(expression, tz="Europe/Berlin")
    end = at(night) + 86400
    forward = [at(night)]
    while (due := schedule.next_due(forward[-1])) < end:
        forward.append(due)
    forward = forward[1:]
    probe = forward[0]
    while probe < end:
        assert schedule.last_due(probe) == max(d for d in forward if d <= probe), rfc3339(probe)
        probe += 7 * 60 + 0.5
    for due in forward:
        assert schedule.last_due(due) == due
        assert schedule.next_due(due - 0.5) == due


def test_last_due_in_a_zone_with_a_sub_hour_offset_returns() -> None:
    # cronsim 2.8's reverse iteration loops forever here (Chatham, +13:45 -> +12:45 on
    # 2026-04-05 local); last_due walks forward only
    schedule = cron("*/30 2 * * *", tz="Pacific/Chatham")
    probe = at("2026-04-04T13:30:07+00:00")  # 03:15:07 CHADT, 30 min before the change
    assert schedule.last_due(probe) == at("2026-04-04T12:45:00+00:00")  # 02:30 CHADT
    assert schedule.next_due(probe) == at("2026-04-05T13:15:00+00:00")  # 02:00 CHAST


# -- the scheduler on a virtual clock ---------------------------------------------------------


class VirtualClock:
    """Epoch time that moves only here. A sleep that ends at or before ``limit`` returns at
    once with the time moved on; a longer one parks until the test calls :meth:`resume`."""

    def __init__(self, now: float, *, limit: float = -math.inf) -> None:
        self.now = now
        self.limit = limit
        self.sleeps = 0
        self._parked = anyio.Event()
        self._resume = anyio.Event()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds > 0, "the scheduler asked for a sleep of no time"
        self.sleeps += 1
        if self.now + seconds <= self.limit:
            self.now += seconds
            await anyio.lowlevel.checkpoint()
            return
        self._resume = anyio.Event()
        self._parked.set()
        await self._resume.wait()

    async def parked(self) -> None:
        """Wait until the scheduler is asleep past the limit."""
        await self._parked.wait()

    def resume(self, now: float, *, limit: float = -math.inf) -> None:
        """Set the time (a jump, either way) and wake the sleeper."""
        self.now, self.limit = now, limit
        self._parked = anyio.Event()
        self._resume.set()


class Publisher:
    """Records ticks; fails the first ``failures`` attempts, or every attempt of ``refuse``."""

    def __init__(self, clock: VirtualClock, *, failures: int = 0, refuse: float = -1.0) -> None:
        self.clock = clock
        self.failures = failures
        self.refuse = refuse
        self.ticks: list[Tick] = []
        self.attempts: list[tuple[float, float]] = []  # (due_at, clock)

    async def __call__(self, tick: Tick) -> None:
        self.attempts.append((tick.due_at, self.clock.now))
        await anyio.lowlevel.checkpoint()
        if self.failures > 0 or tick.due_at == self.refuse:
            self.failures -= 1
            raise BrokerUnavailable("broker down")
        self.ticks.append(tick)

    def published(self) -> list[tuple[float, bool]]:
        return [(tick.due_at, tick.catch_up) for tick in self.ticks]


async def run_until_parked(scheduler: Scheduler, clock: VirtualClock) -> None:
    """Run the scheduler until it sleeps past the clock's limit, then cancel it."""
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            await tasks.start(scheduler.run)
            await clock.parked()
            tasks.cancel_scope.cancel()


def scheduler_on(
    schedule: Schedule, start: float, *, limit: float = -math.inf, **publisher: float
) -> tuple[Scheduler, VirtualClock, Publisher]:
    clock = VirtualClock(start, limit=limit)
    publish = Publisher(clock, **publisher)  # type: ignore[arg-type]
    return Scheduler(schedule, publish, clock=clock, sleep=clock.sleep), clock, publish


async def test_a_day_of_every_five_minutes_is_288_ticks_in_well_under_a_second() -> None:
    midnight = at("2026-06-01T00:00:00+00:00")
    scheduler, clock, publish = scheduler_on(
        cron("*/5 * * * *"), midnight - 0.5, limit=midnight + 86400 - 1
    )
    began = time.perf_counter()
    await run_until_parked(scheduler, clock)
    elapsed = time.perf_counter() - began
    assert len(publish.ticks) == 288
    assert [tick.due_at for tick in publish.ticks] == [midnight + 300 * i for i in range(288)]
    assert publish.ticks[0].due == "2026-06-01T00:00:00Z"
    assert publish.ticks[-1].due == "2026-06-01T23:55:00Z"
    assert not any(tick.catch_up for tick in publish.ticks)
    assert elapsed < 1.0, f"took {elapsed:.2f}s of real time"


@pytest.mark.parametrize(
    ("missed", "expected"),
    [
        ("last", [(T + 600, True), (T + 660, False), (T + 720, False)]),
        ("skip", [(T + 660, False), (T + 720, False)]),
    ],
)
async def test_after_ten_minutes_down(missed: str, expected: list[tuple[float, bool]]) -> None:
    # the last tick that ran was T; the runner comes back 10 min 25 s later
    scheduler, clock, publish = scheduler_on(every(60, missed), T + 625, limit=T + 750)
    await run_until_parked(scheduler, clock)
    assert publish.published() == expected


@pytest.mark.parametrize("missed", ["skip", "last"])
async def test_a_start_on_time_is_no_catch_up(missed: str) -> None:
    scheduler, clock, publish = scheduler_on(every(60, missed), T + 0.5, limit=T + 100)
    await run_until_parked(scheduler, clock)
    assert publish.published() == [(T, False), (T + 60, False)]


@pytest.mark.parametrize(
    ("missed", "landing", "expected"),
    [
        ("last", 30.0, [(T + 86400, True)]),
        ("skip", 30.0, []),
        ("last", 0.5, [(T + 86400, False)]),  # within the grace: on time
        ("skip", 0.5, [(T + 86400, False)]),
    ],
)
async def test_a_clock_jump_of_a_day_during_a_sleep(
    missed: str, landing: float, expected: list[tuple[float, bool]]
) -> None:
    scheduler, clock, publish = scheduler_on(every(60, missed), T)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            await tasks.start(scheduler.run)
            await clock.parked()  # asleep on its way to T + 60
            assert publish.published() == [(T, False)]
            clock.resume(T + 86400 + landing)
            await clock.parked()
            assert publish.published() == [(T, False), *expected]
            clock.resume(T + 86460)  # the next one after the jump comes on time
            await clock.parked()
            tasks.cancel_scope.cancel()
    assert publish.published() == [(T, False), *expected, (T + 86460, False)]


async def test_a_clock_going_back_fires_nothing_early_and_nothing_twice() -> None:
    scheduler, clock, publish = scheduler_on(every(60, "last"), T)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            await tasks.start(scheduler.run)
            await clock.parked()
            clock.resume(T - 3600)
            await clock.parked()
            assert publish.published() == [(T, False)]
            clock.resume(T + 60)
            await clock.parked()
            tasks.cancel_scope.cancel()
    assert publish.published() == [(T, False), (T + 60, False)]


async def test_publish_failing_twice_then_succeeding_fires_the_tick_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler, clock, publish = scheduler_on(every(60), T + 30, limit=T + 150, failures=2)
    with caplog.at_level(logging.WARNING, logger="eventfn.sources"):
        await run_until_parked(scheduler, clock)
    assert publish.published() == [(T + 60, False), (T + 120, False)]
    assert [due for due, _ in publish.attempts] == [T + 60, T + 60, T + 60, T + 120]
    retried_at = [now for due, now in publish.attempts if due == T + 60]
    assert retried_at == [T + 60, T + 60.5, T + 61.5]  # backoff 0.5 s, then 1 s
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "attempt 1" in warnings[0] and "2027-01-15T08:01:00Z" in warnings[0]


async def test_a_tick_whose_retries_outlast_its_period_is_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scheduler, clock, publish = scheduler_on(every(60), T + 30, limit=T + 150, refuse=T + 60)
    with caplog.at_level(logging.WARNING, logger="eventfn.sources"):
        await run_until_parked(scheduler, clock)
    assert publish.published() == [(T + 120, False)]
    tried = [now for due, now in publish.attempts if due == T + 60]
    assert len(tried) > 3 and max(tried) < T + 120
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "gave up tick 2027-01-15T08:01:00Z" in errors[0]


async def test_a_restarted_scheduler_does_not_catch_up_what_it_published() -> None:
    scheduler, clock, publish = scheduler_on(every(60, "last"), T + 10)
    await run_until_parked(scheduler, clock)
    assert publish.published() == [(T, True)]
    clock.resume(T + 20)
    await run_until_parked(scheduler, clock)
    assert publish.published() == [(T, True)]
    # another runner (a new scheduler) does publish it: the broker's dedupe drops that copy
    other, other_clock, other_publish = scheduler_on(every(60, "last"), T + 20)
    await run_until_parked(other, other_clock)
    assert other_publish.published() == [(T, True)]


async def test_a_restart_after_the_clock_was_set_back_repeats_nothing() -> None:
    scheduler, clock, publish = scheduler_on(every(60), T + 30, limit=T + 100)
    await run_until_parked(scheduler, clock)
    assert publish.published() == [(T + 60, False)]
    clock.resume(T + 59.5, limit=T + 150)  # T + 60 is due again by this clock
    await run_until_parked(scheduler, clock)
    assert publish.published() == [(T + 60, False), (T + 120, False)]


async def test_a_cron_scheduler_fires_once_on_the_fall_back_night() -> None:
    start, end = at("2026-10-24T12:00:00+00:00"), at("2026-10-26T12:00:00+00:00")
    scheduler, clock, publish = scheduler_on(cron("30 2 * * *", "Europe/Berlin"), start, limit=end)
    await run_until_parked(scheduler, clock)
    assert [tick.due for tick in publish.ticks] == ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]


# -- tick ids ---------------------------------------------------------------------------------


async def test_tick_ids_agree_across_schedulers_and_differ_per_due() -> None:
    ids: list[list[str]] = []
    for _runner in range(2):
        scheduler, clock, publish = scheduler_on(cron("*/5 * * * *"), T - 0.5, limit=T + 3600)
        await run_until_parked(scheduler, clock)
        ids.append([tick_id("shop", tick.schedule, tick.due_at) for tick in publish.ticks])
    assert len(ids[0]) == 13
    assert ids[0] == ids[1]
    assert len(set(ids[0])) == 13
    assert uuid.UUID(ids[0][0]).version == 5
    assert tick_id("shop", "nightly", T) != tick_id("mall", "nightly", T)
    assert tick_id("shop", "nightly", T) != tick_id("shop", "hourly", T)


def test_tick_due_is_rfc3339_utc() -> None:
    tick = every(60).tick(T, catch_up=True)
    assert tick == Tick(schedule="poll", due="2027-01-15T08:00:00Z", due_at=T, catch_up=True)
    assert rfc3339(T + 0.25) == "2027-01-15T08:00:00.250000Z"
    assert at("2027-01-15T08:00:00+00:00") == T
