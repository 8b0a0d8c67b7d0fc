"""``eventfn.Upload``: one object event as an ``on_upload`` handler receives it."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import msgspec

from eventfn.events import Envelope
from eventfn.exceptions import DecodeError, EventfnError, Filtered
from eventfn.sources import s3
from eventfn.sources.records import UploadEvent, UploadRecord

if TYPE_CHECKING:
    from eventfn.context import Context
    from eventfn.sources.buckets import DirectoryBucket


class ObjectNotLocal(EventfnError):
    """The object of an upload event is not in a local bucket (an S3 or MinIO object)."""


class Upload:
    """An object that was stored (or deleted), with a way to its bytes where they are local.

    >>> @app.on_upload(bucket="invoices", match="*.pdf")
    ... async def extract(upload: eventfn.Upload) -> None:
    ...     text = parse_pdf(await upload.read())
    """

    __slots__ = ("_store", "record")

    def __init__(self, record: UploadRecord, store: DirectoryBucket | None = None) -> None:
        self.record = record
        self._store = store

    def __repr__(self) -> str:
        return f"Upload({self.bucket!r}, {self.key!r}, size={self.size}, event={self.event!r})"

    @property
    def bucket(self) -> str:
        return self.record.bucket

    @property
    def key(self) -> str:
        return self.record.key

    @property
    def size(self) -> int:
        """Bytes (0 for a deletion)."""
        return self.record.size

    @property
    def etag(self) -> str:
        return self.record.etag

    @property
    def version(self) -> str:
        """What tells this content of the key from another (an overwrite is a new version)."""
        return self.record.version

    @property
    def content_type(self) -> str | None:
        return self.record.content_type

    @property
    def event(self) -> UploadEvent:
        """``"created"`` or ``"deleted"``."""
        return self.record.event

    @property
    def time(self) -> datetime | None:
        """When the object was stored (or deleted), as the source says."""
        try:
            return datetime.fromisoformat(self.record.time.replace("Z", "+00:00"))
        except ValueError:
            return None

    @property
    def path(self) -> Path:
        """The object's file, for a local bucket; an S3 object has none."""
        return self._local().path(self.key)

    async def read(self) -> bytes:
        """The object's bytes (refused above the bucket's size limit: use :meth:`open`)."""
        return await self._local().read(self.key)

    def open(self) -> BinaryIO:
        """The object as a binary file, to stream it."""
        return self._local().open(self.key)

    def _local(self) -> DirectoryBucket:
        if self._store is None:
            raise ObjectNotLocal(
                f"object {self.key!r} of bucket {self.bucket!r} is not in a local bucket; "
                "read it with your S3 client (upload.bucket, upload.key)"
            )
        return self._store


_records = msgspec.json.Decoder(UploadRecord)
_any = msgspec.json.Decoder()


def decode(envelope: Envelope) -> tuple[list[UploadRecord], bool]:
    """The object events in a message, and whether they are of a local bucket: eventfn's own
    record (local), or an S3/MinIO notification (not: its bytes are in S3 or MinIO)."""
    body = envelope.payload_bytes()
    if envelope.type.startswith("eventfn.upload."):
        try:
            return [_records.decode(body)], True
        except msgspec.DecodeError as exc:
            raise DecodeError(f"malformed upload record: {exc}") from None
    try:
        document = _any.decode(body)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"an upload message is not JSON: {exc}") from None
    if not s3.looks_like_notification(document):
        raise DecodeError(
            f"a message of type {envelope.type!r} on an upload destination is neither an "
            "eventfn upload record nor an S3/MinIO notification"
        )
    return s3.records(document), False


class UploadFilter:
    """Which object events a handler wants: by event kind, key patterns (any may match),
    prefix and suffix."""

    def __init__(
        self,
        *,
        events: Sequence[UploadEvent],
        match: str | Sequence[str] | None,
        prefix: str | None,
        suffix: str | None,
    ) -> None:
        self.events = frozenset(events)
        self.patterns = (match,) if isinstance(match, str) else tuple(match or ())
        self.prefix = prefix or ""
        self.suffix = suffix or ""

    def __call__(self, record: UploadRecord) -> bool:
        if record.event not in self.events:
            return False
        key = record.key
        if not (key.startswith(self.prefix) and key.endswith(self.suffix)):
            return False
        return not self.patterns or any(fnmatch.fnmatchcase(key, p) for p in self.patterns)


def upload_step(
    wanted: UploadFilter, stores: Callable[[str], DirectoryBucket | None]
) -> Callable[[Envelope, Context[Any] | None], Any]:
    """The argument step of an ``Upload`` parameter: decode, filter, attach the local store."""

    def step(envelope: Envelope, ctx: Context[Any] | None) -> Upload:
        found, local = decode(envelope)
        mine = [r for r in found if wanted(r)]
        if not mine:
            raise Filtered(f"no object event for this handler among {len(found)}")
        if len(mine) > 1:
            raise DecodeError(
                f"a notification with {len(mine)} object events; publish one per message "
                "(S3 and MinIO send one record per notification)"
            )
        return Upload(mine[0], stores(mine[0].bucket) if local else None)

    return step
