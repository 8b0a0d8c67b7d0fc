"""The retry policy: backoff growth, cap, jitter bounds, classification."""

from __future__ import annotations

import uuid

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import eventfn
from eventfn.brokers import Settlement, SubscriptionRef
from eventfn.brokers.memory import MemoryBroker
from eventfn.runtime.process import Processor


class Job(msgspec.Struct):
    n: int


def test_exponential_backoff_without_jitter() -> None:
    policy = eventfn.Retry(attempts=6, backoff=1.0, factor=2.0, cap=10.0, jitter="none")
    assert [policy.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


@given(attempt=st.integers(1, 40), rand=st.floats(0, 1, exclude_max=True))
def test_jitter_stays_within_bounds(attempt: int, rand: float) -> None:
    full = eventfn.Retry(backoff=0.5, factor=3.0, cap=60.0, jitter="full")
    equal = eventfn.Retry(backoff=0.5, factor=3.0, cap=60.0, jitter="equal")
    base = min(60.0, 0.5 * 3.0 ** (attempt - 1))
    assert 0 <= full.delay(attempt, lambda: rand) <= base
    assert base / 2 <= equal.delay(attempt, lambda: rand) <= base


def test_classification() -> None:
    policy = eventfn.Retry(
        attempts=3, on=(ConnectionError, TimeoutError), never=(ConnectionRefusedError,)
    )
    assert policy.classify(ConnectionError(), 1) == "retry"
    assert policy.classify(ConnectionError(), 3) == "dead"
    assert policy.classify(ConnectionRefusedError(), 1) == "dead"  # never wins over on
    assert policy.classify(ValueError(), 1) == "dead"  # not in on


def test_bad_policies_fail_with_a_message() -> None:
    with pytest.raises(eventfn.ConfigurationError, match="attempts must be at least 1"):
        eventfn.Retry(attempts=0)
    with pytest.raises(eventfn.ConfigurationError, match="factor >= 1"):
        eventfn.Retry(factor=0.5)
    with pytest.raises(eventfn.ConfigurationError, match="use 'full', 'equal' or 'none'"):
        eventfn.Retry(jitter="sometimes")  # type: ignore[arg-type]


async def test_a_retry_waits_in_the_broker_until_due_on_a_fake_clock() -> None:
    now = [1_000.0]
    broker = MemoryBroker(f"memory://{uuid.uuid4().hex}", clock=lambda: now[0])
    app = eventfn.App("clock")

    @app.on_queue("jobs", retry=eventfn.Retry(attempts=4, backoff=2.0, factor=3.0, jitter="none"))
    async def fail(job: Job) -> None:
        raise ConnectionError("down")

    ref = SubscriptionRef(destination="jobs", kind="queue")
    await app.connect(broker)
    await app.publish("jobs", Job(1))
    processor = Processor(app, app.subscriptions[0], (), broker.clock)
    for expected_delay in (2.0, 6.0, 18.0):
        (delivery,) = await broker.fetch(ref, 1, lease=30)
        settlement: Settlement = await processor(delivery)
        assert settlement.outcome == "retry" and settlement.delay == expected_delay
        await broker.settle([settlement])
        now[0] += expected_delay - 0.001
        assert await broker.fetch(ref, 1, lease=30) == []  # not a moment before it is due
        now[0] += 0.001
    (last,) = await broker.fetch(ref, 1, lease=30)
    assert last.attempt == 4 and (await processor(last)).outcome == "dead"
