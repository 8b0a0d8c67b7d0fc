"""A directory bucket: an object store that is a plain directory, the zero-infrastructure source
of upload events.

An object is a regular file; its key is its path below the bucket's directory, with ``/``
between segments. ``put`` writes a temporary file in the bucket's hidden state directory
(``.eventfn``), fsyncs it and renames it into place, so an object appears complete or not at
all. Files that other programs drop in count as objects too, once the watcher
(:mod:`eventfn.sources.watch`) has seen them stop changing.

Hidden and temporary files are never objects: a key with any segment starting with ``.``, or
whose last segment ends with one of :data:`TEMP_SUFFIXES` (editors', browsers' and downloaders'
partial files).

Every access goes from the bucket's directory down one segment at a time, with ``O_NOFOLLOW``
on each (``openat``): a symlink anywhere in a key is refused (:class:`InvalidKey`), even one that
is swapped in while the bucket is reading, so nothing outside the bucket is ever read or written.
Symlinks are never objects. POSIX only (Linux, macOS).
"""

from __future__ import annotations

import errno
import mimetypes
import os
import stat as st
from collections.abc import AsyncIterable, Iterable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.to_thread

from eventfn.events import now_rfc3339
from eventfn.exceptions import ConfigurationError, EventfnError
from eventfn.sources._files import (
    _READ_FLAGS,
    _copy_async,
    _Dirs,
    _lstat_at,
    _md5,
    _Pending,
    _sweep,
    _utf8,
    _walk,
    _xattr,
)
from eventfn.sources._files import TEMP_SUFFIXES as TEMP_SUFFIXES
from eventfn.sources._files import Readable as Readable
from eventfn.sources._files import is_object_key as is_object_key
from eventfn.sources._files import version_of as version_of
from eventfn.sources.records import UploadRecord

STATE_DIR = ".eventfn"
"""The bucket's own hidden directory: temporary files of ``put`` and the watcher's ledger."""


class InvalidKey(EventfnError, ValueError):
    """A key that cannot name an object: empty, absolute, with ``..``, a NUL or a backslash,
    hidden or temporary, or going through a symlink."""


class ObjectTooLarge(EventfnError):
    """``read()`` of an object larger than the bucket's ``max_size``; stream it with ``open()``."""


def split_key(key: str) -> tuple[str, ...]:
    """The segments of a key, or :class:`InvalidKey` saying what is wrong with it.

    >>> split_key("2026/11/scan.pdf")
    ('2026', '11', 'scan.pdf')
    """
    parts = _segments(key)
    if not is_object_key(key):
        raise InvalidKey(
            f"object key {key!r} names a hidden or temporary file "
            f"('.' prefix, or ending {', '.join(TEMP_SUFFIXES)}), which is never an object"
        )
    return parts


def _segments(key: str) -> tuple[str, ...]:
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"an object key is a non-empty string, not {key!r}")
    problem = None
    if "\0" in key:
        problem = "contains a NUL byte"
    elif "\\" in key:
        problem = "contains a backslash (separate segments with '/')"
    elif key.startswith("/"):
        problem = "is absolute (keys are relative to the bucket)"
    parts = tuple(key.split("/"))
    if problem is None and any(p in ("", ".", "..") for p in parts):
        problem = "has an empty, '.' or '..' segment"
    if problem is None:
        try:
            if max(len(p.encode()) for p in parts) > 255:
                problem = "has a segment longer than 255 bytes"
        except UnicodeEncodeError:
            problem = "is not valid UTF-8"
    if problem is not None:
        raise InvalidKey(f"object key {key!r} {problem}")
    return parts


