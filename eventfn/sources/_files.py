"""The low-level file work of a directory bucket (:mod:`eventfn.sources.buckets`): directories
opened one segment at a time without following symlinks, the temporary file of a ``put``, walks,
hashes and extended attributes. POSIX only (Linux, macOS).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat as st
import time
import uuid
from collections.abc import AsyncIterable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread

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
