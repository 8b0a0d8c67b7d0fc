"""What an object event carries, whatever its source: a directory bucket, S3 or MinIO."""

from __future__ import annotations

import uuid
from typing import Literal

import msgspec

UploadEvent = Literal["created", "deleted"]

CREATED = "eventfn.upload.created"
DELETED = "eventfn.upload.deleted"
"""CloudEvents types of object events published by eventfn's own sources."""

_IDS = uuid.UUID("6f1c0d1e-6d0b-4c4e-9a51-5e0b7a1f3c2d")
"""Namespace of the name-based (v5) UUIDs that identify object events."""


class UploadRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One object event: the data of an ``eventfn.upload.*`` message.

    ``version`` tells two contents of one key apart (a directory bucket uses the size and the
    modification time in nanoseconds; S3 the version id, else the etag and sequencer), so that
    an overwrite is a new event and a second sighting of the same content is not.
    """

    bucket: str
    key: str
    size: int
    etag: str
    version: str
    time: str  # RFC 3339, when the object was last modified (or deleted)
    content_type: str | None = None
    event: UploadEvent = "created"

    @property
    def type(self) -> str:
        """The CloudEvents type of this event."""
        return CREATED if self.event == "created" else DELETED


def destination(bucket: str) -> str:
    """The topic that carries a bucket's object events."""
    return f"bucket.{bucket}"


def message_id(bucket: str, key: str, version: str, event: UploadEvent = "created") -> str:
    """The message id of an object event, the same whoever publishes it, so that two watchers
    of one bucket (or one watcher after a crash) publish it under one id."""
    return str(uuid.uuid5(_IDS, f"{event}\0{bucket}\0{key}\0{version}"))
