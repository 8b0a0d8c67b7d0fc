"""The bucket watcher: one event per complete object version, once, across restarts and watchers."""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from eventfn.exceptions import BrokerUnavailable
from eventfn.sources import watch
from eventfn.sources.buckets import DirectoryBucket
from eventfn.sources.records import UploadRecord, message_id
from eventfn.sources.watch import BucketWatcher

SETTLE = 0.2
_barriers = itertools.count()


class Sink:
    """A publish callable that keeps what it is given; it can fail its first calls or hang."""

    def __init__(self, *, fail: int = 0, hang: bool = False) -> None:
        self.records: list[UploadRecord] = []
        self.calls = 0
        self.fail = fail
        self.hang = hang
        self.called = anyio.Event()

    async def __call__(self, records: Sequence[UploadRecord]) -> None:
        self.calls += 1
        self.called.set()
        if self.hang:
            await anyio.sleep_forever()
        if self.calls <= self.fail:
            raise BrokerUnavailable("broker down")
        self.records.extend(records)

    def seen(self, event: str = "created") -> list[str]:
        return [r.key for r in self.records if r.event == event and "barrier" not in r.key]


async def until(condition: Callable[[], bool], within: float = 30.0) -> None:
    """Wait for a condition on what was published, looking every 20 ms, with a deadline."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 (the watcher has no event to wait on here)
            await anyio.sleep(0.02)


async def barrier(bucket: DirectoryBucket, sink: Sink) -> None:
    """Write one more file and wait for its event: whatever was due before it has come too."""
    key = f"barrier-{next(_barriers)}.txt"
    (bucket.directory / key).write_bytes(b"b")
    await until(lambda: key in [r.key for r in sink.records])


@asynccontextmanager
async def watching(
    bucket: DirectoryBucket, publish: Any, **options: Any
) -> AsyncIterator[BucketWatcher]:
    watcher = BucketWatcher(bucket, publish, **{"settle": SETTLE, **options})
    async with anyio.create_task_group() as tasks:
        await tasks.start(watcher.run)
        yield watcher
        tasks.cancel_scope.cancel()


@pytest.fixture
def bucket(tmp_path: Path) -> DirectoryBucket:
    return DirectoryBucket("inbox", tmp_path / "buckets")


@pytest.fixture(params=["notify", "poll"])
def mode(request: pytest.FixtureRequest) -> dict[str, Any]:
    """File notifications, or scans only (as on a network file system)."""
    return {} if request.param == "notify" else {"poll": 0.1}


def write_slowly(
    path: Path, chunks: int, pause: float, done: threading.Event | None = None
) -> None:
    with path.open("wb") as f:
        for i in range(chunks):
            f.write(bytes([i]) * 1000)
            f.flush()
            time.sleep(pause)  # a slow writer, not synchronisation
    if done is not None:
        done.set()


async def test_slow_chunked_writer_gives_one_event_after_it_finished(
    bucket: DirectoryBucket, mode: dict[str, Any]
) -> None:
    finished = threading.Event()
    finished_when_published: list[bool] = []
    sink = Sink()

    async def publish(records: Sequence[UploadRecord]) -> None:
        finished_when_published.extend(finished.is_set() for _ in records)
        await sink(records)

    async with watching(bucket, publish, **mode):
        path = bucket.directory / "slow.bin"
        await anyio.to_thread.run_sync(write_slowly, path, 5, 0.1, finished)
        await until(lambda: sink.seen() == ["slow.bin"])
        await barrier(bucket, sink)
    [record] = [r for r in sink.records if r.key == "slow.bin"]
    assert record.size == 5000 and record == await bucket.stat("slow.bin")
    assert all(finished_when_published) and sink.seen() == ["slow.bin"]


async def test_hidden_and_temporary_files_are_no_objects(
    bucket: DirectoryBucket, mode: dict[str, Any]
) -> None:
    sink = Sink()
    async with watching(bucket, sink, **mode):
        d = bucket.directory
        (d / ".git").mkdir()
        for name in [".hidden", ".git/config", "x.tmp", "a.part", "b~", "c.crdownload", "d.swp"]:
            (d / name).write_bytes(b"not an object")
        (d / "real.txt").write_bytes(b"an object")
        await until(lambda: "real.txt" in sink.seen())
        await barrier(bucket, sink)
    assert sink.seen() == ["real.txt"]


async def test_a_rename_into_place_gives_one_event_for_the_final_name(
    bucket: DirectoryBucket, mode: dict[str, Any]
) -> None:
    sink = Sink()
    async with watching(bucket, sink, **mode):
        part = bucket.directory / "upload.bin.part"
        await anyio.to_thread.run_sync(write_slowly, part, 3, 0.3)  # pauses longer than settle
        part.rename(bucket.directory / "upload.bin")
        await until(lambda: "upload.bin" in sink.seen())
        await barrier(bucket, sink)
    assert sink.seen() == ["upload.bin"] and sink.records[0].size == 3000


async def test_an_overwrite_is_a_new_event_the_same_content_is_not(
    bucket: DirectoryBucket, mode: dict[str, Any]
) -> None:
    sink = Sink()
    async with watching(bucket, sink, rescan=0.1, **mode):
        first = await bucket.put("report.csv", b"a,b\n1,2\n")
        await until(lambda: len(sink.seen()) == 1)
        os.utime(bucket.directory / "report.csv", ns=(0, int(first.version.split("-")[1])))
        await barrier(bucket, sink)  # a second sighting, an attribute change: no new event
        second = await bucket.put("report.csv", b"a,b\n1,2\n3,4\n")
        await until(lambda: len(sink.seen()) == 2)
        await barrier(bucket, sink)
    created = [r for r in sink.records if r.key == "report.csv"]
    assert [r.version for r in created] == [first.version, second.version]
    assert created[1].etag == second.etag != first.etag


async def test_many_files_from_concurrent_writers_give_one_event_each(
    bucket: DirectoryBucket, mode: dict[str, Any]
) -> None:
    def writer(n: int) -> None:
        (bucket.directory / f"w{n}").mkdir()
        for i in range(250):
            with (bucket.directory / f"w{n}" / f"file-{i:04}.txt").open("wb") as f:
                f.write(b"x" * (i + 1))

    sink = Sink()
    async with watching(bucket, sink, **mode):
        async with anyio.create_task_group() as writers:
            for n in range(4):
                writers.start_soon(anyio.to_thread.run_sync, writer, n)
        await until(lambda: len(sink.seen()) >= 1000, within=60)
        await barrier(bucket, sink)
    async with watching(bucket, sink, **mode):
        await barrier(bucket, sink)  # the ledger keeps a restart from publishing them again
    keys = sink.seen()
    assert len(keys) == len(set(keys)) == 1000
    assert sink.calls < 100  # in batches


async def test_objects_stored_meanwhile_are_published_on_start_and_only_once(
    bucket: DirectoryBucket,
) -> None:
    for i in range(20):
        (bucket.directory / f"offline-{i}.txt").write_bytes(b"%d" % i)
    sink = Sink()
    async with watching(bucket, sink):
        assert sorted(sink.seen()) == sorted(f"offline-{i}.txt" for i in range(20))
    (bucket.directory / "later.txt").write_bytes(b"later")
    async with watching(bucket, sink):
        assert len(sink.seen()) == 21 and sink.seen()[-1] == "later.txt"
        await barrier(bucket, sink)
    counts = Counter(sink.seen())
    assert len(counts) == 21 and set(counts.values()) == {1}
    assert await BucketWatcher(bucket, sink, settle=SETTLE).scan() == 0  # eventfn run --burst


async def test_two_watchers_publish_each_object_exactly_once(bucket: DirectoryBucket) -> None:
    sink = Sink()
    async with watching(bucket, sink), watching(bucket, sink):
        for i in range(100):
            (bucket.directory / f"shared-{i}.txt").write_bytes(b"x")
        await bucket.put("shared-put.txt", b"y")
        await until(lambda: len(set(sink.seen())) == 101)
        await barrier(bucket, sink)
        await barrier(bucket, sink)
    assert len(sink.seen()) == 101


async def test_a_failing_publish_is_retried_and_nothing_is_lost(bucket: DirectoryBucket) -> None:
    sink = Sink(fail=2)
    async with watching(bucket, sink):
        for i in range(10):
            (bucket.directory / f"retry-{i}.txt").write_bytes(b"x")
        await until(lambda: len(sink.seen()) == 10)
        await barrier(bucket, sink)
    assert sink.calls >= 3 and len(sink.seen()) == 10


async def test_a_claim_left_by_a_crashed_watcher_is_taken_over(bucket: DirectoryBucket) -> None:
    (bucket.directory / "orphan.txt").write_bytes(b"claimed, never published")
    stuck = Sink(hang=True)
    sink = Sink()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as crashed:
            crashed.start_soon(BucketWatcher(bucket, stuck, settle=SETTLE).run)
            await stuck.called.wait()  # it claimed the object and is publishing it
            # a second watcher sees the claim held, and takes it over once it is stale
            async with watching(bucket, sink, claim_timeout=0.5):
                await until(lambda: sink.seen() == ["orphan.txt"])
            crashed.cancel_scope.cancel()
    # a watcher that starts after the crash takes it over as well, under the same id
    db = sqlite3.connect(bucket.state_dir / "ledger.sqlite3")
    with db:
        db.execute("UPDATE uploads SET state = 'claimed', claimed_at = 0")
    db.close()
    async with watching(bucket, sink):
        await until(lambda: sink.seen() == ["orphan.txt"] * 2)
    first, again = sink.records
    assert message_id(first.bucket, first.key, first.version) == message_id(
        again.bucket, again.key, again.version
    )


async def test_deletions_are_published_once_when_asked_for(bucket: DirectoryBucket) -> None:
    sink = Sink()
    async with watching(bucket, sink, deletions=True):
        created = await bucket.put("gone.txt", b"bye")
        for i in range(3):
            await bucket.put(f"dir/{i}.txt", b"x")
        await until(lambda: len(sink.seen()) == 4)
        await bucket.delete("gone.txt")
        await until(lambda: sink.seen("deleted") == ["gone.txt"])
        shutil.rmtree(bucket.directory / "dir")
        await until(lambda: len(sink.seen("deleted")) == 4)
        await barrier(bucket, sink)
    [deleted] = [r for r in sink.records if r.key == "gone.txt" and r.event == "deleted"]
    assert (deleted.event, deleted.version, deleted.etag, deleted.size) == (
        "deleted",
        created.version,
        created.etag,
        0,
    )
    await bucket.put("kept.txt", b"k")
    await BucketWatcher(bucket, sink, settle=SETTLE, deletions=True).scan()
    (bucket.directory / "kept.txt").unlink()  # while no watcher runs
    async with watching(bucket, sink, deletions=True):
        assert sink.seen("deleted")[-1] == "kept.txt"
    assert sorted(Counter(sink.seen("deleted")).values()) == [1] * 5


async def test_without_deletions_a_deleted_object_gives_no_event(bucket: DirectoryBucket) -> None:
    sink = Sink()
    async with watching(bucket, sink):
        await bucket.put("a.txt", b"a")
        await until(lambda: sink.seen() == ["a.txt"])
        await bucket.delete("a.txt")
        await barrier(bucket, sink)
    assert sink.seen("deleted") == []


async def test_symlinks_in_a_bucket_are_not_followed(
    bucket: DirectoryBucket, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    sink = Sink()
    async with watching(bucket, sink, rescan=0.1):
        (bucket.directory / "link.txt").symlink_to(outside / "secret.txt")
        (bucket.directory / "dirlink").symlink_to(outside)
        (outside / "new.txt").write_bytes(b"written outside")
        await barrier(bucket, sink)
        await barrier(bucket, sink)
    assert sink.seen() == []


async def test_published_elsewhere_is_not_published_again(bucket: DirectoryBucket) -> None:
    record = await bucket.put("direct.txt", b"published by the put path")
    await bucket.mark_published([record])
    sink = Sink()
    async with watching(bucket, sink):
        await barrier(bucket, sink)
    assert sink.seen() == []


async def test_without_notifications_the_watcher_falls_back_to_scans(
    bucket: DirectoryBucket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def silent(*paths: Any, **options: Any) -> AsyncIterator[set[Any]]:
        await anyio.sleep_forever()
        yield set()

    async def broken(*paths: Any, **options: Any) -> AsyncIterator[set[Any]]:
        raise OSError("OS file watch limit reached")
        yield set()

    monkeypatch.setattr(watch, "_PROBE_TIMEOUT", 0.3)
    monkeypatch.setattr(watch, "_FALLBACK_POLL", 0.1)
    for fake, warning in [(silent, "no file notifications"), (broken, "watch limit reached")]:
        monkeypatch.setattr(watch, "awatch", fake)
        sink = Sink()
        async with watching(bucket, sink):
            await barrier(bucket, sink)
        assert warning in caplog.text
