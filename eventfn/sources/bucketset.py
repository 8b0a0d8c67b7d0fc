"""``app.buckets``: the app's local buckets, each a directory under one root."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from eventfn.sources.records import UploadRecord, destination, message_id

if TYPE_CHECKING:
    from eventfn.app import App
    from eventfn.sources.buckets import DirectoryBucket

DEFAULT_ROOT = "buckets"
DEFAULT_MAX_OBJECT = 64 << 20
"""Default limit on what ``Upload.read()`` loads into memory; larger objects are streamed."""


class Buckets:
    """The app's local buckets by name: ``app.buckets["invoices"]``.

    The root is ``eventfn run --buckets DIR``, else ``$EVENTFN_BUCKETS``, else
    ``App(buckets=...)``, else ``./buckets`` (the same order as the broker URL's).
    """

    def __init__(
        self,
        app: App,
        default: str | os.PathLike[str] | None,
        *,
        max_object_size: int = DEFAULT_MAX_OBJECT,
    ) -> None:
        self._app = app
        self.max_object_size = max_object_size
        self._default = Path(default) if default is not None else None
        self._chosen: Path | None = None
        self._open: dict[str, DirectoryBucket] = {}

    @property
    def root(self) -> Path:
        """The directory that holds one sub-directory per bucket."""
        if self._chosen is not None:
            return self._chosen
        return Path(os.environ.get("EVENTFN_BUCKETS") or self._default or DEFAULT_ROOT)

    @root.setter
    def root(self, value: str | os.PathLike[str]) -> None:
        self._chosen = Path(value)
        self._open.clear()

    def __getitem__(self, name: str) -> Bucket:
        return Bucket(self._app, name, self.store(name))

    def store(self, name: str) -> DirectoryBucket:
        """The directory bucket ``name`` (created on first use)."""
        from eventfn.sources.buckets import DirectoryBucket
        from eventfn.subscriptions import check_name

        found = self._open.get(name)
        if found is None:
            check_name(name, "bucket")
            found = DirectoryBucket(name, self.root, max_size=self.max_object_size)
            self._open[name] = found
        return found

    def local(self, name: str) -> DirectoryBucket | None:
        """The bucket ``name`` if it exists on this machine (an S3 bucket does not)."""
        if name in self._open or (self.root / name).is_dir():
            return self.store(name)
        return None


class Bucket:
    """One local bucket of an app: store objects, and publish their events at once.

    >>> await app.buckets["invoices"].put("2026/11/scan.pdf", data)
    """

    def __init__(self, app: App, name: str, store: DirectoryBucket) -> None:
        self._app = app
        self.name = name
        self.store = store

    async def put(
        self,
        key: str,
        data: bytes | AsyncIterable[bytes] | BinaryIO,
        *,
        content_type: str | None = None,
    ) -> UploadRecord:
        """Store an object atomically and publish its ``created`` event.

        Inside a handler the event goes out with the handler's ack, like any emit. The event
        is published here when this app handles the bucket (``on_upload``); otherwise the
        runner that watches the bucket publishes it.
        """
        record = await self.store.put(key, data, content_type=content_type)
        if self.name in self._app.watched:
            await self._publish(record)
        return record

    async def _publish(self, record: UploadRecord) -> None:
        await self._app.publish(
            destination(self.name),
            record,
            type=record.type,
            subject=record.key,
            id=message_id(record.bucket, record.key, record.version, record.event),
        )
        await self.store.mark_published([record])  # the watcher must not publish it again

    async def read(self, key: str) -> bytes:
        return await self.store.read(key)

    def path(self, key: str) -> Path:
        return self.store.path(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)