class DirectoryBucket:
    """The bucket ``name``: the directory ``root/name`` (created if missing).

    >>> bucket = DirectoryBucket("invoices", Path("buckets"))
    >>> record = await bucket.put("2026/11/scan.pdf", data)
    >>> await bucket.read("2026/11/scan.pdf") == data
    True
    """

    def __init__(self, name: str, root: str | os.PathLike[str], *, max_size: int = 64 << 20):
        if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
            raise ConfigurationError(f"bucket name {name!r} is not a plain directory name")
        self.name = name
        self.max_size = max_size
        directory = Path(root) / name
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = Path(os.path.realpath(directory))
        """The bucket's directory, symlinks resolved once here (the only ones followed)."""
        self.state_dir = self.directory / STATE_DIR
        (self.state_dir / "tmp").mkdir(parents=True, exist_ok=True)
        _sweep(self.state_dir / "tmp")

    def __repr__(self) -> str:
        return f"DirectoryBucket({self.name!r}, {str(self.directory.parent)!r})"

    def path(self, key: str) -> Path:
        """The object's file, to hand to a tool that wants a path (``InvalidKey`` if any
        existing segment of it is a symlink).

        >>> subprocess.run(["pdftotext", bucket.path("scan.pdf"), "-"])
        """
        parts = split_key(key)
        where = self.directory
        for part in parts:
            where = where / part
            if where.is_symlink():
                raise self._through_symlink(key)
        return where

    async def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview | AsyncIterable[bytes] | Readable,
        *,
        content_type: str | None = None,
    ) -> UploadRecord:
        """Store an object atomically (bytes, an async iterable of bytes, or a binary file).

        >>> with open("scan.pdf", "rb") as f:
        ...     record = await bucket.put("2026/scan.pdf", f, content_type="application/pdf")
        """
        parts = split_key(key)
        pending = await anyio.to_thread.run_sync(_Pending, self.state_dir / "tmp", content_type)
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                await anyio.to_thread.run_sync(pending.write, data)
            elif isinstance(data, AsyncIterable):
                await _copy_async(data, pending)
            elif callable(getattr(data, "read", None)):
                await anyio.to_thread.run_sync(pending.copy_from, data)
            else:
                raise TypeError(f"put() takes bytes, an async iterable or a file, not {data!r}")
            info = await anyio.to_thread.run_sync(self._commit, pending, key, parts)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(pending.discard)
            raise
        return self._record(key, info, pending.etag, content_type)

    async def stat(self, key: str) -> UploadRecord:
        """The object's ``created`` record (its content is hashed for the etag).

        >>> (await bucket.stat("scan.pdf")).size
        """
        return await anyio.to_thread.run_sync(self._stat, key)

    async def read(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectTooLarge` above ``max_size`` (use :meth:`open`).

        >>> text = (await bucket.read("notes.txt")).decode()
        """
        return await anyio.to_thread.run_sync(self._read, key)

    def open(self, key: str) -> BinaryIO:
        """The object as a binary file, to stream it (``anyio.wrap_file`` makes it async).

        >>> with bucket.open("video.mp4") as f:
        ...     head = f.read(1024)
        """
        fd = self._open_object(key)
        os.set_blocking(fd, True)
        return open(fd, "rb")

    async def delete(self, key: str) -> bool:
        """Delete an object; ``False`` if there was none (empty directories stay).

        >>> await bucket.delete("scan.pdf")
        True
        """
        return await anyio.to_thread.run_sync(self._delete, key)

    async def keys(self, prefix: str = "") -> list[str]:
        """The keys of the complete objects that start with ``prefix``, sorted.

        >>> await bucket.keys("2026/11/")
        ['2026/11/scan.pdf']
        """
        found = await anyio.to_thread.run_sync(self.scan, prefix)
        return sorted(found)

    async def mark_published(self, records: Sequence[UploadRecord]) -> None:
        """Record that these events were published, so that no watcher publishes them again.

        >>> await bucket.mark_published([await bucket.put("a.txt", b"hi")])
        """
        from eventfn.sources.ledger import Ledger

        def mark() -> None:
            with Ledger.opened(self) as ledger:
                ledger.mark(records)

        await anyio.to_thread.run_sync(mark)

    # The blocking parts, run in worker threads; the watcher calls them too.

    def scan(self, prefix: str = "") -> dict[str, str]:
        """Every object whose key starts with ``prefix``, with its version (blocking)."""
        base = tuple(prefix.split("/")[:-1])
        if base:
            _segments("/".join(base))
        found: dict[str, str] = {}
        with _Dirs(str(self.directory)) as dirs:
            try:
                fd = dirs.fd(base)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return found  # no such directory, or a symlink: no objects below it
                raise
            for key, info in _walk(fd, "".join(p + "/" for p in base)):
                if key.startswith(prefix):
                    found[key] = version_of(info)
        return found

    def versions(self, keys: Iterable[str]) -> dict[str, str | None]:
        """The version of each key (``None``: no object there); a key that is a directory
        adds the objects below it (blocking)."""
        found: dict[str, str | None] = {}
        with _Dirs(str(self.directory)) as dirs:
            for key in keys:
                if not _utf8(key):
                    continue
                parts = tuple(key.split("/"))
                try:
                    info = os.stat(parts[-1], dir_fd=dirs.fd(parts[:-1]), follow_symlinks=False)
                except OSError:
                    found[key] = None
                    continue
                if st.S_ISREG(info.st_mode):
                    found[key] = version_of(info)
                elif st.S_ISDIR(info.st_mode):
                    with suppress(OSError):
                        for sub, sub_info in _walk(dirs.fd(parts), key + "/"):
                            found[sub] = version_of(sub_info)
                else:
                    found[key] = None
        return found

    def describe(self, key: str, version: str) -> UploadRecord | str | None:
        """The record of ``key`` if it still has ``version``; else its current version, or
        ``None`` if it is no object any more (blocking)."""
        parts = tuple(key.split("/"))
        with _Dirs(str(self.directory)) as dirs:
            try:
                parent = dirs.fd(parts[:-1])
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=parent)
            except OSError:
                return None
            with open(fd, "rb", buffering=0) as f:
                before = os.fstat(fd)
                if not st.S_ISREG(before.st_mode):
                    return None
                if version_of(before) != version:
                    return version_of(before)
                etag = _md5(f, before.st_size)
                now = _lstat_at(parts[-1], parent)
                if now is None or not st.S_ISREG(now.st_mode):
                    return None
                same_file = (now.st_ino, now.st_dev) == (before.st_ino, before.st_dev)
                if not same_file or version_of(os.fstat(fd)) != version:
                    return version_of(now)  # written, or renamed over, while it was hashed
                return self._record(key, before, etag, _xattr(fd))

    def _stat(self, key: str) -> UploadRecord:
        with open(self._open_object(key), "rb", buffering=0) as f:
            etag = _md5(f, os.fstat(f.fileno()).st_size)
            return self._record(key, os.fstat(f.fileno()), etag, _xattr(f.fileno()))

    def _read(self, key: str) -> bytes:
        limit = self.max_size
        with open(self._open_object(key), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(size + 1) if size <= limit else b""
            if len(data) > size:  # it grew while we read: the rest, up to the limit
                data += f.read(limit + 1 - len(data))
        if size > limit or len(data) > limit:
            raise ObjectTooLarge(
                f"object {key!r} of bucket {self.name!r} is {max(size, len(data))} bytes, over "
                f"the read() limit of {limit} bytes (max_size); stream it with open() instead"
            )
        return data

    def _delete(self, key: str) -> bool:
        parts = split_key(key)
        with _Dirs(str(self.directory)) as dirs:
            try:
                parent = dirs.fd(parts[:-1])
                info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except OSError as exc:
                self._raise_if_symlink(key, exc)
                return False
            if st.S_ISLNK(info.st_mode):
                raise self._through_symlink(key)
            if st.S_ISDIR(info.st_mode):
                raise InvalidKey(f"{key!r} is a directory of bucket {self.name!r}, not an object")
            with suppress(FileNotFoundError):
                os.unlink(parts[-1], dir_fd=parent)
                return True
            return False

    def _open_object(self, key: str) -> int:
        """A descriptor of the object's regular file, reached without following symlinks."""
        parts = split_key(key)
        with _Dirs(str(self.directory)) as dirs:
            try:
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dirs.fd(parts[:-1]))
            except OSError as exc:
                self._raise_if_symlink(key, exc)
                raise FileNotFoundError(
                    errno.ENOENT, f"no object {key!r} in bucket {self.name!r}"
                ) from None
        if not st.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FileNotFoundError(errno.ENOENT, f"{key!r} of bucket {self.name!r} is no file")
        return fd

    def _commit(self, pending: _Pending, key: str, parts: tuple[str, ...]) -> os.stat_result:
        info = pending.finish()
        with _Dirs(str(self.directory)) as dirs:
            try:
                parent = dirs.fd(parts[:-1], create=True)
                os.replace(pending.name, parts[-1], src_dir_fd=pending.dir_fd, dst_dir_fd=parent)
            except OSError as exc:
                self._raise_if_symlink(key, exc)
                if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY):
                    raise InvalidKey(
                        f"object key {key!r} clashes with a file or directory of bucket "
                        f"{self.name!r} (an object cannot be both)"
                    ) from None
                raise
            os.fsync(parent)  # the rename itself survives a power cut
        pending.committed = True
        return info

    def _record(
        self, key: str, info: os.stat_result, etag: str, content_type: str | None
    ) -> UploadRecord:
        return UploadRecord(
            bucket=self.name,
            key=key,
            size=info.st_size,
            etag=etag,
            version=version_of(info),
            time=now_rfc3339(info.st_mtime_ns / 1e9),
            content_type=content_type or mimetypes.guess_type(key)[0],
        )

    def _raise_if_symlink(self, key: str, exc: OSError) -> None:
        if exc.errno == errno.ELOOP:
            raise self._through_symlink(key) from None

    def _through_symlink(self, key: str) -> InvalidKey:
        return InvalidKey(
            f"object key {key!r} goes through a symlink in bucket {self.name!r}; "
            "a bucket never follows symlinks"
        )
