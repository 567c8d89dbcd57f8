"""Writing downloads into the staging directory; every failure is the cache's ``CacheError``.

A full disk (``ENOSPC``, a quota, a file-size limit) says "no space left while ..."; any
other ``OSError`` (a name too long, a read-only or vanished directory) "cannot write the
model while ...". No bare ``OSError`` leaves the S3 source.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from model_loader.errors import IntegrityError
from model_loader.sources._s3_errors import disk_error

__all__ = ["existing_prefix", "open_file", "pread", "pwrite_all", "read_into"]

_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def existing_prefix(path: Path, wanted: int) -> int:
    """How much of the first ``wanted`` bytes of ``path`` exist: 0 unless it is a regular file."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return min(wanted, st.st_size) if stat.S_ISREG(st.st_mode) else 0


def open_file(path: Path, preallocate: int | None, *, keep: bool = False) -> int:
    """A new (or truncated: what an interrupted attempt left) file; ``preallocate`` bytes reserved.

    Reserving the space up front makes a full disk fail before the download, not after.
    With ``keep`` (a prefix an earlier attempt wrote, continued), the bytes already there
    stay; the file is then exactly ``preallocate`` bytes long.
    """
    try:
        fd = os.open(path, _FLAGS | (0 if keep else os.O_TRUNC), 0o644)
    except OSError as exc:
        raise disk_error(exc, f"creating {path}") from exc
    if preallocate is None:
        return fd
    try:
        if keep and os.fstat(fd).st_size > preallocate:
            os.ftruncate(fd, preallocate)
        _preallocate(fd, preallocate)
    except OSError as exc:
        os.close(fd)
        raise disk_error(exc, f"preallocating {preallocate} bytes for {path}") from exc
    return fd


def _preallocate(fd: int, size: int) -> None:
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)  # a filesystem without fallocate, or macOS


def pwrite_all(fd: int, data: memoryview, pos: int, path: Path) -> None:
    try:
        while data:
            n = os.pwrite(fd, data, pos)
            data, pos = data[n:], pos + n
    except OSError as exc:
        raise disk_error(exc, f"writing {path}") from exc


def pread(fd: int, n: int, pos: int, path: Path) -> bytes:
    try:
        data = os.pread(fd, n, pos)
    except OSError as exc:
        raise disk_error(exc, f"reading back {path}") from exc
    if not data:
        raise IntegrityError(f"{path}: short read-back at byte {pos}")
    return data


def read_into(fd: int, view: memoryview, pos: int, path: Path) -> int:
    """Read back into ``view`` from ``pos``; the number of bytes read (never 0)."""
    try:
        n = os.preadv(fd, [view], pos)
    except OSError as exc:
        raise disk_error(exc, f"reading back {path}") from exc
    if n <= 0:
        raise IntegrityError(f"{path}: short read-back at byte {pos}")
    return n
