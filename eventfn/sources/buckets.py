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
import hashlib
import io
import mimetypes
import os
import stat as st
import time
import uuid
from collections.abc import AsyncIterable, Iterable, Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO, Protocol

import anyio
import anyio.to_thread

from eventfn.events import now_rfc3339
from eventfn.exceptions import ConfigurationError, EventfnError
from eventfn.sources.records import UploadRecord

STATE_DIR = ".eventfn"
"""The bucket's own hidden directory: temporary files of ``put`` and the watcher's ledger."""

TEMP_SUFFIXES = ("~", ".tmp", ".part", ".partial", ".crdownload", ".download", ".swp", ".swx")
"""Endings (any case) of file names that are partial or scratch files, never objects."""

_CHUNK = 1 << 20
_ABANDONED = 24 * 3600.0
_XATTR = "user.eventfn.content_type"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO somebody left in the bucket must fail the regular-file check, not
# block until a writer comes.
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class InvalidKey(EventfnError, ValueError):
    """A key that cannot name an object: empty, absolute, with ``..``, a NUL or a backslash,
    hidden or temporary, or going through a symlink."""


class ObjectTooLarge(EventfnError):
    """``read()`` of an object larger than the bucket's ``max_size``; stream it with ``open()``."""


class Readable(Protocol):
    """A binary file, or anything with its ``read``."""

    def read(self, size: int = -1, /) -> bytes: ...


def is_object_key(key: str) -> bool:
    """Whether a (well-formed) key names an object rather than a hidden or temporary file.

    >>> is_object_key("scans/a.pdf"), is_object_key("scans/a.pdf.part")
    (True, False)
    """
    if key.startswith(".") or "/." in key:
        return False
    return not key.rsplit("/", 1)[-1].lower().endswith(TEMP_SUFFIXES)


def version_of(info: os.stat_result) -> str:
    """The version of a file's content: its size and modification time in nanoseconds."""
    return f"{info.st_size}-{info.st_mtime_ns}"


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


class _Dirs:
    """Descriptors of a bucket's directories, each opened from its parent without following a
    symlink; cached for one batch of operations and closed together."""

    def __init__(self, top: str) -> None:
        self._top = top
        self._fds: dict[tuple[str, ...], int] = {}

    def __enter__(self) -> _Dirs:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def fd(self, parts: tuple[str, ...], *, create: bool = False) -> int:
        found = self._fds.get(parts)
        if found is not None:
            return found
        if not parts:
            fd = os.open(self._top, _DIR_FLAGS & ~os.O_NOFOLLOW)
        else:
            parent = self.fd(parts[:-1], create=create)
            if create:
                with suppress(FileExistsError):
                    os.mkdir(parts[-1], dir_fd=parent)
            try:
                fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
            except NotADirectoryError:
                # Linux says ENOTDIR for a symlink opened with O_DIRECTORY | O_NOFOLLOW
                info = _lstat_at(parts[-1], parent)
                if info is not None and st.S_ISLNK(info.st_mode):
                    raise OSError(errno.ELOOP, "a symlink", parts[-1]) from None
                raise
        self._fds[parts] = fd
        return fd


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
        from eventfn.sources.watch import Ledger

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


class _Pending:
    """The temporary file of one ``put``, hashed as it is written."""

    def __init__(self, tmp: Path, content_type: str | None) -> None:
        self.dir_fd = os.open(tmp, _DIR_FLAGS & ~os.O_NOFOLLOW)
        self.name = f"{uuid.uuid4().hex}.tmp"
        try:
            # 0o666 and the umask, like any other program's new file (mkstemp makes 0o600)
            self.fd = os.open(self.name, _NEW_FLAGS, 0o666, dir_fd=self.dir_fd)
        except BaseException:
            os.close(self.dir_fd)
            raise
        self.committed = False
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.etag = ""
        if content_type:
            with suppress(OSError, AttributeError):  # no xattrs here: stat() guesses it
                os.setxattr(self.fd, _XATTR, content_type.encode())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._md5.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def copy_from(self, source: Readable) -> None:
        while chunk := source.read(_CHUNK):
            self.write(chunk)

    def finish(self) -> os.stat_result:
        self.etag = self._md5.hexdigest()
        os.fsync(self.fd)
        return os.fstat(self.fd)

    def discard(self) -> None:
        os.close(self.fd)
        if not self.committed:
            with suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=self.dir_fd)
        os.close(self.dir_fd)


def _sweep(tmp: Path) -> None:
    # Temporary files of puts that crashed; a put still writing touches its file all along.
    old = time.time() - _ABANDONED
    with os.scandir(tmp) as entries:
        for entry in entries:
            with suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < old:
                    os.unlink(entry.path)


async def _copy_async(source: AsyncIterable[bytes], pending: _Pending) -> None:
    # One thread hop per MiB, not per chunk: producers often yield a few KiB at a time.
    buffer = bytearray()
    async for chunk in source:
        buffer += chunk
        if len(buffer) >= _CHUNK:
            await anyio.to_thread.run_sync(pending.write, bytes(buffer))
            buffer.clear()
    if buffer:
        await anyio.to_thread.run_sync(pending.write, bytes(buffer))


def _walk(fd: int, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
    """The objects below a directory descriptor: regular files, symlinks not followed."""
    with os.scandir(fd) as entries:
        listed = list(entries)
    for entry in listed:
        name = entry.name
        if name.startswith(".") or not _utf8(name):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    yield from _walk(sub, f"{prefix}{name}/")
                finally:
                    os.close(sub)
            elif entry.is_file(follow_symlinks=False) and is_object_key(name):
                yield prefix + name, entry.stat(follow_symlinks=False)
        except OSError:
            continue  # deleted, replaced or unreadable: the next event or scan sees it


def _lstat_at(name: str, parent: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return None


def _utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:  # undecodable bytes in a name: it cannot be a key
        return False
    return True


def _md5(f: io.RawIOBase, size: int) -> str:
    """The md5 hex of a file, like S3's etag of a single-part upload (so clients can compare)."""
    digest = hashlib.md5(usedforsecurity=False)
    # A read no larger than the file: a small object costs one read and no big buffer.
    while chunk := f.read(min(_CHUNK, size + 1)):
        digest.update(chunk)
    return digest.hexdigest()


def _xattr(fd: int) -> str | None:
    try:
        return os.getxattr(fd, _XATTR).decode()
    except (OSError, AttributeError, UnicodeDecodeError):
        return None
