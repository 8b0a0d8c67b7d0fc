"""S3 and MinIO event notifications, read into the same :class:`UploadRecord` as a local bucket.

A user whose objects live in S3 or MinIO routes the notifications (S3 to SQS/SNS/EventBridge,
MinIO to AMQP, NATS, Redis, PostgreSQL, a webhook...) onto a bucket's destination in any broker
(``eventfn publish bucket.invoices --file notification.json``, or a bridge), and the same
``@app.on_upload(bucket="invoices")`` handlers receive them. Understood shapes:

- the notification document ``{"Records": [...]}`` of S3 and MinIO (MinIO adds ``EventName``
  and ``Key`` at the top), with keys URL-encoded the S3 way (``+`` for a space);
- an EventBridge event from S3 (``"source": "aws.s3"``, ``detail-type`` ``Object Created`` or
  ``Object Deleted``), whose keys are not encoded;
- the ``s3:TestEvent`` S3 sends when notifications are configured, which carries no object.

Object-created events become ``created`` records, object-removed events ``deleted`` ones; other
kinds (accessed, replication, restore) carry no new object and are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus

from eventfn.exceptions import DecodeError
from eventfn.sources.records import UploadEvent, UploadRecord


def looks_like_notification(document: Any) -> bool:
    """Whether a decoded JSON document is one of the shapes this module reads."""
    if not isinstance(document, Mapping):
        return False
    return (
        "Records" in document
        or document.get("Event") == "s3:TestEvent"
        or document.get("source") == "aws.s3"
    )


def records(document: Any) -> list[UploadRecord]:
    """The object events in an S3/MinIO notification (possibly none: a test event).

    Raises :class:`DecodeError` naming what is missing when the document is not one.
    """
    if not isinstance(document, Mapping):
        raise DecodeError("an S3 notification is a JSON object")
    if document.get("Event") == "s3:TestEvent":
        return []
    if document.get("source") == "aws.s3":
        found = _eventbridge(document)
        return [found] if found is not None else []
    entries = document.get("Records")
    if not isinstance(entries, list):
        raise DecodeError("not an S3 notification: it has no 'Records' list")
    return [r for r in (_record(entry, i) for i, entry in enumerate(entries)) if r is not None]


def _kind(name: str) -> UploadEvent | None:
    name = name.removeprefix("s3:")
    if name.startswith("ObjectCreated:"):
        return "created"
    if name.startswith("ObjectRemoved:"):
        return "deleted"
    return None


def _record(entry: Any, index: int) -> UploadRecord | None:
    where = f"Records[{index}]"
    if not isinstance(entry, Mapping):
        raise DecodeError(f"{where} is not an object")
    event = _kind(str(entry.get("eventName", "")))
    if event is None:
        return None
    s3 = _mapping(entry, "s3", where)
    bucket = _mapping(s3, "bucket", f"{where}.s3")
    obj = _mapping(s3, "object", f"{where}.s3")
    name, raw_key = bucket.get("name"), obj.get("key")
    if not isinstance(name, str) or not isinstance(raw_key, str) or not name or not raw_key:
        raise DecodeError(f"{where}: s3.bucket.name and s3.object.key must be non-empty strings")
    etag = str(obj.get("eTag") or obj.get("etag") or "").strip('"')
    version = obj.get("versionId") or f"{etag}-{obj.get('sequencer', '')}"
    return UploadRecord(
        bucket=name,
        key=unquote_plus(raw_key),
        size=_size(obj.get("size", 0), where),
        etag=etag,
        version=str(version),
        time=str(entry.get("eventTime") or ""),
        content_type=obj.get("contentType") or None,
        event=event,
    )


def _eventbridge(document: Mapping[str, Any]) -> UploadRecord | None:
    kind = {"Object Created": "created", "Object Deleted": "deleted"}.get(
        str(document.get("detail-type", ""))
    )
    if kind is None:
        return None
    detail = _mapping(document, "detail", "event")
    bucket = _mapping(detail, "bucket", "detail")
    obj = _mapping(detail, "object", "detail")
    name, key = bucket.get("name"), obj.get("key")
    if not isinstance(name, str) or not isinstance(key, str) or not name or not key:
        raise DecodeError("detail.bucket.name and detail.object.key must be non-empty strings")
    etag = str(obj.get("etag") or "").strip('"')
    return UploadRecord(
        bucket=name,
        key=key,  # EventBridge carries keys as they are
        size=_size(obj.get("size", 0), "detail.object"),
        etag=etag,
        version=str(obj.get("version-id") or f"{etag}-{obj.get('sequencer', '')}"),
        time=str(document.get("time") or ""),
        event="created" if kind == "created" else "deleted",
    )


def _mapping(parent: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = parent.get(name)
    if not isinstance(value, Mapping):
        raise DecodeError(f"{where}.{name} is missing or not an object")
    return value


def _size(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DecodeError(f"{where}: size must be a whole number of bytes, not {value!r}")
    return value
