"""Upload triggers inside real runners: once per completed object, never lost, never doubled."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

import eventfn
from eventfn.brokers import from_url

Key = tuple[str, str]


class Seen:
    """Events handled so far, and a way to wait for the next one."""

    def __init__(self) -> None:
        self.counts: Counter[Key] = Counter()
        self._changed = anyio.Event()

    def add(self, key: Key) -> None:
        self.counts[key] += 1
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, condition: Callable[[Counter[Key]], bool]) -> None:
        with anyio.fail_after(60):
            while not condition(self.counts):
                await self._changed.wait()


def upload_app(root: Path, seen: Seen) -> eventfn.App:
    app = eventfn.App("docs", buckets=root)

    @app.on_upload(bucket="inbox", suffix=".txt", events=["created", "deleted"])
    async def ingest(upload: eventfn.Upload) -> None:
        if upload.event == "created":
            assert upload.path.read_bytes() == await upload.read()
        seen.add((upload.key, upload.event))

    return app


async def running(app: eventfn.App, url: str, seen: Seen, until: int, *, runners: int = 1) -> None:
    """Run ``runners`` runners until ``until`` events were handled, and a while longer."""
    async with anyio.create_task_group() as tasks:
        started = []
        for _ in range(runners):
            broker = from_url(url)
            await broker.connect()
            runner = eventfn.Runner(app, broker, poll=0.05, grace=2)
            started.append((runner, broker))
            tasks.start_soon(runner.run)
        await seen.until(lambda counts: sum(counts.values()) >= until)
        await anyio.sleep(1.5)  # longer than the watchers' settle time: a second event would show
        for runner, _ in started:
            runner.stop()
    for _, broker in started:
        await broker.close()


async def test_files_copied_in_by_other_programs_and_put_by_the_app_fire_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EVENTFN_BUCKETS")
    root, url = tmp_path / "buckets", f"sqlite:///{tmp_path / 'b.db'}"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "before.txt").write_text("arrived while no runner was up")
    seen = Seen()
    app = upload_app(root, seen)
    source = tmp_path / "scan.txt"
    source.write_text("copied by cp")

    async def feed() -> None:
        await seen.until(lambda c: c["before.txt", "created"] == 1)  # the start-up scan
        await anyio.to_thread.run_sync(shutil.copy, source, inbox / "copied.txt")
        await app.buckets["inbox"].put("put/by-app.txt", b"stored by the app")
        (inbox / ".partial.txt").write_text("hidden: never an object")
        (inbox / "notes.md").write_text("not a .txt: filtered out")
        await seen.until(lambda c: c["copied.txt", "created"] == 1)
        (inbox / "copied.txt").write_text("overwritten: a new version")
        await seen.until(lambda c: c["copied.txt", "created"] == 2)
        (inbox / "before.txt").unlink()

    async with from_url(url) as broker:
        await app.connect(broker)  # app.buckets[...].put publishes on this connection
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(feed)
            await running(app, url, seen, until=5)
    assert seen.counts == {
        ("before.txt", "created"): 1,
        ("copied.txt", "created"): 2,  # the copy, then the overwrite
        ("put/by-app.txt", "created"): 1,
        ("before.txt", "deleted"): 1,
    }


async def test_two_runners_watching_one_bucket_publish_each_object_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EVENTFN_BUCKETS")
    root, url = tmp_path / "buckets", f"sqlite:///{tmp_path / 'b.db'}"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    for n in range(150):  # waiting at start-up: both runners scan them
        (inbox / f"early-{n:03}.txt").write_text(f"doc {n}")
    seen = Seen()
    app = upload_app(root, seen)

    async def feed() -> None:
        await seen.until(lambda c: len(c) >= 150)
        for n in range(150):  # arriving while both watch
            await anyio.to_thread.run_sync((inbox / f"late-{n:03}.txt").write_text, f"doc {n}")

    async with from_url(url) as broker:
        await app.declare(broker)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(feed)
        await running(app, url, seen, until=300, runners=2)
    assert len(seen.counts) == 300 and set(seen.counts.values()) == {1}


async def test_an_object_over_the_apps_size_limit_is_reported_not_loaded(tmp_path: Path) -> None:
    from eventfn.sources.buckets import ObjectTooLarge

    app = eventfn.App("docs", buckets=tmp_path / "b", max_object_size=1024)
    record = await app.buckets.store("scans").put("big.pdf", b"x" * 4096)
    assert record.size == 4096
    upload = eventfn.Upload(record, app.buckets.store("scans"))
    with pytest.raises(ObjectTooLarge, match="1024"):
        await upload.read()
    with upload.open() as stream:  # streaming it works
        assert len(stream.read()) == 4096
