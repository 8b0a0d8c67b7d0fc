"""The retry policy: backoff growth, cap, jitter bounds, classification."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import eventfn


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
