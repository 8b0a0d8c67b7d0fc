"""An app's sources inside its runner: bucket watchers and schedulers, which only publish.

An upload or a tick becomes a message on the broker like any other, so that it gets retries,
dead letters, idempotency and traces from the one delivery path (``DESIGN.md`` section 1).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import anyio
import msgspec

from eventfn.app import App
from eventfn.brokers.base import Broker
from eventfn.sources.records import UploadRecord, destination, message_id
from eventfn.sources.schedule import Schedule, Scheduler, Tick, tick_id

log = logging.getLogger("eventfn.sources")

TICK_TYPE = "eventfn.schedule.tick"


async def run_sources(
    app: App,
    broker: Broker,
    *,
    burst: bool = False,
    watch: bool = True,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Start the app's sources; ready once every bucket was scanned for what arrived meanwhile.

    In burst mode the buckets are scanned once (their backlog is published, then drained) and
    schedules do not run: a burst handles what is there, it does not wait for time to pass.
    ``watch=False`` leaves the buckets alone; schedulers wait with ``sleep`` (a test passes a
    virtual one, with the broker's clock).
    """
    from eventfn.sources.watch import BucketWatcher

    async with anyio.create_task_group() as tasks:
        for bucket, deletions in app.watched.items() if watch else ():
            watcher = BucketWatcher(
                app.buckets.store(bucket),
                partial(publish_uploads, app, broker, bucket),
                deletions=deletions,
            )
            if burst:
                await watcher.scan()
            else:
                await tasks.start(watcher.run)
        if not burst:
            for spec in app.schedules.values():
                scheduler = Scheduler(
                    spec,
                    partial(publish_tick, app, broker, spec),
                    clock=broker.clock,
                    sleep=sleep,
                )
                await tasks.start(scheduler.run)
        task_status.started()


async def publish_uploads(
    app: App, broker: Broker, bucket: str, records: Sequence[UploadRecord]
) -> None:
    """Publish object events, each under the id its bucket, key and version give it."""
    messages = [
        app.message(
            destination(bucket),
            record,
            type=record.type,
            subject=record.key,
            id=message_id(record.bucket, record.key, record.version, record.event),
        )
        for record in records
    ]
    await app.publish_many(messages, broker=broker)


async def publish_tick(app: App, broker: Broker, spec: Schedule, tick: Tick) -> None:
    """Publish a tick once across runners: its id comes from the schedule and due time, and
    the broker drops a second copy of it for about two periods."""
    message = app.message(
        f"schedule.{spec.name}",
        tick,
        type=TICK_TYPE,
        subject=spec.name,
        id=tick_id(app.name, spec.name, tick.due_at),
    )
    window = 2 * spec.period_hint(tick.due_at) + 60.0
    await app.publish_many([msgspec.structs.replace(message, dedupe=window)], broker=broker)
