"""The directory bucket: atomic puts, reads that never leave the bucket, keys and their rules."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from eventfn.events import now_rfc3339
from eventfn.exceptions import EventfnError
from eventfn.sources.buckets import (
    STATE_DIR,
    DirectoryBucket,
    InvalidKey,
    ObjectTooLarge,
    is_object_key,
)


@pytest.fixture
def bucket(tmp_path: Path) -> DirectoryBucket:
    return DirectoryBucket("docs", tmp_path / "buckets")


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (symlinks not followed), with its content."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


async def test_put_read_open_stat_delete_keys(bucket: DirectoryBucket) -> None:
    data = b"hello, bucket\n"
    record = await bucket.put("2026/11/notes.txt", data)
    assert bucket.directory == (bucket.directory.parent / "docs")
    assert (bucket.directory / "2026/11/notes.txt").read_bytes() == data
    info = os.stat(bucket.directory / "2026/11/notes.txt")
    assert record.bucket == "docs" and record.key == "2026/11/notes.txt"
    assert record.size == len(data) and record.event == "created"
    assert record.etag == hashlib.md5(data).hexdigest()
    assert record.version == f"{info.st_size}-{info.st_mtime_ns}"
    assert record.content_type == "text/plain"
    assert record.time == now_rfc3339(info.st_mtime_ns / 1e9)

    assert await bucket.stat("2026/11/notes.txt") == record
    assert await bucket.read("2026/11/notes.txt") == data
    with bucket.open("2026/11/notes.txt") as f:
        assert f.read(5) == b"hello" and f.read() == data[5:]
    assert bucket.path("2026/11/notes.txt") == bucket.directory / "2026/11/notes.txt"
    assert await bucket.keys() == ["2026/11/notes.txt"]

    assert await bucket.delete("2026/11/notes.txt") is True
    assert await bucket.delete("2026/11/notes.txt") is False
    assert await bucket.keys() == []
    with pytest.raises(FileNotFoundError, match=r"no object '2026/11/notes\.txt'"):
        await bucket.read("2026/11/notes.txt")
    with pytest.raises(FileNotFoundError):
        await bucket.stat("2026/11/notes.txt")


async def test_put_takes_async_iterables_and_files(bucket: DirectoryBucket, tmp_path: Path) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(300):
            yield bytes([i % 256]) * 7_000  # many small chunks, more than one MiB in all

    expected = b"".join(bytes([i % 256]) * 7_000 for i in range(300))
    record = await bucket.put("a/stream.bin", chunks())
    assert record.size == len(expected) and await bucket.read("a/stream.bin") == expected
    assert record.etag == hashlib.md5(expected).hexdigest()
    assert record.content_type is None or record.content_type == "application/octet-stream"

    source = tmp_path / "source.pdf"
    source.write_bytes(b"%PDF-1.7 " * 1000)
    with source.open("rb") as f:
        record = await bucket.put("b/scan.pdf", f, content_type="application/x-scan")
    assert record.content_type == "application/x-scan"
    assert await bucket.read("b/scan.pdf") == source.read_bytes()
    assert (await bucket.stat("b/scan.pdf")).content_type == "application/x-scan"  # kept

    await bucket.put("b/scan.pdf", b"v2")  # an overwrite is a new version
    assert (await bucket.stat("b/scan.pdf")).version != record.version
    with pytest.raises(TypeError, match="takes bytes"):
        await bucket.put("c", 42)  # type: ignore[arg-type]


async def test_keys_are_sorted_complete_objects_only(bucket: DirectoryBucket) -> None:
    for key in ["b/2.txt", "a/1.txt", "b/1.txt", "ab.txt"]:
        await bucket.put(key, b"x")
    d = bucket.directory
    for name in [".hidden", "b/.git/config", "b/draft.tmp", "b/movie.PART", "b/x.crdownload"]:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(b"partial")
    (d / "b/notes.txt~").write_bytes(b"editor backup")
    (d / "b/.notes.txt.swp").write_bytes(b"vim")
    (d / "empty-dir").mkdir()
    assert await bucket.keys() == ["a/1.txt", "ab.txt", "b/1.txt", "b/2.txt"]
    assert await bucket.keys("a") == ["a/1.txt", "ab.txt"]
    assert await bucket.keys("a/") == ["a/1.txt"]
    assert await bucket.keys("b/2") == ["b/2.txt"]
    assert await bucket.keys("nowhere/") == []
    assert (d / STATE_DIR).is_dir()  # where put's temporary files go, never listed


def test_object_key_rules() -> None:
    assert is_object_key("a/b.txt") and is_object_key("tmp/x") and is_object_key("a.tmp.txt")
    for key in [".env", "a/.git/x", "x.tmp", "x.TMP", "f.part", "f.partial", "f~", "f.swp"]:
        assert not is_object_key(key), key


BAD_KEYS = [
    ("", "non-empty"),
    ("/etc/passwd", "absolute"),
    ("../outside/secret.txt", "'..'"),
    ("a/../../outside/secret.txt", "'..'"),
    ("a/./b", "'.'"),
    ("a//b", "empty"),
    ("a/", "empty"),
    ("a\0b", "NUL"),
    ("a\\b", "backslash"),
    (".hidden", "hidden or temporary"),
    ("a/.git/config", "hidden or temporary"),
    ("upload.part", "hidden or temporary"),
    ("x" * 256, "255 bytes"),
]


@pytest.mark.parametrize(("key", "why"), BAD_KEYS, ids=[repr(k)[:20] for k, _ in BAD_KEYS])
async def test_bad_keys_are_refused(
    bucket: DirectoryBucket, tmp_path: Path, key: str, why: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    before = tree(tmp_path)
    with pytest.raises(InvalidKey, match=why) as caught:
        await bucket.put(key, b"evil")
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, EventfnError)
    for call in (bucket.read, bucket.stat, bucket.delete):
        with pytest.raises(InvalidKey):
            await call(key)
    with pytest.raises(InvalidKey):
        bucket.open(key)
    with pytest.raises(InvalidKey):
        bucket.path(key)
    assert tree(tmp_path) == before  # nothing written, nothing deleted


async def test_symlinks_are_never_followed(bucket: DirectoryBucket, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    d = bucket.directory
    (d / "link.txt").symlink_to(outside / "secret.txt")
    (d / "dirlink").symlink_to(outside)
    (d / "inner").mkdir()
    await bucket.put("inner/ok.txt", b"ok")
    (d / "alias.txt").symlink_to(d / "inner/ok.txt")  # even one that stays inside
    before = tree(tmp_path)

    for key in ["link.txt", "dirlink/secret.txt", "alias.txt"]:
        for call in (bucket.read, bucket.stat):
            with pytest.raises(InvalidKey, match="symlink"):
                await call(key)
        with pytest.raises(InvalidKey, match="symlink"):
            bucket.open(key)
        with pytest.raises(InvalidKey, match="symlink"):
            bucket.path(key)
        with pytest.raises(InvalidKey, match="symlink"):
            await bucket.delete(key)
    with pytest.raises(InvalidKey, match="symlink"):
        await bucket.put("dirlink/new.txt", b"evil")
    with pytest.raises(InvalidKey, match="symlink"):
        await bucket.put("dirlink/sub/new.txt", b"evil")
    assert await bucket.keys() == ["inner/ok.txt"]
    assert await bucket.keys("dirlink/") == []
    assert tree(tmp_path) == before
    assert sorted(os.listdir(outside)) == ["secret.txt"]

    # A put *onto* a symlink's name replaces the link itself, never the file it points to.
    await bucket.put("link.txt", b"replaced")
    assert (outside / "secret.txt").read_bytes() == b"secret"
    assert not (d / "link.txt").is_symlink() and await bucket.read("link.txt") == b"replaced"


async def test_oversize_object_is_refused_by_read_only(tmp_path: Path) -> None:
    bucket = DirectoryBucket("big", tmp_path, max_size=1000)
    await bucket.put("big.bin", b"x" * 5000)
    with pytest.raises(ObjectTooLarge, match=r"5000 bytes, over the read\(\) limit of 1000") as e:
        await bucket.read("big.bin")
    assert "open()" in str(e.value)
    assert (await bucket.stat("big.bin")).size == 5000
    with bucket.open("big.bin") as f:
        assert sum(len(chunk) for chunk in iter(lambda: f.read(512), b"")) == 5000
    await bucket.put("small.bin", b"x" * 1000)
    assert len(await bucket.read("small.bin")) == 1000


async def test_put_is_atomic_to_a_concurrent_reader(bucket: DirectoryBucket) -> None:
    size = 24 << 20
    data = os.urandom(1 << 20) * 24
    etag = hashlib.md5(data).hexdigest()
    seen: list[int] = []

    async def slowly() -> AsyncIterator[bytes]:
        for start in range(0, size, 256 << 10):
            yield data[start : start + (256 << 10)]
            await anyio.lowlevel.checkpoint()

    async def poll() -> None:
        # whenever the name exists at all, the object behind it is complete
        while True:
            if (bucket.directory / "big.bin").exists() or "big.bin" in await bucket.keys():
                record = await bucket.stat("big.bin")
                assert (record.size, record.etag) == (size, etag)
                seen.append(record.size)
                return
            seen.append(0)
            await anyio.sleep(0.005)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(poll)
            await bucket.put("big.bin", slowly())
    assert seen[-1] == size and 0 in seen  # the reader looked while the put was writing
    assert os.listdir(bucket.state_dir / "tmp") == []


async def test_failed_or_cancelled_put_leaves_nothing(bucket: DirectoryBucket) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * (2 << 20)
        raise OSError("upload connection reset")

    with pytest.raises(OSError, match="connection reset"):
        await bucket.put("a.bin", broken())

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"y" * 65536
            await anyio.sleep(0.001)

    with anyio.move_on_after(0.2):
        await bucket.put("b.bin", endless())
    assert await bucket.keys() == []
    assert os.listdir(bucket.state_dir / "tmp") == []


async def test_keys_clashing_with_files_or_directories(bucket: DirectoryBucket) -> None:
    await bucket.put("a", b"file")
    with pytest.raises(InvalidKey, match="clashes"):
        await bucket.put("a/b", b"under a file")
    await bucket.put("d/x", b"x")
    with pytest.raises(InvalidKey, match="clashes"):
        await bucket.put("d", b"over a directory")
    with pytest.raises(InvalidKey, match="directory"):
        await bucket.delete("d")
    with pytest.raises(FileNotFoundError):
        await bucket.read("d")
    assert await bucket.keys() == ["a", "d/x"]


async def test_a_fifo_is_no_object_and_does_not_block(bucket: DirectoryBucket) -> None:
    os.mkfifo(bucket.directory / "pipe")
    with anyio.fail_after(5), pytest.raises(FileNotFoundError, match="no file"):
        await bucket.read("pipe")
    assert await bucket.keys() == []


def test_temporary_files_of_crashed_puts_are_swept(tmp_path: Path) -> None:
    tmp = DirectoryBucket("b", tmp_path).state_dir / "tmp"
    (tmp / "crashed.tmp").write_bytes(b"half")
    os.utime(tmp / "crashed.tmp", (0, time.time() - 2 * 24 * 3600))
    (tmp / "writing.tmp").write_bytes(b"still being written")
    DirectoryBucket("b", tmp_path)
    assert os.listdir(tmp) == ["writing.tmp"]


def test_bucket_names_are_plain(tmp_path: Path) -> None:
    for name in ["", "../x", "a/b", ".state"]:
        with pytest.raises(EventfnError, match="not a plain directory name"):
            DirectoryBucket(name, tmp_path)
    assert not (tmp_path.parent / "x").exists()
