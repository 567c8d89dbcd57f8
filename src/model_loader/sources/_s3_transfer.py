"""Parallel, pinned downloads of S3 objects into a directory, hashed while written.

Small objects are one GET each, streamed to disk and hashed on the way; botocore checks
the object's S3 checksum at the end of the stream (``ChecksumMode=ENABLED``; not for
objects uploaded in parts, whose checksum may be a composite).

Large objects (``>= multipart_threshold``) are preallocated and filled with ``pwrite`` by
*segments*: each segment is one GET of a byte range, streamed in ``chunk_size`` pieces.
A large object starts as a single segment covering all of it; a worker with nothing else
to do may split the segment with the most time left in two and fetch the second half
itself (work stealing, never below ``part_size``). Whatever order the bytes land in, a
hasher thread reads the contiguous written prefix back from the page cache while the
workers keep streaming, so the SHA-256 (and the object's full-object S3 checksum, read by
a HEAD) cover the whole file in order. Memory stays bounded: one chunk per worker plus
one hash buffer.

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
import errno
import hashlib
import logging
import os
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from model_loader._types import FileEntry
from model_loader.errors import (
    IntegrityError,
    ModelLoaderError,
    SourceTimeoutError,
    SourceUnavailableError,
    StaleResolutionError,
)
from model_loader.sources._s3_errors import translate

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["SPLIT_FACTOR", "ObjectSpec", "RangeSplit", "TransferOptions", "download"]

logger = logging.getLogger(__name__)

RangeSplit = Literal["auto", "eager", "off"]

MiB = 1024 * 1024
SPLIT_FACTOR = 4.0
"""``auto`` splits a segment when its remaining time exceeds this many first-byte latencies."""
_MIN_RATE_SAMPLE = 2 * MiB  # bytes a segment streams before its rate is trusted (at most part_size)
_STREAM_READ = 256 * 1024  # one read of a ranged stream: small enough to measure its rate and to stop it early
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

    @property
    def multipart(self) -> bool:
        """Uploaded in parts (``ETag`` ``"...-N"``): its checksum may be a composite of the parts'."""
        return "-" in (self.etag or "").strip('"')

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
    part_size: int = 8 * MiB
    multipart_threshold: int = 16 * MiB
    range_split: RangeSplit = "auto"
    verify_checksums: bool = True
    request_attempts: int = 3
    request_backoff: float = 0.1
    chunk_size: int = 1 * MiB


