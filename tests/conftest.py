"""Fixtures shared by the whole suite: one broker per embedded backend, with readable ids."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from eventfn.brokers import Broker, from_url
from eventfn.brokers.memory import MemoryBroker

BROKERS = ["memory", "sqlite"]
"""The brokers every broker-level test runs on: the embedded ones, no service needed."""


@pytest.fixture(params=BROKERS)
def broker_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker_url(broker_name: str, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty broker of that backend, private to the test."""
    if broker_name == "memory":
        url = f"memory://{uuid.uuid4().hex}"  # memory brokers share state per URL
        yield url
        MemoryBroker.reset(url)
        return
    try:
        importlib.import_module(f"eventfn.brokers.{broker_name}")
    except ImportError as exc:
        # Fail, never skip: a broker that does not import is a broken build.
        pytest.fail(f"the {broker_name} broker cannot be imported: {exc!r}")
    yield f"{broker_name}:///{tmp_path / 'broker.db'}"


@pytest.fixture
def make_broker(broker_url: str) -> Callable[[], Broker]:
    """Makes new, unconnected brokers on one storage: each acts as another runner."""
    return lambda: from_url(broker_url)


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    """A connected broker of each embedded backend, private to the test."""
    async with from_url(broker_url) as connected:
        yield connected
