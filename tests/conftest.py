"""Fixtures shared by the whole suite: one broker per backend, with readable ids.

The embedded brokers (memory, sqlite) always run. Each networked broker whose plug-in ships in
``plugins/`` runs against its real server on loopback (``../shared/SERVICES.md``), in a
namespace of its own that is dropped after the test. Outside CI a missing server or plug-in
skips those tests with the reason; under ``CI=true`` it fails them: nothing is silently skipped.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest

from eventfn.brokers import Broker, from_url, installed_schemes
from eventfn.brokers.memory import MemoryBroker

ROOT = Path(__file__).resolve().parents[1]

NETWORKED = {
    "redis": "redis://127.0.0.1:6379/0?namespace={ns}",
    "nats": "nats://127.0.0.1:4222?namespace={ns}",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/?namespace={ns}",
    "postgresql": "postgresql://127.0.0.1:5432/test?namespace={ns}",
}
"""URL templates of the networked brokers; ``{ns}`` is a namespace private to one test."""

BROKERS = ["memory", "sqlite"] + [name for name in NETWORKED if (ROOT / "plugins" / name).is_dir()]
"""Every broker the project ships: the broker-level suites run on each."""

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def server_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 2):
            return True
    except OSError:
        return False


def require_networked(name: str, url: str) -> None:
    """Skip (outside CI) or fail (in CI) when a networked broker cannot run here."""
    problem = None
    if name not in installed_schemes():
        problem = f"the {name} plug-in is not installed (make test installs plugins/{name})"
    elif not server_answers(url):
        problem = f"no {name} server answers at {urlsplit(url).netloc.rsplit('@', 1)[-1]}"
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"{problem}; under CI=true a missing server or plug-in is a failure")
    pytest.skip(f"{problem} (see shared/SERVICES.md or the README to run it)")


def networked_url(name: str) -> str:
    return NETWORKED[name].format(ns=f"t{uuid.uuid4().hex[:12]}")


async def drop(url: str) -> None:
    with anyio.fail_after(60):  # a drop that hangs is a bug, not something to ignore
        async with from_url(url) as broker:
            await broker.drop()


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
    if broker_name == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
        return
    url = networked_url(broker_name)
    require_networked(broker_name, url)
    yield url
    anyio.run(drop, url)


@pytest.fixture
def make_broker(broker_url: str) -> Callable[[], Broker]:
    """Makes new, unconnected brokers on one storage: each acts as another runner."""
    return lambda: from_url(broker_url)


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    """A connected broker of each backend, private to the test."""
    async with from_url(broker_url) as connected:
        yield connected


@pytest.fixture(autouse=True)
def _buckets_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Local buckets of every test live in its own temporary directory, never in the repo."""
    monkeypatch.setenv("EVENTFN_BUCKETS", str(tmp_path / "buckets"))
