"""The watcher of a directory bucket: one event per complete object version, from whichever
watcher claims it first, never lost.

Completion rule: a file is an object once it has kept the same size and modification time (its
version) for ``settle`` seconds, observed twice that far apart, and it is not hidden or
temporary. A writer that writes in chunks therefore gives one event after its last write, and a
temporary file renamed into place gives one, for its final name.

Changes come from ``watchfiles`` (inotify, FSEvents, ...). Notifications can be lost (a full
inotify queue, a directory created and filled before its watch is added), so the whole bucket is
also rescanned every ``rescan`` seconds (60 by default: a lost event is late by a minute at
most, and a scan costs one ``stat`` per file, about 0.5 s of a thread for 100,000 files). With
``poll`` set there are no notifications, only those scans, every ``poll`` seconds (for network
file systems, where notifications do not come); the watcher also falls back to that when no
notification arrives for a file it writes itself in its state directory.

The ledger, ``.eventfn/ledger.sqlite3`` in the bucket, has one row per (key, version, event),
shared by every watcher of the bucket (and by ``DirectoryBucket.mark_published``):
``claimed`` when a watcher takes it, inside one write transaction and only if no other watcher
holds a fresh claim; ``published`` once ``publish`` returned. A claim older than
``claim_timeout`` (30 s) is taken over by another watcher, so the events of a watcher that
crashed mid-publish are published again under the same message ids, which downstream
idempotency absorbs. Superseded rows are pruned after ``max(300 s, 10 x claim_timeout)``.

Limits: a writer that pauses longer than ``settle`` mid-file gives an early event for the part
written, then a second one for the whole (writers that rename into place, like ``put``, rsync
and browsers, never do); two contents of one size written within one tick of the file system's
clock share a version; a publish slower than ``claim_timeout`` may be repeated by another
watcher (same ids); SQLite's locking needs a local file system for two processes to share it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager

import anyio
import anyio.abc
import anyio.to_thread
from watchfiles import Change, awatch

from eventfn.events import now_rfc3339
from eventfn.sources.buckets import DirectoryBucket, is_object_key
from eventfn.sources.ledger import Claims, Ledger
from eventfn.sources.records import UploadRecord

log = logging.getLogger("eventfn.sources")

Publish = Callable[[Sequence[UploadRecord]], Awaitable[None]]
"""What a watcher hands its events to, in batches; it raises if they were not published."""

_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 10.0
_PROBE_TIMEOUT = 10.0
_FALLBACK_POLL = 2.0


class BucketWatcher:
    """Publishes an :class:`UploadRecord` for each complete object of a bucket, once.

    >>> watcher = BucketWatcher(bucket, publish, settle=1.0, deletions=True)
    >>> await task_group.start(watcher.run)  # ready once what arrived meanwhile is published
    """

    def __init__(
        self,
        bucket: DirectoryBucket,
        publish: Publish,
        *,
        settle: float = 1.0,
        deletions: bool = False,
        poll: float | None = None,
        rescan: float = 60.0,
        claim_timeout: float = 30.0,
        batch_size: int = 500,
    ) -> None:
        self.bucket = bucket
        self.settle = settle
        self.deletions = deletions
        self.poll = poll
        self.rescan = rescan
        self.claim_timeout = claim_timeout
        self.batch_size = batch_size
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._publish = publish
        self._ledger: Ledger | None = None
        # key -> (version, or None once gone; generation): what is waiting to settle
        self._pending: dict[str, tuple[str | None, int]] = {}
        self._due: list[tuple[float, int, str]] = []  # heap of (when, generation, key)
        self._gen = itertools.count()
        self._done: dict[str, tuple[str, str]] = {}  # key -> published (version, etag)
        self._wake = anyio.Event()
        self._rescan_now = anyio.Event()
        self._every = poll if poll is not None else rescan
        self._prefix = f"{bucket.directory}{os.sep}"
        self._probe = bucket.state_dir / f"probe-{self.owner}"
        self._probed = anyio.Event()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Publish what arrived while no watcher ran, report ready, then follow the bucket
        until cancelled."""
        async with self._session(), anyio.create_task_group() as tasks:
            await self._start_watching(tasks)
            await self._catch_up()
            task_status.started()
            tasks.start_soon(self._drain_forever)
            tasks.start_soon(self._rescan_loop)

    async def scan(self) -> int:
        """Publish what is in the bucket and not yet published, once; how many events.

        >>> await BucketWatcher(bucket, publish).scan()  # eventfn run --burst
        3
        """
        async with self._session():
            return await self._catch_up()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[None]:
        path = self.bucket.state_dir / "ledger.sqlite3"
        self._ledger = ledger = await anyio.to_thread.run_sync(
            lambda: Ledger(path, owner=self.owner, claim_timeout=self.claim_timeout)
        )
        try:
            self._done = await anyio.to_thread.run_sync(ledger.live)
            yield
        finally:
            ledger.close()
            self._probe.unlink(missing_ok=True)

    async def _catch_up(self) -> int:
        await self._scan()
        until = anyio.current_time() + self.settle
        await anyio.sleep_until(until)
        published = 0
        while batch := self._take(until):
            published += await self._process(batch)
        return published

    async def _drain_forever(self) -> None:
        while True:
            if batch := self._take(anyio.current_time()):
                await self._process(batch)
                continue
            wait = self._due[0][0] - anyio.current_time() if self._due else math.inf
            with anyio.move_on_after(wait):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def _rescan_loop(self) -> None:
        pruned = anyio.current_time()
        while True:
            with anyio.move_on_after(self._every):
                await self._rescan_now.wait()
                await anyio.sleep(min(self._every, 1.0))  # one scan for a burst of requests
            self._rescan_now = anyio.Event()
            await self._scan()
            if anyio.current_time() - pruned > 60 and self._ledger is not None:
                await anyio.to_thread.run_sync(self._ledger.prune)
                pruned = anyio.current_time()

    async def _scan(self) -> None:
        found: dict[str, str | None] = dict(await anyio.to_thread.run_sync(self.bucket.scan))
        found.update((key, None) for key in self._done if key not in found)
        self._observe(found)

    # Following changes

    async def _start_watching(self, tasks: anyio.abc.TaskGroup) -> None:
        if self.poll is not None:
            return
        scope = anyio.CancelScope()
        tasks.start_soon(self._follow, scope)
        # Ready only once a change is seen: what the catch-up scan misses, the watch then sees.
        with anyio.move_on_after(_PROBE_TIMEOUT):
            while not (self._probed.is_set() or scope.cancel_called):
                await anyio.to_thread.run_sync(self._probe.touch)
                with anyio.move_on_after(0.05):
                    await self._probed.wait()
        if not (self._probed.is_set() or scope.cancel_called):
            scope.cancel()
            self._every = min(self._every, _FALLBACK_POLL)
            log.warning(
                "bucket %s: no file notifications from %s (a network or FUSE file system?): "
                "scanning it every %.0f s instead",
                self.bucket.name,
                self.bucket.directory,
                self._every,
            )

    async def _follow(self, scope: anyio.CancelScope) -> None:
        debounce = int(min(1600, max(50, self.settle * 500)))
        with scope:
            try:
                changes = awatch(
                    self.bucket.directory,
                    watch_filter=self._wanted,
                    debounce=debounce,
                    ignore_permission_denied=True,
                )
                async with aclosing(changes):
                    async for batch in changes:
                        keys = {path[len(self._prefix) :] for _, path in batch}
                        self._observe(await anyio.to_thread.run_sync(self.bucket.versions, keys))
            except Exception as exc:  # whatever broke the notifications, scans still work
                scope.cancel()
                self._every = min(self._every, _FALLBACK_POLL)
                self._rescan_now.set()
                log.warning(
                    "bucket %s: file notifications failed (%r): scanning every %.0f s instead",
                    self.bucket.name,
                    exc,
                    self._every,
                )

    def _wanted(self, change: Change, path: str) -> bool:
        if path == str(self._probe):
            self._probed.set()
            return False
        return path.startswith(self._prefix) and is_object_key(path[len(self._prefix) :])

    # Settling and publishing

    def _observe(self, found: Mapping[str, str | None]) -> None:
        """Start the settle clock of each key whose version (``None``: gone) changed."""
        due = anyio.current_time() + self.settle
        for key, version in found.items():
            if version is not None and self._done.get(key, ("",))[0] == version:
                self._pending.pop(key, None)  # back to what was published
                continue
            pending = self._pending.get(key)
            if pending is not None and pending[0] == version:
                continue  # still settling since it was first seen so
            if version is None and (not self.deletions or key not in self._done):
                if pending is None and self.deletions:
                    self._rescan_now.set()  # a directory may have gone, with objects in it
                self._pending.pop(key, None)
                continue
            self._push(key, version, due)
        self._wake.set()

    def _push(self, key: str, version: str | None, due: float) -> None:
        gen = next(self._gen)
        self._pending[key] = (version, gen)
        heapq.heappush(self._due, (due, gen, key))

    def _take(self, until: float) -> list[tuple[str, str | None]]:
        """The keys that settled by ``until``, up to a batch (they stay pending meanwhile)."""
        batch: list[tuple[str, str | None]] = []
        while self._due and self._due[0][0] <= until and len(batch) < self.batch_size:
            _, gen, key = heapq.heappop(self._due)
            pending = self._pending.get(key)
            if pending is not None and pending[1] == gen:
                batch.append((key, pending[0]))
        return batch

    async def _process(self, batch: list[tuple[str, str | None]]) -> int:
        gone = {k: self._done[k] for k, version in batch if version is None and k in self._done}
        records, changed = await anyio.to_thread.run_sync(self._describe, batch, gone)
        self._observe(changed)
        assert self._ledger is not None
        if not records:
            return 0
        claims = await anyio.to_thread.run_sync(self._ledger.claim, records)
        self._settled(claims)
        mine = claims.mine
        delay = _BACKOFF_FIRST
        while mine:
            try:
                await self._publish(mine)
                break
            except Exception as exc:  # any failure to publish: nothing is lost, retry
                log.warning(
                    "bucket %s: publishing %d events failed (%r): retrying in %.1f s",
                    self.bucket.name,
                    len(mine),
                    exc,
                    delay,
                )
            await anyio.sleep(delay)
            delay = min(2 * delay, _BACKOFF_MAX)
            claims = await anyio.to_thread.run_sync(self._ledger.claim, mine)
            self._settled(claims)  # renews the claims still ours; drops what others did
            mine = claims.mine
        await anyio.to_thread.run_sync(self._ledger.mark, mine)
        self._settled(Claims(published=mine))
        return len(mine)

    def _describe(
        self, batch: list[tuple[str, str | None]], gone: dict[str, tuple[str, str]]
    ) -> tuple[list[UploadRecord], dict[str, str | None]]:
        """Each settled key's record, hashed; or what it became meanwhile (blocking)."""
        records: list[UploadRecord] = []
        changed: dict[str, str | None] = {}
        for key, version in batch:
            if version is None:
                now = self.bucket.versions([key]).get(key)
                if now is not None or key not in gone:
                    changed[key] = now
                    continue
                old_version, etag = gone[key]
                records.append(
                    UploadRecord(
                        bucket=self.bucket.name,
                        key=key,
                        size=0,
                        etag=etag,
                        version=old_version,
                        time=now_rfc3339(),
                        event="deleted",
                    )
                )
                continue
            found = self.bucket.describe(key, version)
            if isinstance(found, UploadRecord):
                records.append(found)
            else:
                changed[key] = found
        return records, changed

    def _settled(self, claims: Claims) -> None:
        for r in claims.published:
            if r.event == "created":
                self._done[r.key] = (r.version, r.etag)
            else:
                self._done.pop(r.key, None)
            self._forget(r)
        for r, expires in claims.held:
            # Another watcher holds it: look again when its claim would expire.
            version = None if r.event == "deleted" else r.version
            self._push(r.key, version, anyio.current_time() + max(0.0, expires - time.time()))
        if claims.held:
            self._wake.set()

    def _forget(self, r: UploadRecord) -> None:
        pending = self._pending.get(r.key)
        if pending is not None and pending[0] == (None if r.event == "deleted" else r.version):
            del self._pending[r.key]
