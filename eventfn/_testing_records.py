"""What :class:`eventfn.testing.TestRuntime` records (handler calls and emitted messages), and
:func:`s3_notification`; all public from :mod:`eventfn.testing`.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote_plus

import msgspec

from eventfn.context import Context
from eventfn.events import Envelope, decode_envelope
from eventfn.middleware import Invocation
from eventfn.sources.records import UploadEvent

T = TypeVar("T")


class HandlerCall(msgspec.Struct, frozen=True, kw_only=True):
    """One call of a handler as the runtime saw it (outermost in the middleware chain).

    ``event`` is the first argument that is not the ``Context`` (the decoded event, an
    ``Upload``, a ``Tick``, a batch's list), ``error`` what the call raised (``None``: handled).
    """

    subscription: str
    handler: str
    function: Any
    event: Any
    args: tuple[Any, ...]
    envelope: Envelope
    attempt: int
    at: float
    error: BaseException | None = None


class Emitted(msgspec.Struct, frozen=True, kw_only=True):
    """A message a handler emitted (recorded when the handler succeeded), decoded.

    >>> [e.decode(InventoryReserved) for e in rt.emitted if e.type == "inventory.reserved"]
    """

    destination: str
    envelope: Envelope
    key: str | None
    by: str

    @property
    def type(self) -> str:
        return self.envelope.type

    def decode(self, cls: builtins.type[T]) -> T:
        """The payload decoded as ``cls``."""
        return msgspec.json.decode(self.envelope.payload_bytes(), type=cls)


def record(
    invocation: Invocation,
    error: Exception | None,
    clock: Callable[[], float],
    calls: list[HandlerCall],
    emitted: list[Emitted],
) -> None:
    """Append the call an invocation made (and, if it succeeded, what it emitted)."""
    sub = invocation.subscription
    args = tuple(invocation.args)
    event = next((a for a in args if not isinstance(a, Context)), None)
    calls.append(
        HandlerCall(
            subscription=sub.ref.name,
            handler=sub.name,
            function=sub.handler,
            event=event,
            args=args,
            envelope=invocation.envelope,
            attempt=invocation.delivery.attempt,
            at=clock(),
            error=error,
        )
    )
    if error is None:
        emitted += [
            Emitted(
                destination=m.destination,
                envelope=decode_envelope(m.body),
                key=m.key,
                by=sub.name,
            )
            for m in invocation.context.emitted
        ]


def s3_notification(
    bucket: str,
    key: str,
    *,
    size: int = 0,
    event: UploadEvent = "created",
    etag: str = "d41d8cd98f00b204e9800998ecf8427e",
    version_id: str | None = None,
    sequencer: str = "0055AED6DCD90281E5",
    time: datetime | None = None,
    content_type: str | None = None,
    minio: bool = False,
) -> dict[str, Any]:
    """An S3 (or, with ``minio=True``, MinIO) event notification for one object, its key
    URL-encoded the S3 way (a space as ``+``, other bytes as ``%XX`` of their UTF-8).

    >>> doc = s3_notification("invoices", "2026/scan 1.pdf", size=42)
    >>> doc["Records"][0]["s3"]["object"]["key"]
    '2026/scan+1.pdf'
    >>> await rt.publish("bucket.invoices", doc, type="aws.s3.notification")
    """
    name = "ObjectCreated:Put" if event == "created" else "ObjectRemoved:Delete"
    name = f"s3:{name}" if minio else name
    obj: dict[str, Any] = {"key": quote_plus(key, safe="/"), "sequencer": sequencer}
    if event == "created":
        obj |= {"size": size, "eTag": etag}
    if version_id is not None:
        obj["versionId"] = version_id
    if content_type is not None:
        obj["contentType"] = content_type
    moment = (time or datetime.now(UTC)).astimezone(UTC)
    record = {
        "eventVersion": "2.0" if minio else "2.1",
        "eventSource": "minio:s3" if minio else "aws:s3",
        "awsRegion": "" if minio else "us-east-1",
        "eventTime": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "eventName": name,
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "eventfn-test",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": obj,
        },
    }
    if minio:
        return {"EventName": name, "Key": f"{bucket}/{obj['key']}", "Records": [record]}
    return {"Records": [record]}
