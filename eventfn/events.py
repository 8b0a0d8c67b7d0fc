"""The envelope: CloudEvents 1.0 in JSON structured mode, encoded with msgspec.

Every message eventfn stores is one encoded :class:`Envelope`. The user's event is its ``data``;
transport bookkeeping (attempts, leases, failures) lives in the broker, never in here.
"""

from __future__ import annotations

import base64
import os
import re
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from eventfn.exceptions import DecodeError, PayloadTooLarge

DEFAULT_MAX_PAYLOAD = 256 * 1024
"""Default limit on an encoded envelope, in bytes (the same as SQS and EventBridge)."""

NO_DATA = msgspec.Raw()
"""``data`` of an envelope without JSON data. msgspec omits a default by identity, so always
use this object, never a new empty ``Raw``, or the encoder writes ``"data":`` with no value."""

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"


class Envelope(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """One CloudEvents 1.0 event, with the tracing and partitioning extensions.

    ``data`` holds the payload's JSON text undecoded (a :class:`msgspec.Raw`), so that each
    handler decodes it once, straight into its own type. Binary payloads use ``data_base64``.
    """

    specversion: str  # required, and so never omitted as a default would be
    id: str
    source: str
    type: str
    time: str | None = None
    subject: str | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None
    data: msgspec.Raw = NO_DATA  # binary payloads use data_base64 instead
    data_base64: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    partitionkey: str | None = None

    def payload_bytes(self) -> bytes:
        """The payload as bytes: decoded from ``data_base64``, or the JSON text of ``data``."""
        if self.data_base64 is not None:
            return base64.b64decode(self.data_base64)
        return bytes(self.data)


_encoder = msgspec.json.Encoder()
_envelope_decoder = msgspec.json.Decoder(Envelope)


def encode_envelope(envelope: Envelope, max_size: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """Encode an envelope, refusing one over ``max_size`` bytes."""
    body = _encoder.encode(envelope)
    if len(body) > max_size:
        raise PayloadTooLarge(
            f"event {envelope.type!r} is {len(body)} bytes encoded, over the limit of {max_size}; "
            "store large payloads elsewhere (a bucket) and send a reference, "
            "or raise the limit with App(max_payload=...)"
        )
    return body


def decode_envelope(body: bytes) -> Envelope:
    """Decode and check an envelope; raise :class:`DecodeError` with the reason if it is bad."""
    try:
        envelope = _envelope_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed envelope: {exc}") from None
    if envelope.specversion != "1.0":
        raise DecodeError(f"unsupported CloudEvents specversion {envelope.specversion!r}")
    if not envelope.id or not envelope.type or not envelope.source:
        raise DecodeError("envelope lacks a required attribute (id, source and type are required)")
    return envelope


def encode_data(data: Any) -> tuple[msgspec.Raw, str | None, str]:
    """Encode a payload: returns ``(data, data_base64, datacontenttype)``."""
    if isinstance(data, bytes | bytearray | memoryview):
        return NO_DATA, base64.b64encode(bytes(data)).decode("ascii"), OCTET_STREAM
    if isinstance(data, msgspec.Raw):
        return data, None, JSON
    try:
        return msgspec.Raw(_encoder.encode(data)), None, JSON
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(
            f"cannot encode {type(data).__name__} as event data: {exc}; "
            "publish a msgspec.Struct, a dict, a list, a str or number, or bytes"
        ) from None


def now_rfc3339(epoch: float | None = None) -> str:
    """The time as an RFC 3339 string in UTC, with microseconds."""
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_id(epoch: float | None = None) -> str:
    """A time-ordered message id: a UUIDv7 (RFC 9562) in its canonical text form."""
    ms = int((time.time() if epoch is None else epoch) * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & 0x3FFF_FFFF_FFFF_FFFF
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z]|\d|\b)|[A-Z]?[a-z]+|[A-Z]+|\d+")


def event_type(cls: type[Any]) -> str:
    """The CloudEvents ``type`` of an event class.

    ``__event_type__`` on the class wins; otherwise the class name in dotted lower case, so
    ``OrderAccepted`` is ``order.accepted``.
    """
    explicit = getattr(cls, "__event_type__", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    return ".".join(word.lower() for word in _WORD.findall(cls.__name__))
