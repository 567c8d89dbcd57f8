"""Parallel, pinned downloads of S3 objects into a directory, hashed while written.

Small objects are one GET each, streamed to disk and hashed on the way; botocore checks
the object's S3 checksum at the end of the stream (``ChecksumMode=ENABLED``).

Large objects (``>= multipart_threshold``) are preallocated and filled with ``pwrite`` by
*segments*: each segment is one GET of a byte range, streamed in ``chunk_size`` pieces.
A large object starts as a single segment covering all of it; a worker with nothing else
to do may split the segment with the most time left in two and fetch the second half
itself (work stealing, never below ``part_size``). Whatever order the bytes land in, one
hasher at a time reads the contiguous written prefix back from the page cache, so the
SHA-256 (and the object's full-object S3 checksum, read by a HEAD) cover the whole file
in order. Memory stays bounded: one chunk per worker plus one hash buffer.

When to split is ``range_split``:

- ``"auto"``: when the segment's remaining bytes, at the rate it is observed to stream,
  would take more than :data:`SPLIT_FACTOR` times the time this object's requests take
  to their first byte. On real S3 one connection streams at roughly 50-100 MB/s and the
  first byte comes in tens of milliseconds, so large objects are split down to
  ``part_size``; on a store that streams one connection at disk speed (a local MinIO,
  moto) a split costs more than it saves and none happens.
- ``"eager"``: whenever a worker is idle and a segment has two parts or more left.
- ``"off"``: never; one stream per object.

Every request is pinned (``IfMatch`` the resolved ETag, ``VersionId`` when known), and the
ETag of each response is compared again, in case a store ignores ``If-Match``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from model_loader._types import FileEntry
from model_loader.errors import IntegrityError, ModelLoaderError, SourceUnavailableError, StaleResolutionError
from model_loader.sources._s3_errors import translate

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["SPLIT_FACTOR", "ObjectSpec", "RangeSplit", "TransferOptions", "download"]

logger = logging.getLogger(__name__)

RangeSplit = Literal["auto", "eager", "off"]

MiB = 1024 * 1024
SPLIT_FACTOR = 4.0
"""``auto`` splits a segment when its remaining time exceeds this many first-byte latencies."""
_MIN_RATE_SAMPLE = 2 * MiB  # bytes a segment streams before its rate is trusted
_IDLE_POLL = 0.02  # seconds an idle worker waits before looking for a segment to split again


@dataclass(frozen=True, slots=True)
class ObjectSpec:
    """One object to download.

    Attributes:
        path: Relative path inside the destination (already validated).
        key: The S3 key.
        size: Size in bytes, as resolved.
        etag: The resolved ETag (sent as ``If-Match``).
        version_id: The resolved VersionId, when the bucket is versioned.
    """

    path: str
    key: str
    size: int
    etag: str | None = None
    version_id: str | None = None

    def pin(self) -> dict[str, str]:
        """The request arguments that pin this exact content."""
        pin = {}
        if self.version_id:
            pin["VersionId"] = self.version_id
        if self.etag:
            pin["IfMatch"] = self.etag
        return pin


@dataclass(frozen=True, slots=True)
class TransferOptions:
    """Knobs of one download; see :class:`~model_loader.sources.s3.S3Source` for defaults."""

    max_concurrency: int = 16
    part_size: int = 16 * MiB
    multipart_threshold: int = 32 * MiB
    range_split: RangeSplit = "auto"
    verify_checksums: bool = True
    chunk_size: int = 1 * MiB


class _Aborted(Exception):
    """Another worker failed; stop quietly."""


class _Checksum(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview, /) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def _full_object_checksum(head: dict[str, Any]) -> tuple[str, str, Any] | None:
    """``(algorithm, expected base64, hasher)`` for a full-object checksum we can compute."""
    if head.get("ChecksumType") == "COMPOSITE":
        return None
    for field, factory in (
        ("ChecksumSHA256", None),  # compared against the SHA-256 we compute anyway
        ("ChecksumCRC32", _Crc32),
        ("ChecksumSHA1", hashlib.sha1),
    ):
        value = head.get(field)
        if value and "-" not in value:
            return field[len("Checksum") :], value, factory() if factory else None
    return None


class _Segment:
    __slots__ = ("end", "file", "requested_end", "reserved", "start", "started", "t_first", "written")

    def __init__(self, file: _BigFile, start: int, end: int) -> None:
        self.file = file
        self.start = start
        self.end = end  # exclusive; lowered when another worker steals the tail
        self.requested_end = end
        self.reserved = start  # bytes claimed for writing
        self.written = start  # bytes on disk
        self.started = False
        self.t_first = 0.0

    def rate(self, now: float) -> float | None:
        streamed = self.written - self.start
        if not self.started or streamed < _MIN_RATE_SAMPLE or now <= self.t_first:
            return None
        return streamed / (now - self.t_first)


class _BigFile:
    def __init__(self, spec: ObjectSpec, fd: int) -> None:
        self.spec = spec
        self.fd = fd
        self.segments: list[_Segment] = [_Segment(self, 0, spec.size)]
        self.head_done = False
        self.ttfb: float | None = None
        self.hashed_to = 0
        self.hashing = False
        self.sha = hashlib.sha256()
        self.checksum: tuple[str, str, Any] | None = None
        self.splits = 0

    def frontier(self) -> int:
        """End of the contiguous written prefix (segments partition ``[0, size)``)."""
        pos = self.hashed_to
        for seg in self.segments:
            if seg.end <= pos:
                continue
            if seg.start > pos or seg.written < pos:
                return pos
            pos = seg.written
            if pos < seg.end:
                return pos
        return pos


class _Job:
    def __init__(
        self, client: S3Client, bucket: str, specs: Sequence[ObjectSpec], dest: Path, opts: TransferOptions, uri: str
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.dest = dest
        self.opts = opts
        self.uri = uri
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.results: list[FileEntry] = []
        self.big: list[_BigFile] = []
        self.queue: deque[ObjectSpec | _Segment] = deque()
        self.buffers = threading.local()
        for spec in sorted(specs, key=lambda s: s.size, reverse=True):  # largest first
            if spec.size >= opts.multipart_threshold:
                big = _BigFile(spec, _open_new(dest / spec.path, spec.size))
                self.big.append(big)
                self.queue.append(big.segments[0])
            else:
                self.queue.append(spec)

    # -- scheduling -------------------------------------------------------------------

    def workers(self) -> int:
        parallel = len(self.queue)
        if self.opts.range_split != "off":
            parallel += sum(b.spec.size // self.opts.part_size for b in self.big)
        return max(1, min(self.opts.max_concurrency, parallel))

    def next_work(self) -> ObjectSpec | _Segment | None:
        with self.cond:
            while True:
                if self.error is not None:
                    return None
                if self.queue:
                    return self.queue.popleft()
                if self.opts.range_split == "off":
                    return None
                stolen, may_later = self._steal()
                if stolen is not None:
                    return stolen
                if not may_later:
                    return None
                self.cond.wait(_IDLE_POLL)

    def _steal(self) -> tuple[_Segment | None, bool]:
        """Split the segment with the most time left; ``(new segment, worth waiting)``."""
        now = time.monotonic()
        best: tuple[float, _Segment] | None = None
        may_later = False
        min_left = 2 * self.opts.part_size
        for big in self.big:
            file_rate = max((r for s in big.segments if (r := s.rate(now))), default=None)
            for seg in big.segments:
                left = seg.end - seg.reserved
                if left < min_left:
                    continue
                may_later = True
                if self.opts.range_split == "eager":
                    score = float(left)
                else:
                    rate = seg.rate(now) or file_rate
                    if rate is None or big.ttfb is None or left / rate <= SPLIT_FACTOR * big.ttfb:
                        continue
                    score = left / rate
                if best is None or score > best[0]:
                    best = (score, seg)
        if best is None:
            return None, may_later
        seg = best[1]
        big = seg.file
        left = seg.end - seg.reserved
        mid = seg.reserved + left // 2
        new = _Segment(big, mid, seg.end)
        seg.end = mid
        big.segments.insert(big.segments.index(seg) + 1, new)
        big.splits += 1
        return new, True

    def fail(self, exc: BaseException, what: str) -> None:
        mapped: BaseException = exc
        if not isinstance(exc, ModelLoaderError):
            mapped = translate(exc, what, self.uri) or exc
            if mapped is not exc:
                mapped.__cause__ = exc
        with self.cond:
            if self.error is None:
                self.error = mapped
            self.cond.notify_all()

    def run(self) -> list[FileEntry]:
        threads = [
            threading.Thread(target=self._worker, name=f"model-loader-s3-{i}", daemon=True) for i in range(self.workers())
        ]
        try:
            for thread in threads:
                thread.start()
        finally:
            for thread in threads:
                if thread.is_alive() or thread.ident is not None:
                    thread.join()
            for big in self.big:
                os.close(big.fd)
        if self.error is not None:
            raise self.error
        return self.results

    def _worker(self) -> None:
        while (work := self.next_work()) is not None:
            key = work.key if isinstance(work, ObjectSpec) else work.file.spec.key
            what = f"GET s3://{self.bucket}/{key}"
            try:
                if isinstance(work, ObjectSpec):
                    self._small(work, what)
                else:
                    self._segment(work, what)
            except _Aborted:
                return
            except BaseException as exc:
                self.fail(exc, what)
                return

    # -- transfers --------------------------------------------------------------------

    def _check(self, spec: ObjectSpec, response: Any, what: str) -> None:
        etag = response.get("ETag")
        if spec.etag and etag and etag != spec.etag:
            raise StaleResolutionError(
                f"{what}: ETag {etag} is not the resolved {spec.etag} (the store may ignore If-Match)",
                scheme="s3",
                ref=self.uri,
            )

    def _small(self, spec: ObjectSpec, what: str) -> None:
        extra = {"ChecksumMode": "ENABLED"} if self.opts.verify_checksums else {}
        response = self.client.get_object(Bucket=self.bucket, Key=spec.key, **spec.pin(), **extra)  # type: ignore[arg-type]
        body = response["Body"]
        try:
            self._check(spec, response, what)
            sha = hashlib.sha256()
            size = 0
            with open(self.dest / spec.path, "xb") as out:
                while chunk := body.read(self.opts.chunk_size):
                    if self.error is not None:
                        raise _Aborted
                    sha.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        finally:
            body.close()
        if size != spec.size:
            raise SourceUnavailableError(f"{what}: got {size} bytes, expected {spec.size}", scheme="s3", ref=self.uri)
        with self.cond:
            self.results.append(FileEntry(spec.path, size, sha.hexdigest()))

    def _segment(self, seg: _Segment, what: str) -> None:
        big = seg.file
        spec = big.spec
        if not big.head_done:  # the first segment of a file: learn its full-object checksum
            if self.opts.verify_checksums:
                head = self.client.head_object(Bucket=self.bucket, Key=spec.key, ChecksumMode="ENABLED", **spec.pin())  # type: ignore[arg-type]
                self._check(spec, head, what)
                if head.get("ContentLength") != spec.size:
                    raise StaleResolutionError(f"{what}: the object's size changed", scheme="s3", ref=self.uri)
                big.checksum = _full_object_checksum(dict(head))
            big.head_done = True
        with self.cond:
            start, end = seg.reserved, seg.end
            seg.requested_end = end
        if start >= end:
            return
        t0 = time.monotonic()
        response = self.client.get_object(
            Bucket=self.bucket,
            Key=spec.key,
            Range=f"bytes={start}-{end - 1}",
            **spec.pin(),  # type: ignore[arg-type]
        )
        body = response["Body"]
        try:
            self._check(spec, response, what)
            now = time.monotonic()
            with self.cond:
                big.ttfb = now - t0 if big.ttfb is None else min(big.ttfb, now - t0)
                seg.started, seg.t_first = True, now
            self._stream(seg, body, what)
        finally:
            body.close()

    def _stream(self, seg: _Segment, body: Any, what: str) -> None:
        big = seg.file
        while True:
            with self.cond:
                if self.error is not None:
                    raise _Aborted
                want = min(self.opts.chunk_size, seg.end - seg.reserved)
            if want <= 0:
                break
            chunk = body.read(want)
            if not chunk:
                raise SourceUnavailableError(
                    f"{what}: the body ended at byte {seg.written} of {seg.requested_end}", scheme="s3", ref=self.uri
                )
            with self.cond:
                pos = seg.reserved
                n = min(len(chunk), seg.end - pos)
                seg.reserved = pos + n
            _pwrite_all(big.fd, memoryview(chunk)[:n], pos)
            with self.cond:
                seg.written = pos + n
            self._pump(big, what)
        if seg.end == seg.requested_end and body.read(1):  # drain to EOF: frees the connection
            raise SourceUnavailableError(f"{what}: the body is longer than requested", scheme="s3", ref=self.uri)
        with self.cond:
            self.cond.notify_all()

    def _pump(self, big: _BigFile, what: str) -> None:
        """Hash the contiguous written prefix, one thread per file at a time."""
        with self.cond:
            if big.hashing:
                return
            big.hashing = True
        try:
            buf = getattr(self.buffers, "buf", None)
            if buf is None:
                buf = self.buffers.buf = bytearray(self.opts.chunk_size)
            view = memoryview(buf)
            while True:
                with self.cond:
                    start, stop = big.hashed_to, big.frontier()
                    if stop <= start:
                        big.hashing = False
                        break
                pos = start
                while pos < stop:
                    n = os.preadv(big.fd, [view[: min(len(buf), stop - pos)]], pos)
                    if n <= 0:
                        raise OSError(f"short read-back of {big.spec.path} at {pos}")
                    big.sha.update(view[:n])
                    if big.checksum is not None and big.checksum[2] is not None:
                        big.checksum[2].update(view[:n])
                    pos += n
                with self.cond:
                    big.hashed_to = stop
        except BaseException:
            with self.cond:
                big.hashing = False
            raise
        if big.hashed_to == big.spec.size:
            self._finish(big, what)

    def _finish(self, big: _BigFile, what: str) -> None:
        digest = big.sha.digest()
        if big.checksum is not None:
            algorithm, expected, hasher = big.checksum
            actual = digest if hasher is None else hasher.digest()
            if base64.b64encode(actual).decode() != expected:
                raise IntegrityError(f"{what}: the {algorithm} checksum S3 stores does not match the bytes received")
        with self.cond:
            if any(e.path == big.spec.path for e in self.results):
                return
            self.results.append(FileEntry(big.spec.path, big.spec.size, digest.hex()))
        if big.splits:
            logger.debug("%s: fetched in %d ranged parts", what, big.splits + 1)


def _open_new(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)  # reserve the space now: ENOSPC before downloading
            except OSError:
                os.ftruncate(fd, size)  # filesystems without fallocate
        else:  # pragma: no cover - macOS
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while data:
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


def download(
    client: S3Client,
    bucket: str,
    specs: Sequence[ObjectSpec],
    dest: Path,
    opts: TransferOptions,
    uri: str,
    *,
    on_done: Callable[[int], None] | None = None,
) -> list[FileEntry]:
    """Download ``specs`` into ``dest`` (parents must exist) and return what was written.

    Raises:
        SourceError: A mapped S3 error (the first one; the other transfers stop).
        IntegrityError: An S3 checksum did not match.
    """
    job = _Job(client, bucket, specs, dest, opts, uri)
    entries = job.run()
    if on_done is not None:
        on_done(sum(b.splits for b in job.big))
    return entries
