"""Schedules inside real runners: each tick handled once across runners; missed ticks."""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from collections.abc import Callable

import anyio
import pytest

import eventfn
from eventfn.brokers import Broker
from eventfn.brokers.memory import MemoryBroker


async def test_two_runners_on_one_broker_handle_each_tick_once(
    make_broker: Callable[[], Broker],
) -> None:
    app = eventfn.App("clock")
    ticks: Counter[float] = Counter()
    enough = anyio.Event()

    @app.on_schedule(every=0.5)
    async def beat(tick: eventfn.Tick) -> None:
        ticks[tick.due_at] += 1
        if len(ticks) >= 5:  # both schedulers publish every tick; five came due
            enough.set()

    async with make_broker() as one, make_broker() as two:
        await app.declare(one)
        runners = [eventfn.Runner(app, b, poll=0.05, grace=1) for b in (one, two)]
        async with anyio.create_task_group() as tasks:
            for runner in runners:
                tasks.start_soon(runner.run)
            with anyio.fail_after(30):
                await enough.wait()
            await anyio.sleep(0.3)  # a second copy would be handled by now
            for runner in runners:
                runner.stop()
    assert ticks and set(ticks.values()) == {1}, ticks
    assert all(math.isclose(due % 0.5, 0, abs_tol=1e-6) for due in ticks)


@pytest.mark.parametrize(("missed", "expected"), [("last", 1), ("skip", 0)])
async def test_after_ten_minutes_down_last_runs_one_catch_up_tick_and_skip_none(
    missed: str, expected: int
) -> None:
    app = eventfn.App("clock")
    got: list[eventfn.Tick] = []
    arrived = anyio.Event()

    @app.on_schedule(every=60, missed=missed)
    async def minutely(tick: eventfn.Tick) -> None:
        got.append(tick)
        arrived.set()

    stopped_at = 60.0 * 29_916_667  # a due instant (a multiple of 60): the last one handled
    # the runner starts ten minutes later, between two due instants; its clock runs on from there
    offset = stopped_at + 10 * 60 + 25 - time.time()
    clock = lambda: time.time() + offset  # noqa: E731
    async with MemoryBroker(f"memory://sched-{uuid.uuid4().hex}", clock=clock) as broker:
        await app.connect(broker)
        runner = eventfn.Runner(app, broker, poll=0.05, grace=1)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(runner.run)
            if expected:
                with anyio.fail_after(10):
                    await arrived.wait()
            await anyio.sleep(0.5)  # nothing more comes: the next tick is 35 s ahead
            runner.stop()
    assert len(got) == expected
    if expected:
        (tick,) = got
        assert tick.catch_up and tick.due_at == stopped_at + 600
        assert tick.schedule == "minutely" and tick.due.endswith("Z")


def test_schedule_mistakes_fail_at_registration_naming_the_handler() -> None:
    app = eventfn.App("clock")
    with pytest.raises(eventfn.RegistrationError, match="nightly"):

        @app.on_schedule(cron="0 25 * * *")
        async def nightly() -> None: ...

    with pytest.raises(eventfn.RegistrationError, match="missed"):

        @app.on_schedule(every=60, missed="all")
        async def often() -> None: ...
