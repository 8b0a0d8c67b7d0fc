"""What the NATS JetStream broker adds to the conformance kit: namespaces, credentials, the
fence JetStream lacks, stream promotion, runners, and a server restart mid-burst.

The contracts every broker shares run in ``test_conformance.py``. These tests need a NATS server
with JetStream on 127.0.0.1:4222 (``shared/SERVICES.md``); each uses a namespace of its own and
drops it. The credential test runs a private ``nats-server`` with a password on a free port; the
fault test restarts the shared one (it keeps JetStream on disk) and always leaves it running.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from eventfn_nats import NatsBroker

import eventfn
from eventfn.brokers import (
    Broker,
    Delivery,
    OutgoingMessage,
    Settlement,
    SubscriptionRef,
    from_url,
)
from eventfn.exceptions import BrokerUnavailable, ConfigurationError, PayloadTooLarge
from tests.conftest import networked_url, require_networked

SERVER = "nats://127.0.0.1:4222"
JOBS = SubscriptionRef(destination="jobs", kind="queue")
ORDERS = SubscriptionRef(destination="orders", kind="stream", group="audit")
HOLD = 60.0
NATS_SERVER = "/usr/sbin/nats-server"
# shared/SERVICES.md: how the shared server is started (idempotent)
START_SHARED = [
    "start-stop-daemon", "--start", "--oknodo", "--background", "--exec", NATS_SERVER, "--",
    "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server",
    "-l", "/var/log/nats-server.log",
]  # fmt: skip


class Job(msgspec.Struct, frozen=True):
    n: int
    key: str = ""


@pytest.fixture
async def url() -> AsyncIterator[str]:
    """A URL of the shared server with a namespace private to the test, dropped afterwards."""
    url = networked_url("nats")
    require_networked("nats", url)
    yield url
    with anyio.move_on_after(30):
        async with from_url(url) as broker:
            await broker.drop()


def _message(n: int, destination: str = "jobs", key: str | None = None) -> OutgoingMessage:
    return OutgoingMessage(
        destination=destination, id=f"m{n}", type="job", body=msgspec.json.encode(Job(n)), key=key
    )


async def _take(
    broker: Broker, ref: SubscriptionRef, count: int, lease: float = HOLD
) -> list[Delivery]:
    got: list[Delivery] = []
    with anyio.fail_after(20):
        while len(got) < count:
            got += await broker.fetch(ref, count - len(got), lease=lease, wait=0.2)
    return got


async def _streams(namespace: str) -> list[str]:
    """Names of the JetStream streams holding subjects of ``namespace``, seen by a raw client."""
    nc = await nats.connect(SERVER)
    try:
        request = json.dumps({"subject": f"{namespace}.>"}).encode()
        answer = json.loads((await nc.request("$JS.API.STREAM.NAMES", request, timeout=5)).data)
        return sorted(answer.get("streams") or [])
    finally:
        await nc.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def _everything_said(error: BaseException) -> str:
    """The error as a log line or a traceback would show it, chained causes included."""
    return str(error) + "".join(traceback.format_exception(error))


# -- URLs ----------------------------------------------------------------------------------------


def test_url_options_and_their_errors() -> None:
    broker = NatsBroker("nats://127.0.0.1:4222?namespace=shop_1&lease=12.5")
    assert (broker.namespace, broker.lease) == ("shop_1", 12.5)
    assert NatsBroker("nats://127.0.0.1").namespace == "eventfn"
    for bad in ("namespace=a.b", "namespace=", "lease=0", "lease=soon", "max_deliver=x"):
        with pytest.raises(ConfigurationError):
            NatsBroker(f"nats://127.0.0.1:4222?{bad}")


def test_describe_hides_passwords_and_tokens() -> None:
    assert "s3cret" not in NatsBroker("nats://app:s3cret@127.0.0.1:4222").describe()
    assert "t0ken" not in NatsBroker("nats://t0ken@127.0.0.1:4222").describe()
    assert from_url("tls://app:s3cret@127.0.0.1:4222").describe().startswith("tls://app:***@")


# -- namespaces ----------------------------------------------------------------------------------


async def test_namespaces_are_isolated_and_drop_deletes_only_its_own(url: str) -> None:
    other_url = networked_url("nats")
    try:
        async with from_url(url) as mine, from_url(other_url) as theirs:
            for broker in (mine, theirs):
                await broker.declare([JOBS, ORDERS])
            await mine.publish([_message(1)])
            await theirs.publish([_message(2)])
            [got] = await _take(theirs, JOBS, 1)
            assert got.id == "m2", "a namespace saw another namespace's message"
            await theirs.settle([Settlement(delivery=got, outcome="ack")])
            assert await theirs.fetch(JOBS, 10, lease=HOLD, wait=0.3) == []
            assert isinstance(mine, NatsBroker) and isinstance(theirs, NatsBroker)
            before = await _streams(theirs.namespace)
            await mine.drop()
            assert await _streams(mine.namespace) == [], "drop left streams behind"
            assert await _streams(theirs.namespace) == before, "drop touched another namespace"
            await theirs.publish([_message(3)])  # the other namespace still works
            assert [d.id for d in await _take(theirs, JOBS, 1)] == ["m3"]
    finally:
        async with from_url(other_url) as broker:
            await broker.drop()


# -- credentials ---------------------------------------------------------------------------------


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[int]:
    """A nats-server of our own that wants user ``app`` with password ``right-pw``."""
    if shutil.which(NATS_SERVER) is None:
        pytest.skip(f"{NATS_SERVER} is not installed")
    port = _free_port()
    log = tmp_path / "nats.log"
    args = ["-a", "127.0.0.1", "-p", str(port), "--user", "app", "--pass", "right-pw"]
    process = subprocess.Popen([NATS_SERVER, *args, "-l", str(log)])
    try:
        deadline = time.monotonic() + 20
        while not _answers(port):  # polling its port under a deadline
            assert time.monotonic() < deadline, "the private nats-server did not listen"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)


async def _until(condition: Any, what: str, seconds: float = 20.0) -> None:
    with anyio.fail_after(seconds):
        for _ in itertools.count():  # an outside process: poll it, under a deadline
            if condition():
                return
            await anyio.sleep(0.05)


async def test_refused_password_is_not_shown(
    private_server: int, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"wrong-{uuid.uuid4().hex[:8]}"
    broker = from_url(f"nats://app:{secret}@127.0.0.1:{private_server}?namespace=x")
    with pytest.raises(BrokerUnavailable) as refused:
        await broker.connect()
    said = _everything_said(refused.value) + caplog.text
    assert secret not in said, "the password shows in the error or the log"
    assert "app:***@127.0.0.1" in str(refused.value), "the error does not name the server"
    await broker.close()


async def test_unreachable_server_is_named_without_token(caplog: pytest.LogCaptureFixture) -> None:
    secret = f"tok{uuid.uuid4().hex[:10]}"
    broker = from_url(f"nats://{secret}@127.0.0.1:{_free_port()}?namespace=x")
    with pytest.raises(BrokerUnavailable) as unreachable:
        await broker.connect()
    assert secret not in _everything_said(unreachable.value) + caplog.text
    assert "***@127.0.0.1" in str(unreachable.value)


# -- the fence JetStream does not keep -----------------------------------------------------------


async def test_jetstream_acks_by_sequence_so_the_broker_fences(url: str) -> None:
    """An ack sent to an old delivery's reply subject settles the *new* delivery on the server:
    the reason receipts fence on the client. A settle with the old receipt changes nothing."""
    async with from_url(url) as slow, from_url(url) as fast:
        await slow.declare([JOBS])
        await slow.publish([_message(1), _message(2)])
        stale = await _take(slow, JOBS, 2, lease=0.3)
        current = await _take(fast, JOBS, 2)  # after the short leases ran out
        assert [d.attempt for d in current] == [2, 2]
        await slow.settle([Settlement(delivery=d, outcome="ack") for d in stale])
        assert (await fast.stats(JOBS)).in_flight == 2, "a stale receipt settled a new lease"
        nc = await nats.connect(SERVER)  # what a client without the fence would do
        try:
            await nc.request(stale[0].receipt.reply, b"", timeout=5)
        finally:
            await nc.close()
        stats = await fast.stats(JOBS)
        assert stats.in_flight == 1, f"JetStream ignored an ack from an old delivery: {stats}"


async def test_cancelled_fetch_loses_nothing(url: str) -> None:
    # A cancelled fetch's lingering pull request can outlive it. What reached this client for
    # it is given back on close (attempt 1); what the server had already sent to it but the
    # client had not read when it closed comes back after AckWait, counted (attempt 2). Either
    # way nothing is lost; with AckWait at 2 s the test does not wait a whole default lease.
    url += "&lease=2"
    async with from_url(url) as leaving, from_url(url) as staying:
        await leaving.declare([JOBS])
        with anyio.move_on_after(0.3):  # its lingering request outlives the cancelled fetch
            await leaving.fetch(JOBS, 10, lease=2, wait=5.0)
        await staying.publish([_message(1)])
        await leaving.close()  # gives back whatever arrived for the cancelled fetch
        [again] = await _take(staying, JOBS, 1, lease=2)
        assert again.id == "m1" and again.attempt in (1, 2), f"came back as {again}"


# -- stream: promotion of a key's next record ----------------------------------------------------


async def test_key_left_without_head_is_promoted_by_a_later_fetch(url: str) -> None:
    """A runner that acked a head and died before promoting the next record loses nothing."""
    async with from_url(url) as broker:
        await broker.declare([ORDERS])
        await broker.publish([_message(1, "orders", key="a"), _message(2, "orders", key="a")])
        [head] = await _take(broker, ORDERS, 1)
        assert head.id == "m1"
        nc = await nats.connect(SERVER)  # the ack, without the promotion that follows it
        try:
            await nc.request(head.receipt.reply, b"", timeout=5)
        finally:
            await nc.close()
        [nxt] = await _take(broker, ORDERS, 1)
        assert (nxt.id, nxt.attempt) == ("m2", 1)


async def test_any_key_keeps_its_order_and_bytes(url: str) -> None:
    keys = ["a.b", "", "ü/ß with spaces", "x" * 300, "\r\nX-Header: no"]
    async with from_url(url) as broker:
        await broker.declare([ORDERS])
        sent = [_message(n, "orders", key=keys[n % len(keys)]) for n in range(2 * len(keys))]
        await broker.publish(sent)
        seen: list[tuple[str | None, str]] = []
        with anyio.fail_after(30):
            while len(seen) < len(sent):
                got = await broker.fetch(ORDERS, 100, lease=HOLD, wait=0.2)
                seen += [(d.key, d.id) for d in got]
                await broker.settle([Settlement(delivery=d, outcome="ack") for d in got])
        for key in keys:
            expected = [m.id for m in sent if m.key == key]
            assert [i for k, i in seen if k == key] == expected, f"key {key!r} out of order"


# -- topics: a replay for one group of a typed topic -------------------------------------------


async def test_replay_reaches_only_its_group_when_groups_filter_one_type(url: str) -> None:
    failing, fine = (
        SubscriptionRef(destination="events", kind="topic", group=g, types=("order.paid",))
        for g in ("failing", "fine")
    )
    async with from_url(url) as broker:
        await broker.declare([failing, fine])
        paid = OutgoingMessage(destination="events", id="p1", type="order.paid", body=b"{}")
        other = OutgoingMessage(destination="events", id="o1", type="order.shipped", body=b"{}")
        await broker.publish([other, paid])
        [copy] = await _take(broker, fine, 1)
        await broker.settle([Settlement(delivery=copy, outcome="ack")])
        [dying] = await _take(broker, failing, 1)
        assert dying.id == "p1"
        await broker.settle([Settlement(delivery=dying, outcome="dead")])
        [record] = await broker.dead_letters(failing.name)
        assert await broker.replay([record.id]) == 1
        [again] = await _take(broker, failing, 1)
        assert (again.id, again.attempt) == ("p1", 1)
        assert await broker.fetch(fine, 10, lease=HOLD, wait=0.3) == [], "replayed to all"
        assert (await broker.stats(fine)).pending == 0


async def test_payload_over_the_server_limit_is_a_publish_error(url: str) -> None:
    async with from_url(url) as broker:
        await broker.declare([JOBS])
        huge = OutgoingMessage(destination="jobs", id="big", type="job", body=b"x" * 2_000_000)
        with pytest.raises(PayloadTooLarge):
            await broker.publish([huge])


# -- runners -------------------------------------------------------------------------------------


def _app(seen: collections.Counter[int], order: dict[str, list[int]]) -> eventfn.App:
    app = eventfn.App("natstest")

    @app.on_queue("jobs")
    async def job(item: Job) -> None:
        seen[item.n] += 1

    @app.on_stream("orders", key="key", group="audit")
    async def audit(item: Job) -> None:
        order.setdefault(item.key, []).append(item.n)

    return app


async def test_two_runners_share_a_burst(url: str) -> None:
    seen: collections.Counter[int] = collections.Counter()
    order: dict[str, list[int]] = {}
    app = _app(seen, order)
    count = 2000
    async with from_url(url) as publisher:
        await app.connect(publisher)
        await app.publish_many(app.message("jobs", Job(n)) for n in range(count))
        await app.publish_many(app.message("orders", Job(n, key=f"k{n % 7}")) for n in range(300))
        summaries = []

        async def run() -> None:
            async with from_url(url) as broker:
                summaries.append(await eventfn.Runner(app, broker, burst=True).run())

        with anyio.fail_after(90):
            async with anyio.create_task_group() as group:
                group.start_soon(run)
                group.start_soon(run)
        await app.close()
    assert set(seen) == set(range(count)), f"{count - len(seen)} jobs were never handled"
    assert sum(s.handled for s in summaries) >= count + 300
    for key, numbers in order.items():
        assert numbers == sorted(numbers), f"key {key} handled out of order: {numbers[:10]}"
    assert sum(len(v) for v in order.values()) >= 300


# -- a server restart during a burst -------------------------------------------------------------


def _listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:``port`` (from /proc, no name matching)."""
    wanted = f"0100007F:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


