"""Property: a stream subscription handles each key's records one at a time, in publish order,
whatever the keys, handler delays and transient failures (hypothesis)."""

from __future__ import annotations

import uuid
from collections import defaultdict

import anyio
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eventfn
from eventfn.brokers.memory import MemoryBroker


class Record(msgspec.Struct, frozen=True):
    key: str
    seq: int
    delay_us: int
    fails: bool


records_strategy = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 800), st.booleans()), min_size=1, max_size=60
)


async def drain(plan: list[tuple[int, int, bool]]) -> tuple[dict[str, list[int]], list[str]]:
    app = eventfn.App("prop", retry=eventfn.Retry(attempts=3, backoff=0.001, cap=0.002))
    handled: dict[str, list[int]] = defaultdict(list)
    busy: set[str] = set()
    overlaps: list[str] = []

    @app.on_stream("records", key="key", group="g")
    async def handle(record: Record, ctx: eventfn.Context) -> None:
        if record.key in busy:
            overlaps.append(record.key)
        busy.add(record.key)
        try:
            await anyio.sleep(record.delay_us / 1e6)
            if record.fails and ctx.attempt == 1:
                raise ConnectionError("transient")
            handled[record.key].append(record.seq)
        finally:
            busy.discard(record.key)

    broker = MemoryBroker(f"memory://{uuid.uuid4().hex}")
    await app.connect(broker)
    await app.publish_many(
        app.message("records", Record(key=f"k{k}", seq=n, delay_us=d, fails=f))
        for n, (k, d, f) in enumerate(plan)
    )
    with anyio.fail_after(30):
        await eventfn.Runner(app, broker, concurrency=32, burst=True, poll=0.01).run()
    return handled, overlaps


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=records_strategy)
def test_per_key_order_holds(plan: list[tuple[int, int, bool]]) -> None:
    handled, overlaps = anyio.run(drain, plan)
    expected: dict[str, list[int]] = defaultdict(list)
    for n, (k, _, _) in enumerate(plan):
        expected[f"k{k}"].append(n)
    assert handled == expected
    assert overlaps == []