class _Aborted(Exception):
    """Another worker failed; stop quietly."""


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview, /) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def _full_object_checksum(head: dict[str, Any], multipart: bool) -> tuple[str, str, Any] | None:
    """``(algorithm, expected base64, hasher)`` for a full-object checksum we can compute.

    A composite checksum (a checksum of the parts' checksums) says nothing checkable about
    the bytes. S3 marks it ``ChecksumType: COMPOSITE`` and a ``-N`` suffix; some stores (moto)
    do neither, so a multipart object's checksum counts only when marked ``FULL_OBJECT``.
    """
    kind = head.get("ChecksumType")
    if kind == "COMPOSITE" or (multipart and kind != "FULL_OBJECT"):
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
    __slots__ = ("end", "file", "rate_base", "requested_end", "reserved", "start", "started", "t_first", "written")

    def __init__(self, file: _BigFile, start: int, end: int) -> None:
        self.file = file
        self.start = start
        self.end = end  # exclusive; lowered when another worker steals the tail
        self.requested_end = end
        self.reserved = start  # bytes claimed for writing
        self.written = start  # bytes on disk
        self.started = False
        self.t_first = 0.0
        self.rate_base = start  # written when t_first was taken

    def rate(self, now: float, sample: int) -> float | None:
        streamed = self.written - self.rate_base
        if not self.started or streamed < sample or now <= self.t_first:
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
        self.sha = hashlib.sha256()
        self.checksum: tuple[str, str, Any] | None = None
        self.finished = False
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
        lock = threading.Lock()
        self.cond = threading.Condition(lock)  # scheduling: idle workers wait here
        self.hash_cond = threading.Condition(lock)  # the hasher waits here for written bytes
        self.workers_done = False
        self.error: BaseException | None = None
        self.results: list[FileEntry] = []
        self.big: list[_BigFile] = []
        self.queue: deque[ObjectSpec | _Segment] = deque()
        try:
            for spec in sorted(specs, key=lambda s: s.size, reverse=True):  # largest first
                if spec.size >= opts.multipart_threshold:
                    big = _BigFile(spec, _open_new(dest / spec.path, spec.size))
                    self.big.append(big)
                    self.queue.append(big.segments[0])
                else:
                    self.queue.append(spec)
        except BaseException as exc:
            for big in self.big:
                os.close(big.fd)
            mapped = translate(exc, f"preallocating files in {dest}", uri)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc

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
        sample = min(_MIN_RATE_SAMPLE, self.opts.part_size)
        for big in self.big:
            file_rate = max((r for s in big.segments if (r := s.rate(now, sample))), default=None)
            for seg in big.segments:
                left = seg.end - seg.reserved
                if left < min_left:
                    continue
                may_later = True
                if self.opts.range_split == "eager":
                    score = float(left)
                else:
                    rate = seg.rate(now, sample) or file_rate
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
            self.hash_cond.notify_all()

    def run(self) -> list[FileEntry]:
        hasher: threading.Thread | None = None
        started: list[threading.Thread] = []
        try:
            if self.big:
                hasher = threading.Thread(target=self._hasher, name="model-loader-s3-hash", daemon=True)
                hasher.start()
            for i in range(self.workers()):
                thread = threading.Thread(target=self._worker, name=f"model-loader-s3-{i}", daemon=True)
                thread.start()
                started.append(thread)
        except BaseException as exc:  # cannot start a thread: stop the others, report it
            self.fail(exc, "starting download threads")
        finally:
            for thread in started:
                thread.join()
            with self.cond:
                self.workers_done = True
                self.hash_cond.notify_all()
            if hasher is not None:
                hasher.join()
            for big in self.big:
                os.close(big.fd)
        if self.error is not None:
            raise self.error
        unfinished = [b.spec.path for b in self.big if not b.finished]
        if unfinished:  # every byte was written, or a worker would have failed
            raise SourceUnavailableError(f"incomplete download of {unfinished}", scheme="s3", ref=self.uri)
        return self.results

    def _worker(self) -> None:
        while (work := self.next_work()) is not None:
            key = work.key if isinstance(work, ObjectSpec) else work.file.spec.key
            what = f"GET s3://{self.bucket}/{key}"
            try:
                self._attempts(work, what)
            except _Aborted:
                return
            except BaseException as exc:
                self.fail(exc, what)
                return

    def _attempts(self, work: ObjectSpec | _Segment, what: str) -> None:
        """Run one transfer; re-issue it after a fast transient failure, resuming where it stopped.

        Only errors that fail fast are retried here (5xx, SlowDown, resets, bodies cut
        short); timeouts, stale pins and everything permanent end the fetch at once, so
        the loader's deadline and retry policy stay in charge of time.
        """
        attempt = 1
        while True:
            try:
                if isinstance(work, ObjectSpec):
                    self._small(work, what)
                else:
                    self._segment(work, what)
                return
            except _Aborted:
                raise
            except Exception as exc:
                mapped = translate(exc, what, self.uri)
                transient = isinstance(mapped, SourceUnavailableError) and not isinstance(mapped, SourceTimeoutError)
                if not transient or attempt >= self.opts.request_attempts or self.error is not None:
                    raise
                delay = random.uniform(0, min(2.0, self.opts.request_backoff * 2 ** (attempt - 1)))
                logger.warning(
                    "%s failed (attempt %d/%d): %s; resuming in %.2fs",
                    what,
                    attempt,
                    self.opts.request_attempts,
                    mapped,
                    delay,
                )
                time.sleep(delay)
                attempt += 1

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
        # botocore checks the checksum at the end of the stream; a multipart object's may be a
        # composite that some stores (moto) do not mark as such: see _full_object_checksum
        extra = {"ChecksumMode": "ENABLED"} if self.opts.verify_checksums and not spec.multipart else {}
        response = self.client.get_object(Bucket=self.bucket, Key=spec.key, **spec.pin(), **extra)  # type: ignore[arg-type]
        body = response["Body"]
        try:
            self._check(spec, response, what)
            sha = hashlib.sha256()
            size = 0
            with open(self.dest / spec.path, "wb") as out:  # "wb": a retry starts the file again
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
        if seg.start == 0 and not big.head_done:  # the first segment learns the full-object checksum
            if self.opts.verify_checksums:
                head = self.client.head_object(Bucket=self.bucket, Key=spec.key, ChecksumMode="ENABLED", **spec.pin())  # type: ignore[arg-type]
                self._check(spec, head, what)
                if head.get("ContentLength") != spec.size:
                    raise StaleResolutionError(f"{what}: the object's size changed", scheme="s3", ref=self.uri)
                big.checksum = _full_object_checksum(dict(head), spec.multipart)
            big.head_done = True
        with self.cond:
            start, end = seg.reserved, seg.end
            seg.requested_end = end
        if start >= end:
            return
        # the whole object is asked for without a Range: some stores serve ranges slowly
        ranged = {} if (start, end) == (0, spec.size) else {"Range": f"bytes={start}-{end - 1}"}
        t0 = time.monotonic()
        response = self.client.get_object(Bucket=self.bucket, Key=spec.key, **spec.pin(), **ranged)  # type: ignore[arg-type]
        body = response["Body"]
        try:
            self._check(spec, response, what)
            now = time.monotonic()
            with self.cond:
                big.ttfb = now - t0 if big.ttfb is None else min(big.ttfb, now - t0)
                seg.started, seg.t_first, seg.rate_base = True, now, seg.written
            self._stream(seg, body, what)
        finally:
            body.close()

    def _stream(self, seg: _Segment, body: Any, what: str) -> None:
        big = seg.file
        while True:
            with self.cond:
                if self.error is not None:
                    raise _Aborted
                want = min(_STREAM_READ, seg.end - seg.reserved)
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
                self.hash_cond.notify()
        if seg.end == seg.requested_end and body.read(1):  # drain to EOF: frees the connection
            raise SourceUnavailableError(f"{what}: the body is longer than requested", scheme="s3", ref=self.uri)
        with self.cond:
            self.cond.notify_all()

    def _hasher(self) -> None:
        """Hash each large file's contiguous written prefix, in order, reading it back.

        Its own thread, so the workers keep streaming while it hashes (SHA-256 runs at
        about 1 GB/s here, and releases the GIL).
        """
        buf = bytearray(self.opts.chunk_size)
        view = memoryview(buf)
        while True:
            with self.cond:
                while True:
                    if self.error is not None:
                        return
                    todo = [(b, b.hashed_to, b.frontier()) for b in self.big if not b.finished]
                    todo = [t for t in todo if t[2] > t[1]]
                    if todo or self.workers_done or all(b.finished for b in self.big):
                        break
                    self.hash_cond.wait()
            if not todo:
                return
            for big, start, stop in todo:
                what = f"GET s3://{self.bucket}/{big.spec.key}"
                try:
                    self._hash_range(big, view, start, stop)
                    with self.cond:
                        big.hashed_to = stop
                        big.finished = stop == big.spec.size
                    if big.finished:
                        self._finish(big, what)
                except BaseException as exc:
                    self.fail(exc, what)
                    return

    def _hash_range(self, big: _BigFile, view: memoryview, start: int, stop: int) -> None:
        extra = big.checksum[2] if big.checksum is not None else None
        pos = start
        while pos < stop:
            n = os.preadv(big.fd, [view[: min(len(view), stop - pos)]], pos)
            if n <= 0:
                raise OSError(f"short read-back of {big.spec.path} at byte {pos}")
            big.sha.update(view[:n])
            if extra is not None:
                extra.update(view[:n])
            pos += n

    def _finish(self, big: _BigFile, what: str) -> None:
        digest = big.sha.digest()
        if big.checksum is not None:
            algorithm, expected, hasher = big.checksum
            actual = digest if hasher is None else hasher.digest()
            if base64.b64encode(actual).decode() != expected:
                raise IntegrityError(f"{what}: the {algorithm} checksum S3 stores does not match the bytes received")
        with self.cond:  # durability is the cache's job: it syncs the staging tree once
            self.results.append(FileEntry(big.spec.path, big.spec.size, digest.hex()))
        if big.splits:
            logger.debug("%s: fetched in %d ranged parts", what, big.splits + 1)


def _open_new(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)  # reserve the space now: ENOSPC before downloading
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                    raise
                os.ftruncate(fd, size)  # a filesystem without fallocate
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
) -> list[FileEntry]:
    """Download ``specs`` into ``dest`` (parents must exist) and return what was written.

    Raises:
        SourceError: A mapped S3 error (the first one; the other transfers stop).
        IntegrityError: An S3 checksum did not match.
    """
    job = _Job(client, bucket, specs, dest, opts, uri)
    return job.run()