def _start_shared_server() -> None:
    subprocess.run(START_SHARED, check=False, timeout=30)


async def _restart_shared_server() -> None:
    pid = _listener_pid(4222)
    assert pid is not None, "found no process listening on 127.0.0.1:4222"
    os.kill(pid, signal.SIGTERM)  # by its pid: the server that answers on the port, nothing else
    await _until(lambda: not Path(f"/proc/{pid}").exists(), "nats-server to stop", 30)
    await anyio.to_thread.run_sync(_start_shared_server)
    await _until(lambda: _answers(4222), "nats-server to listen again", 30)


@pytest.mark.slow
async def test_server_restart_mid_burst_loses_nothing(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0 or shutil.which("start-stop-daemon") is None:
        pytest.skip("restarting the shared nats-server needs root and start-stop-daemon")
    caplog.set_level(logging.INFO)
    url += "&lease=5"  # AckWait: an ack lost in the restart comes back after 5 s, not 30
    count = 4000
    seen: collections.Counter[int] = collections.Counter()
    third = anyio.Event()
    app = eventfn.App("natsfault")

    @app.on_queue("jobs")
    async def job(item: Job) -> None:
        seen[item.n] += 1
        if len(seen) >= count // 3:
            third.set()
        await anyio.sleep(0.002)  # a little work, so that the burst is still going on

    try:
        async with from_url(url) as broker:
            await app.connect(broker)
            await app.publish_many(app.message("jobs", Job(n)) for n in range(count))
            runner = eventfn.Runner(app, broker, burst=True, lease=5.0, concurrency=32)

            async def restart_at_a_third() -> None:
                await third.wait()
                await _restart_shared_server()

            with anyio.fail_after(100):
                async with anyio.create_task_group() as group:
                    group.start_soon(restart_at_a_third)
                    summary = await runner.run()
            await app.close()
    finally:
        if not _answers(4222):  # whatever happened, the shared server runs again
            _start_shared_server()
            await _until(lambda: _answers(4222), "nats-server to listen again", 30)
    assert set(seen) == set(range(count)), f"{count - len(seen)} messages were lost"
    assert summary.handled >= count
    logged = caplog.text
    assert "disconnected" in logged and "reconnected" in logged, "the reconnect was not logged"


# -- de-duplication (OutgoingMessage.dedupe) ------------------------------------------------------


def _tick(tag: str, window: float, message_id: str = "tick") -> OutgoingMessage:
    return OutgoingMessage(
        destination="jobs", id=message_id, type="job", body=tag.encode(), dedupe=window
    )


async def _markers(broker: NatsBroker) -> int:
    info = await broker._wire.api(f"STREAM.INFO.{broker.names.dedupe_stream}")
    return int(info["state"]["messages"])


async def test_dedupe_copy_is_dropped_when_its_first_runner_died_before_marking(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with from_url(url) as crashed, from_url(url) as other:
        assert isinstance(crashed, NatsBroker) and isinstance(other, NatsBroker)
        await crashed.declare([JOBS])

        async def dies_before_marking(marks: object) -> None:
            return None

        # the message is stored, its marker never written
        monkeypatch.setattr(crashed._dedupe, "mark", dies_before_marking)
        await crashed.publish([_tick("first", 3600)])
        assert await _markers(crashed) == 0
        # JetStream's own window drops the copy of another runner, which writes the marker
        await other.publish([_tick("copy", 3600)])
        assert await _markers(other) == 1
        await other.publish([_tick("later", 3600)])  # dropped by the marker
        got = await _take(other, JOBS, 1)
        assert [d.body for d in got] == [b"first"]
        assert await other.fetch(JOBS, 10, lease=HOLD, wait=0.3) == []


async def test_dedupe_markers_whose_window_ended_are_swept(url: str) -> None:
    async with from_url(url) as broker:
        assert isinstance(broker, NatsBroker)
        await broker.declare([JOBS])
        await broker.publish([_tick("long", 3600, "long")])  # at the head: holds nothing back
        await broker.publish([_tick("short", 0.5, f"t{n}") for n in range(300)])
        assert await _markers(broker) == 301
        await anyio.sleep(0.6)
        broker._dedupe._next_sweep = 0.0  # sweeps run at most once a minute
        await broker.publish([_tick("new", 3600, "new")])
        assert await _markers(broker) == 2, "markers of ended windows were left behind"
        got = await _take(broker, JOBS, 302)
        assert len({d.id for d in got}) == 302
