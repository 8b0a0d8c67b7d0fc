"""What a user's type checker sees: checked by ``mypy --strict`` (``tests/test_public_api.py``),
never imported by pytest.

Each ``assert_type`` and each ``reveal_type(...)  # revealed: T`` pins a promise of the public
API: the decorators of ``App`` and ``Router`` hand back the handler with its own type (so it
stays callable, and checked, in unit tests), publishing returns the message id, and
``Context[Resources].state`` is a ``Resources``. ``assert_type`` takes a ``Callable`` only for a
handler with positional-only parameters (mypy tells ``def (job: Job)`` and ``Callable[[Job], ...]``
apart); for the usual handlers the test compares the revealed type, module paths left out, with
the comment.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import timedelta
from typing import Any, assert_type, reveal_type

import msgspec

import eventfn


class Job(msgspec.Struct, frozen=True):
    n: int


class OrderAccepted(msgspec.Struct, frozen=True):
    order_id: str


class Resources:
    def __init__(self, region: str) -> None:
        self.region = region


app = eventfn.App("typing", retry=eventfn.Retry(attempts=3, backoff=0.5), timeout=10)
router = eventfn.Router(retry=eventfn.Retry(attempts=8))


# -- App decorators return the handler unchanged --------------------------------------------------


@app.on_queue("positional")
async def positional(job: Job, /) -> None: ...


assert_type(positional, Callable[[Job], Coroutine[Any, Any, None]])


@app.on_queue("jobs", concurrency=4, retry=eventfn.Retry(attempts=5), rate="10/s")
async def work(job: Job) -> None: ...


reveal_type(work)  # revealed: def (job: Job) -> Coroutine[Any, Any, None]


@app.on_topic("job-events", group="audit", timeout=2.5, breaker=False)
async def audit(job: Job, ctx: eventfn.Context[Any]) -> None: ...


reveal_type(audit)  # revealed: def (job: Job, ctx: Context[Any]) -> Coroutine[Any, Any, None]


@app.on_stream("clicks", key="n", group="sessionize", skip_key_on_error=True)
async def sessionize(job: Job) -> None: ...


reveal_type(sessionize)  # revealed: def (job: Job) -> Coroutine[Any, Any, None]


@app.on_stream("views", key=lambda job: str(job.n), idempotency_key=lambda job: str(job.n))
async def count(job: Job) -> int:
    return job.n


reveal_type(count)  # revealed: def (job: Job) -> Coroutine[Any, Any, int]


@app.on_event(OrderAccepted, group="reserve", idempotent=True, emits=[Job, "jobs"])
async def reserve(event: OrderAccepted) -> None: ...


reveal_type(reserve)  # revealed: def (event: OrderAccepted) -> Coroutine[Any, Any, None]


@app.on_upload(bucket="inbox", match=["*.txt", "*.md"], events=["created", "deleted"])
async def analyse(upload: eventfn.Upload) -> None: ...


reveal_type(analyse)  # revealed: def (upload: Upload) -> Coroutine[Any, Any, None]


@app.on_schedule(cron="0 2 * * *", tz="Europe/Berlin", missed="last")
async def nightly(tick: eventfn.Tick) -> None: ...


@app.on_schedule(every=timedelta(minutes=5))
async def poll(tick: eventfn.Tick) -> None: ...


reveal_type(nightly)  # revealed: def (tick: Tick) -> Coroutine[Any, Any, None]
reveal_type(poll)  # revealed: def (tick: Tick) -> Coroutine[Any, Any, None]


@app.on_queue("batches", batch=100, batch_wait=0.5)
async def many(jobs: list[Job]) -> eventfn.BatchResult:
    return eventfn.BatchResult(failed=jobs[:1])


reveal_type(many)  # revealed: def (jobs: list[Job]) -> Coroutine[Any, Any, BatchResult]


# -- Router decorators too ------------------------------------------------------------------------


@router.on_queue("router-jobs", concurrency=2)
async def routed(job: Job) -> None: ...


@router.on_topic("router-events", group="g")
async def routed_fact(job: Job, ctx: eventfn.Context[Any]) -> None: ...


@router.on_stream("router-stream", key="n")
async def routed_stream(job: Job) -> None: ...


@router.on_event(OrderAccepted, group="router-reserve")
async def routed_event(event: OrderAccepted) -> None: ...


@router.on_upload(bucket="router-inbox", suffix=".pdf")
async def routed_upload(upload: eventfn.Upload) -> None: ...


@router.on_schedule(every=60, missed="skip")
async def routed_schedule(tick: eventfn.Tick) -> None: ...


reveal_type(routed)  # revealed: def (job: Job) -> Coroutine[Any, Any, None]
reveal_type(routed_fact)  # revealed: def (job: Job, ctx: Context[Any]) -> Coroutine[Any, Any, None]
reveal_type(routed_stream)  # revealed: def (job: Job) -> Coroutine[Any, Any, None]
reveal_type(routed_event)  # revealed: def (event: OrderAccepted) -> Coroutine[Any, Any, None]
reveal_type(routed_upload)  # revealed: def (upload: Upload) -> Coroutine[Any, Any, None]
reveal_type(routed_schedule)  # revealed: def (tick: Tick) -> Coroutine[Any, Any, None]
app.include(router, prefix="billing.")


# -- the lifespan and typed state -----------------------------------------------------------------


@app.lifespan
@contextlib.asynccontextmanager
async def resources(app: eventfn.App) -> AsyncIterator[Resources]:
    yield Resources(region="eu")


@app.on_queue("typed-state")
async def uses_state(job: Job, ctx: eventfn.Context[Resources]) -> None:
    assert_type(ctx.state, Resources)
    assert_type(ctx.state.region, str)
    assert_type(ctx.attempt, int)
    assert_type(ctx.message_id, str)
    assert_type(ctx.key, str | None)
    assert_type(await ctx.emit(OrderAccepted(order_id="o1")), str)
    assert_type(await ctx.publish("jobs", Job(n=1)), str)


# -- publishing returns message ids; handlers stay callable ---------------------------------------


async def publisher() -> None:
    assert_type(await app.publish("jobs", Job(n=1), key="k", delay=1.5), str)
    assert_type(await app.emit(OrderAccepted(order_id="o1")), str)
    await app.publish_many([app.message("jobs", Job(n=n)) for n in range(3)])
    assert_type(await work(Job(n=1)), None)
    assert_type(await count(Job(n=2)), int)
    async with app as connected:
        assert_type(connected, eventfn.App)
        assert_type(await connected.dead_letters().count(), int)
