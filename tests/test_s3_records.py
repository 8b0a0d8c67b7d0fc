"""S3 and MinIO notification records read into the same Upload as a local bucket's events."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

import eventfn
from eventfn.brokers.memory import MemoryBroker
from eventfn.exceptions import DecodeError
from eventfn.sources import s3

# The sample record of the S3 user guide ("Event message structure"), as S3 sends it.
S3_SAMPLE: dict[str, Any] = {
    "Records": [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-west-2",
            "eventTime": "1970-01-01T00:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "AIDAJDPLRKLG7UEXAMPLE"},
            "requestParameters": {"sourceIPAddress": "127.0.0.1"},
            "responseElements": {
                "x-amz-request-id": "C3D13FE58DE4C810",
                "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
            },
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "testConfigRule",
                "bucket": {
                    "name": "mybucket",
                    "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                    "arn": "arn:aws:s3:::mybucket",
                },
                "object": {
                    "key": "HappyFace.jpg",
                    "size": 1024,
                    "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                    "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko",
                    "sequencer": "0055AED6DCD90281E5",
                },
            },
        }
    ]
}

# MinIO's notification as its bucket-notification guide shows it: EventName and Key on top.
MINIO_SAMPLE: dict[str, Any] = {
    "EventName": "s3:ObjectCreated:Put",
    "Key": "images/myphoto.jpg",
    "Records": [
        {
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "awsRegion": "",
            "eventTime": "2019-09-10T17:41:54Z",
            "eventName": "s3:ObjectCreated:Put",
            "userIdentity": {"principalId": "minio"},
            "requestParameters": {"accessKey": "minio", "region": "", "sourceIPAddress": "::1"},
            "responseElements": {"x-amz-request-id": "15C3311D8A2B0F84"},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "Config",
                "bucket": {
                    "name": "images",
                    "ownerIdentity": {"principalId": "minio"},
                    "arn": "arn:aws:s3:::images",
                },
                "object": {
                    "key": "myphoto.jpg",
                    "size": 6474,
                    "eTag": "a3410f4f8788b510d6f19c5067e60a90",
                    "contentType": "image/jpeg",
                    "userMetadata": {"content-type": "image/jpeg"},
                    "sequencer": "15C3311D8A2B0F84",
                },
            },
            "source": {"host": "::1", "port": "", "userAgent": "MinIO (linux; amd64)"},
        }
    ],
}

S3_TEST_EVENT = {
    "Service": "Amazon S3",
    "Event": "s3:TestEvent",
    "Time": "2014-10-13T15:57:02.089Z",
    "Bucket": "mybucket",
    "RequestId": "5582815E1AEA5ADF",
    "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
}


def with_key(sample: dict[str, Any], key: str, name: str = "ObjectCreated:Put") -> dict[str, Any]:
    document = copy.deepcopy(sample)
    document["Records"][0]["s3"]["object"]["key"] = key
    document["Records"][0]["eventName"] = name
    return document


def test_the_s3_sample_record() -> None:
    (record,) = s3.records(S3_SAMPLE)
    assert (record.bucket, record.key, record.size) == ("mybucket", "HappyFace.jpg", 1024)
    assert record.etag == "d41d8cd98f00b204e9800998ecf8427e"
    assert record.version == "096fKKXTRTtl3on89fVO.nfljtsv6qko"
    assert record.time == "1970-01-01T00:00:00.000Z"
    assert record.event == "created" and record.type == "eventfn.upload.created"


def test_the_minio_sample_record() -> None:
    (record,) = s3.records(MINIO_SAMPLE)
    assert (record.bucket, record.key, record.size) == ("images", "myphoto.jpg", 6474)
    assert record.content_type == "image/jpeg"
    assert record.version == "a3410f4f8788b510d6f19c5067e60a90-15C3311D8A2B0F84"


@pytest.mark.parametrize(
    ("encoded", "key"),
    [
        ("my+report+2026.pdf", "my report 2026.pdf"),
        ("scans/2026/11/invoice+%2342.pdf", "scans/2026/11/invoice #42.pdf"),
        ("r%C3%A9sum%C3%A9+%E2%9C%93.txt", "résumé ✓.txt"),
        (
            "%E6%97%A5%E6%9C%AC%E8%AA%9E/%E3%83%95%E3%82%A1%E3%82%A4%E3%83%AB.txt",
            "日本語/ファイル.txt",
        ),
        ("a%2Bb.txt", "a+b.txt"),
    ],
)
def test_keys_are_url_decoded_with_plus_for_space(encoded: str, key: str) -> None:
    for sample in (S3_SAMPLE, MINIO_SAMPLE):
        (record,) = s3.records(with_key(sample, encoded))
        assert record.key == key


def test_removals_are_deletions_and_other_kinds_are_left_out() -> None:
    (removed,) = s3.records(with_key(S3_SAMPLE, "old.txt", "ObjectRemoved:Delete"))
    assert removed.event == "deleted"
    (marker,) = s3.records(with_key(MINIO_SAMPLE, "x", "s3:ObjectRemoved:DeleteMarkerCreated"))
    assert marker.event == "deleted"
    assert s3.records(with_key(MINIO_SAMPLE, "x", "s3:ObjectAccessed:Get")) == []
    assert s3.records(S3_TEST_EVENT) == []


def test_an_eventbridge_event_from_s3() -> None:
    event = {
        "version": "0",
        "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "111122223333",
        "time": "2021-11-12T00:00:00Z",
        "region": "ca-central-1",
        "detail": {
            "version": "0",
            "bucket": {"name": "DOC-EXAMPLE-BUCKET1"},
            "object": {
                "key": "my report.txt",
                "size": 5,
                "etag": "b1946ac92492d2347c6235b4d2611184",
                "version-id": "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e",
                "sequencer": "617f08299329d189",
            },
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": "123456789012",
            "reason": "PutObject",
        },
    }  # fmt: skip
    (record,) = s3.records(event)
    assert (record.bucket, record.key, record.size) == ("DOC-EXAMPLE-BUCKET1", "my report.txt", 5)
    assert record.version == "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e"


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"Records": "nope"}, "no 'Records' list"),
        ({"Records": [{"eventName": "ObjectCreated:Put"}]}, "s3 is missing"),
        (with_key(S3_SAMPLE, ""), "non-empty strings"),
        ([1, 2], "JSON object"),
    ],
)
def test_malformed_notifications_say_what_is_wrong(document: Any, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        s3.records(document)


async def test_s3_and_minio_notifications_reach_the_same_upload_handlers(tmp_path: Path) -> None:
    app = eventfn.App("media", buckets=tmp_path)  # a local bucket "images" exists, unused
    seen: list[eventfn.Upload] = []

    @app.on_upload(bucket="images", suffix=".jpg", events=["created", "deleted"])
    async def thumbnail(upload: eventfn.Upload) -> None:
        seen.append(upload)

    notifications = [
        with_key(MINIO_SAMPLE, "holiday/beach+at+dusk.jpg"),
        with_key(S3_SAMPLE, "r%C3%A9sum%C3%A9.pdf"),  # not a .jpg: left out, acked
        with_key(S3_SAMPLE, "old.jpg", "ObjectRemoved:Delete"),
        S3_TEST_EVENT,  # nothing to do, acked
    ]
    async with MemoryBroker(f"memory://s3-{uuid.uuid4().hex}") as broker:
        await app.connect(broker)
        for document in notifications:
            await app.publish("bucket.images", document, type="aws.s3.notification")
        await app.publish("bucket.images", {"not": "a notification"}, type="junk")
        runner = eventfn.Runner(app, broker, burst=True, poll=0.05)
        with anyio.fail_after(30):
            summary = await runner.run()
        dead = await broker.dead_letters()
    assert [(u.key, u.event) for u in seen] == [
        ("holiday/beach at dusk.jpg", "created"),
        ("old.jpg", "deleted"),
    ]
    assert seen[0].content_type == "image/jpeg" and seen[0].time is not None
    with pytest.raises(eventfn.ObjectNotLocal, match="read it with your S3 client"):
        await seen[0].read()
    assert summary.handled == 2 and summary.dead_lettered == 1
    (junk,) = dead
    assert "neither an eventfn upload record nor an S3/MinIO notification" in junk.error_message
    assert json.loads(junk.body)["type"] == "junk"
