"""The envelope codec: CloudEvents 1.0 structured JSON, round-trips, limits, ids."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import eventfn
from eventfn.events import decode_envelope, new_id

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(data=json_values, key=st.none() | st.text(min_size=1), subject=st.none() | st.text())
def test_any_json_payload_round_trips(data: Any, key: str | None, subject: str | None) -> None:
    app = eventfn.App("codec")
    message = app.message("things", data, type="thing.happened", key=key, subject=subject)
    envelope = decode_envelope(message.body)
    assert msgspec.json.decode(envelope.data) == data
    assert (envelope.type, envelope.partitionkey, envelope.subject) == (
        "thing.happened",
        key,
        subject,
    )
    assert envelope.specversion == "1.0" and envelope.source == "/codec"
    assert envelope.id == message.id and envelope.datacontenttype == "application/json"


@given(payload=st.binary(max_size=2000))
def test_binary_payloads_use_data_base64(payload: bytes) -> None:
    message = eventfn.App("codec").message("blobs", payload)
    envelope = decode_envelope(message.body)
    assert envelope.payload_bytes() == payload
    assert envelope.datacontenttype == "application/octet-stream"


@given(garbage=st.binary(max_size=200))
def test_garbage_is_a_decode_error_never_a_crash(garbage: bytes) -> None:
    with contextlib.suppress(eventfn.DecodeError):
        decode_envelope(garbage)


def test_envelope_is_structured_mode_cloudevents() -> None:
    class OrderAccepted(msgspec.Struct, rename="camel"):
        order_id: str

    body = eventfn.App("shop").message("order-events", OrderAccepted("o1")).body
    document = msgspec.json.decode(body)
    assert document["specversion"] == "1.0" and document["type"] == "order.accepted"
    assert document["data"] == {"orderId": "o1"}
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", document["time"])
    assert set(document) <= {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "datacontenttype",
        "data",
    }


def test_required_attributes_and_version_are_checked() -> None:
    with pytest.raises(eventfn.DecodeError, match="specversion"):
        decode_envelope(b'{"id":"1","source":"/s","type":"t","specversion":"0.3"}')
    with pytest.raises(eventfn.DecodeError, match="required attribute"):
        decode_envelope(b'{"specversion":"1.0","id":"","source":"/s","type":"t"}')
    with pytest.raises(eventfn.DecodeError, match="malformed envelope"):
        decode_envelope(b'{"source":"/s","type":"t"}')


def test_payload_limit() -> None:
    app = eventfn.App("shop", max_payload=1024)
    with pytest.raises(eventfn.PayloadTooLarge, match="over the limit of 1024"):
        app.message("blobs", "x" * 2000)
    app.message("blobs", "x" * 500)


def test_unencodable_data_says_what_to_send() -> None:
    with pytest.raises(TypeError, match=r"publish a msgspec\.Struct, a dict"):
        eventfn.App("shop").message("things", object())


def test_ids_are_uuid7_and_time_ordered() -> None:
    ids = [new_id(1_700_000_000 + i / 1000) for i in range(50)]
    assert ids == sorted(ids)
    for value in ids:
        assert re.match(
            r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", value
        )
    assert len(set(new_id() for _ in range(1000))) == 1000


def test_stream_key_function_supplies_the_partition_key() -> None:
    class Click(msgspec.Struct):
        user: str

    app = eventfn.App("web")

    @app.on_stream("clicks", key=lambda c: c.user, group="g")
    async def handle(click: eventfn.Envelope) -> None: ...

    assert app.message("clicks", Click("ada")).key == "ada"
    assert app.message("clicks", Click("ada"), key="override").key == "override"
    assert decode_envelope(app.message("clicks", Click("bob")).body).partitionkey == "bob"
