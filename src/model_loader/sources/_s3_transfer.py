"""Parallel, pinned downloads of S3 objects into a directory, verified while written.

Every object is a file of one or more *segments*; a segment is one GET of a byte range,
streamed in :data:`_STREAM_READ` pieces and written with ``pwrite``. Small objects are
one segment, hashed as they stream. Large objects (``>= multipart_threshold``) are
preallocated and start as one segment covering all of them; a worker with nothing else
to do may split the streaming segment with the most time left and fetch its tail itself
(never below ``part_size``; when is ``range_split``, see docs/s3.md). Whatever order the
bytes land in, a hasher thread reads each large file's contiguous written prefix back
from the page cache, in order, while the workers keep streaming.

Each file's SHA-256 and its end-to-end check (:mod:`._s3_integrity`: the S3 checksum or
the ETag) are computed in that same pass. What to check is planned from the GET's
headers (small single-part objects) or from a HEAD (large or multipart objects, plus
``HEAD ?partNumber=1`` when the check needs the part layout).

Resuming: the hasher reports each large file's hashed prefix to
``FetchContext.file_progress`` about every tenth of a second (and the contiguous written
prefix when an attempt ends), so the cache journals it; a large file the context lists in
``partial`` is opened without truncating and its first segment starts at that prefix. The
prefix is read back and hashed with the rest: the whole file is checked as always.

Failures: a request that fails fast with a transient error is re-issued from the byte it
reached, after a backoff during which the worker takes other work (many small files are
served fairly). A file whose bytes fail their check (altered in flight, far likelier than
an object that does not match its own checksum) is downloaded again from byte 0, which
costs one of its ``request_attempts`` like a failed request. A file that runs out of
attempts is given up alone: the others finish, each completed file is reported to
``FetchContext.file_done`` as soon as it is verified, and the fetch then raises, so the
loader's next attempt fetches only what is missing. Timeouts, stale pins, disk errors and
a mismatch with no attempt left stop the whole fetch at once. Every request is pinned
(``IfMatch``, ``VersionId``), checked again on the response, and bounded by the deadline
(:mod:`._s3_deadline`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from model_loader._deadline import Deadline, FetchContext
from model_loader._types import FileEntry
from model_loader.errors import (
    IntegrityError,
    InvalidResponseError,
    ModelLoaderError,
    SourceError,
    SourceUnavailableError,
    StaleResolutionError,
)
from model_loader.sources._s3_disk import existing_prefix, open_file, pread, pwrite_all, read_into
from model_loader.sources._s3_integrity import Mismatch
from model_loader.sources._s3_listing import ObjectSpec, content_range, etag_of, integer
from model_loader.sources._s3_plan import Planner
from model_loader.sources._s3_requests import Runner, backoff, error_for, reissuable
from model_loader.sources._s3_segments import FileState, Segment

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["SPLIT_FACTOR", "MiB", "ObjectSpec", "RangeSplit", "TransferOptions", "download"]

logger = logging.getLogger(__name__)

RangeSplit = Literal["auto", "eager", "off"]

MiB = 1024 * 1024
SPLIT_FACTOR = 4.0
"""``auto`` splits a segment when its remaining time exceeds this many first-byte latencies."""
_MIN_RATE_SAMPLE = 2 * MiB  # bytes a segment streams before its rate is trusted (at most part_size)
_STREAM_READ = 256 * 1024  # one read of a body: small enough to measure a rate and to stop early
_IDLE_POLL = 0.02  # seconds an idle worker waits before looking for a segment to split again
_HASH_BUFFER = 1 * MiB
_HASH_STEP = 8 * MiB  # the hasher takes turns between files, and reports progress, at least this often
_REPORT_INTERVAL = 0.1  # seconds between two prefixes reported for one file (the bytes a kill may lose)
_REPORT_MIN = 1 * MiB  # ... and at least this many bytes apart (a journal line costs an open and a write)
_REPORT_MAX = 64 * MiB  # ... and at most this many bytes apart, however fast the download
_HASHER_WAIT = 1.0  # seconds an idle worker waits (unless woken) for a large file's check, which may fail


@dataclass(frozen=True, slots=True)
class TransferOptions:
    """Knobs of one download; see :class:`~model_loader.sources.s3.S3Source` for defaults."""

    max_concurrency: int = 16
    part_size: int = 8 * MiB
    multipart_threshold: int = 16 * MiB
    range_split: RangeSplit = "auto"
    verify_checksums: bool = True
    request_attempts: int = 5
    request_backoff: float = 0.1


class _Aborted(Exception):
    """The fetch, or this segment's file, failed elsewhere: stop quietly."""


class _Job:
    def __init__(
        self,
        runner: Runner,
        client: S3Client,
        bucket: str,
        specs: Sequence[ObjectSpec],
        dest: Path,
        opts: TransferOptions,
        uri: str,
        deadline: Deadline,
        ctx: FetchContext,
    ) -> None:
        self.runner = runner
        self.client = client
        self.bucket = bucket
        self.dest = dest
        self.opts = opts
        self.uri = uri
        self.deadline = deadline
        self.ctx = ctx
        self.planner = Planner(runner, client, bucket, uri, deadline, enabled=opts.verify_checksums)
        lock = threading.Lock()
        self.cond = threading.Condition(lock)  # scheduling: idle workers wait here
        self.hash_cond = threading.Condition(lock)  # the hasher waits here for written bytes
        self.workers_done = False
        self.error: BaseException | None = None  # fatal: every transfer stops
        self.failures: list[ModelLoaderError] = []  # files given up on; the others go on
        self.results: list[FileEntry] = []
        self.files = [self._state(s) for s in sorted(specs, key=lambda s: -s.size)]
        self.big = [f for f in self.files if f.big]
        self.queue: deque[Segment] = deque(f.segments[0] for f in self.files)  # largest first
        self.delayed: list[Segment] = []  # re-issues waiting for their backoff
        self.scopes: list[Any] = []  # the workers' request scopes, cut when the fetch fails

    def _state(self, spec: ObjectSpec) -> FileState:
        big = spec.size >= self.opts.multipart_threshold
        prefix = self.ctx.partial.get(spec.path, 0) if big else 0
        if prefix > 0:  # an earlier attempt's journalled prefix: continue there, if the bytes are there
            prefix = existing_prefix(self.dest / spec.path, min(prefix, spec.size))
            if prefix > 0:
                logger.debug("%s: resuming at byte %d of %d", spec.key, prefix, spec.size)
        return FileState(spec, big, prefix)

    # -- scheduling -------------------------------------------------------------------

    def workers(self) -> int:
        parallel = len(self.queue)
        if self.opts.range_split != "off":
            parallel += sum(f.spec.size // self.opts.part_size for f in self.big)
        return max(1, min(self.opts.max_concurrency, parallel))

    def next_work(self) -> Segment | None:
        with self.cond:
            while True:
                if self.error is not None:
                    return None
                if self.queue:
                    seg = self.queue.popleft()
                    if seg.live():
                        return seg
                    continue
                now = time.monotonic()
                due = [s for s in self.delayed if s.ready_at <= now]
                if due:
                    seg = min(due, key=lambda s: s.ready_at)
                    self.delayed.remove(seg)
                    if seg.live():
                        return seg
                    continue
                stolen, may_later = self._steal() if self.opts.range_split != "off" else (None, False)
                if stolen is not None:
                    return stolen
                waits = [s.ready_at - now for s in self.delayed if not s.file.failed]
                if may_later:
                    waits.append(_IDLE_POLL)
                if not waits and any(not f.finished and not f.failed for f in self.big):
                    waits.append(_HASHER_WAIT)  # its check may fail: it is then downloaded again
                if not waits:
                    return None
                if self.deadline.expired():
                    self.error = self.deadline.error(f"fetching {self.uri}", scheme="s3", ref=self.uri)
                    self.cond.notify_all()
                    self.hash_cond.notify_all()
                    return None
                self.cond.wait(min(min(waits), self.deadline.remaining()))

    def _steal(self) -> tuple[Segment | None, bool]:
        """Split the streaming segment with the most time left; ``(new segment, worth waiting)``."""
        now = time.monotonic()
        best: tuple[float, Segment] | None = None
        may_later = False
        min_left = 2 * self.opts.part_size
        sample = min(_MIN_RATE_SAMPLE, self.opts.part_size)
        for big in self.big:
            if big.failed or big.finished:
                continue
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
        mid = seg.reserved + (seg.end - seg.reserved) // 2
        new = Segment(big, mid, seg.end)
        seg.end = mid
        big.segments.insert(big.segments.index(seg) + 1, new)
        big.splits += 1
        return new, True

    def _stop_all(self, err: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = err
            self.cond.notify_all()
            self.hash_cond.notify_all()
            scopes = list(self.scopes)
        for scope in scopes:  # a transfer blocked on a slow store would otherwise hold the fetch
            self.runner.guard.cancel(scope)

    def _failed(self, seg: Segment, exc: BaseException, what: str) -> None:
        """Re-issue ``seg`` later, give its file up, or stop everything, as the error deserves."""
        if not isinstance(exc, Exception):
            self._stop_all(exc)
            return
        if isinstance(exc, Mismatch):
            exc = IntegrityError(str(exc))
        err = exc if isinstance(exc, ModelLoaderError) else error_for(exc, what, self.uri, self.deadline)
        f = seg.file
        with self.cond:
            if seg not in f.segments:
                return  # the file is being downloaded again from byte 0: this error is of bytes dropped
        if isinstance(err, IntegrityError) and not f.big:  # a large file's check is the hasher's
            self._check_failed(f, err, what)
            return
        if not reissuable(err):
            self._stop_all(err)
            return
        delay = backoff(self.opts.request_backoff, seg.attempts)
        with self.cond:
            if (
                seg.attempts < self.opts.request_attempts
                and delay < self.deadline.remaining()
                and self.runner.quota.take()
            ):
                logger.warning(
                    "%s failed (attempt %d/%d): %s; resuming at byte %d in %.2fs",
                    what,
                    seg.attempts,
                    self.opts.request_attempts,
                    err,
                    seg.written,
                    delay,
                )
                seg.attempts += 1
                seg.ready_at = time.monotonic() + delay
                self.delayed.append(seg)
                self.cond.notify()
                return
            self._give_up(f, err)

    def _check_failed(self, f: FileState, err: IntegrityError, what: str) -> None:
        """``f``'s bytes do not match its check: download it again from byte 0, or fail the fetch.

        Bytes altered in flight (a bad hop, a faulty proxy) are far likelier than an object
        whose stored bytes do not match what the store says, so a mismatch costs one of
        the file's ``request_attempts`` (and a token of the retry quota), as a failed
        request does; the bytes already written, a resumed prefix included, are all
        written again. When none is left it is the fetch's :class:`IntegrityError`.
        Only for a file no other thread is writing or hashing.
        """
        with self.cond:
            if self.error is not None:
                return
            used = f.attempts()
            delay = backoff(self.opts.request_backoff, used)
            if used < self.opts.request_attempts and delay < self.deadline.remaining() and self.runner.quota.take():
                logger.warning(
                    "%s: %s; downloading the file again from byte 0 in %.2fs (attempt %d/%d)",
                    what,
                    err,
                    delay,
                    used + 1,
                    self.opts.request_attempts,
                )
                seg = f.restart(used + 1)
                seg.ready_at = time.monotonic() + delay
                self.delayed.append(seg)
                self.cond.notify_all()
                return
        if f.downloads > 1:
            err = IntegrityError(f"{err} (in each of {f.downloads} downloads)")
        self._stop_all(err)

    def _give_up(self, f: FileState, err: ModelLoaderError) -> None:
        """Give up ``f`` alone (lock held): the other files go on, the fetch fails at the end."""
        if not f.failed:
            f.failed = True
            self.failures.append(err)
            logger.warning("giving up %s for this attempt: %s", f.spec.key, err)
        self.cond.notify_all()
        self.hash_cond.notify_all()

    # -- running ----------------------------------------------------------------------

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
            self._stop_all(SourceError(f"cannot start download threads: {exc}", scheme="s3", ref=self.uri))
        finally:
            for thread in started:
                thread.join()
            with self.cond:
                self.workers_done = True
                self.hash_cond.notify_all()
            if hasher is not None:
                hasher.join()
            for f in self.big:
                if not f.finished and f.fd >= 0:  # written, if not all hashed: the next attempt continues there
                    self._report(f, f.frontier(), last=True)
            for f in self.files:
                self._close(f)
        if self.error is not None:
            raise self.error
        if self.failures:
            done = sum(f.finished for f in self.files)
            logger.warning(
                "%s: %d of %d files failed, %d completed and kept", self.uri, len(self.failures), len(self.files), done
            )
            raise self.failures[0]
        unfinished = [f.spec.path for f in self.files if not f.finished]
        if unfinished:  # every byte was written and hashed, or a worker would have failed
            raise SourceUnavailableError(f"incomplete download of {unfinished}", scheme="s3", ref=self.uri)
        return self.results

    def _worker(self) -> None:
        with self.runner.guard.scope(self.deadline) as scope:
            with self.cond:
                self.scopes.append(scope)
                stopped = self.error is not None
            if stopped:
                self.runner.guard.cancel(scope)
            while (seg := self.next_work()) is not None:
                what = f"GET s3://{self.bucket}/{seg.file.spec.key}"
                try:
                    self._transfer(seg, what)
                except _Aborted:
                    continue
                except BaseException as exc:
                    self._failed(seg, exc, what)
                else:
                    self.runner.quota.earn()

    # -- transfers --------------------------------------------------------------------

    def _transfer(self, seg: Segment, what: str) -> None:
        f = seg.file
        spec = f.spec
        self.deadline.check(what, scheme="s3", ref=self.uri)
        if f.big or spec.multipart:
            with f.prepare_lock:
                if f.verifier is None:
                    f.verifier = self.planner.from_head(spec, what)
                if f.big and f.fd < 0:
                    self._open(f)  # preallocated: a full disk fails before the download
                    with self.cond:
                        self.hash_cond.notify()  # a resumed prefix can be hashed already
        with self.cond:
            start, end = seg.written, seg.end
            seg.reserved, seg.requested_end = start, end
        if start >= end and (f.big or start > 0):  # nothing left to read (a retry after the last byte)
            if not f.big:
                self._finish(f, what)
            return
        whole = (start, end) == (0, spec.size)
        extra: dict[str, str] = {} if whole else {"Range": f"bytes={start}-{end - 1}"}
        if whole and f.verifier is None and self.opts.verify_checksums:
            extra["ChecksumMode"] = "ENABLED"  # a single-part object: its checksum comes with the body
        t0 = time.monotonic()
        response = self.client.get_object(Bucket=self.bucket, Key=spec.key, **spec.pin(), **extra)  # type: ignore[arg-type]
        body = response["Body"]
        try:
            self._check_response(spec, response, start, end, whole, what)
            if f.verifier is None:
                f.verifier = self.planner.from_headers(spec, response, what)
            if f.fd < 0:
                self._open(f)
            now = time.monotonic()
            with self.cond:
                f.ttfb = now - t0 if f.ttfb is None else min(f.ttfb, now - t0)
                seg.started, seg.t_first, seg.rate_base = True, now, seg.written
            self._stream(seg, body, what)
        finally:
            body.close()
        if not f.big:
            self._finish(f, what)

    def _check_response(self, spec: ObjectSpec, response: Any, start: int, end: int, whole: bool, what: str) -> None:
        etag = etag_of(response.get("ETag"), what)
        if spec.etag and etag != spec.etag:
            raise StaleResolutionError(
                f"{what}: ETag {etag} is not the resolved {spec.etag} (the store may ignore If-Match)",
                scheme="s3",
                ref=self.uri,
            )
        length = integer(response.get("ContentLength"), what, "Content-Length")
        if not whole:
            first, last, total = content_range(response.get("ContentRange"), what)
            if (first, last) != (start, end - 1) or total not in (None, spec.size):
                raise InvalidResponseError(
                    f"{what}: asked for bytes {start}-{end - 1}/{spec.size}, got {first}-{last}/{total}",
                    scheme="s3",
                    ref=self.uri,
                )
        if length != end - start:
            raise InvalidResponseError(
                f"{what}: Content-Length {length}, expected {end - start}", scheme="s3", ref=self.uri
            )

    def _stream(self, seg: Segment, body: Any, what: str) -> None:
        f = seg.file
        progress = self.ctx.progress
        while True:
            with self.cond:
                if self.error is not None or f.failed:
                    raise _Aborted
                want = min(_STREAM_READ, seg.end - seg.reserved)
            if want <= 0:
                break
            self.deadline.check(what, scheme="s3", ref=self.uri)  # the watchdog's backstop
            chunk = body.read(want)
            if not chunk:
                raise SourceUnavailableError(
                    f"{what}: the body ended at byte {seg.written} of {seg.requested_end}", scheme="s3", ref=self.uri
                )
            with self.cond:
                pos = seg.reserved
                n = min(len(chunk), seg.end - pos)
                seg.reserved = pos + n
            data = memoryview(chunk)[:n]
            if not f.big:  # one segment, in order: hash it here
                f.sha.update(data)
                assert f.verifier is not None
                f.verifier.update(data)
            self._pwrite(f, data, pos)
            with self.cond:
                seg.written = pos + n
                if f.big:
                    self.hash_cond.notify()
            progress(n)
        if seg.end == seg.requested_end and body.read(1):  # drain to EOF: frees the connection
            raise InvalidResponseError(f"{what}: the body is longer than requested", scheme="s3", ref=self.uri)
        with self.cond:
            self.cond.notify_all()

    # -- disk -------------------------------------------------------------------------

    def _open(self, f: FileState) -> None:
        f.fd = open_file(self.dest / f.spec.path, f.spec.size if f.big else None, keep=f.resumed > 0)

    def _pwrite(self, f: FileState, data: memoryview, pos: int) -> None:
        pwrite_all(f.fd, data, pos, self.dest / f.spec.path)

    def _pread(self, f: FileState, n: int, pos: int) -> bytes:
        return pread(f.fd, n, pos, self.dest / f.spec.path)

    def _close(self, f: FileState) -> None:
        if f.fd >= 0:
            os.close(f.fd)
            f.fd = -1

    # -- completing files ---------------------------------------------------------------

    def _finish(self, f: FileState, what: str) -> None:
        assert f.verifier is not None
        label = self.planner.result(f.spec, f.verifier, f.sha.digest(), lambda pos, n: self._pread(f, n, pos), what)
        with self.cond:
            self._close(f)  # durability is the cache's job: it syncs the staging tree once
            entry = FileEntry(f.spec.path, f.spec.size, f.sha.hexdigest(), verified=label)
            self.results.append(entry)
            f.finished = True
            self.cond.notify_all()  # idle workers wait for large files' checks
        self.ctx.file_done(entry)
        if f.splits:
            logger.debug("%s: fetched in %d ranged parts", what, f.splits + 1)

    def _hasher(self) -> None:
        """Hash each large file's contiguous written prefix, in order, reading it back.

        Its own thread, so the workers keep streaming while it hashes (SHA-256 runs at
        about 1.5 GB/s here, MD5 at 0.6 GB/s, and both release the GIL).
        """
        buf = bytearray(_HASH_BUFFER)
        view = memoryview(buf)
        with self.runner.guard.scope(self.deadline):  # a re-check may ask for the part layout
            while True:
                with self.cond:
                    while True:
                        if self.error is not None:
                            return
                        live = [f for f in self.big if not f.finished and not f.failed]
                        todo = [
                            (f, f.hashed_to, min(f.frontier(), f.hashed_to + _HASH_STEP))
                            for f in live
                            if f.verifier is not None and f.fd >= 0
                        ]
                        todo = [t for t in todo if t[2] > t[1]]
                        if todo or self.workers_done or not live:
                            break
                        self.hash_cond.wait()
                if not todo:
                    return
                for f, start, stop in todo:
                    what = f"GET s3://{self.bucket}/{f.spec.key}"
                    try:
                        self._hash_range(f, view, start, stop)
                        with self.cond:
                            f.hashed_to = stop
                        if stop == f.spec.size:
                            self._finish(f, what)
                        else:
                            self._report(f, stop)
                    except BaseException as exc:
                        err = (
                            exc if isinstance(exc, ModelLoaderError) else error_for(exc, what, self.uri, self.deadline)
                        )
                        if isinstance(err, IntegrityError) and stop == f.spec.size:  # every byte written, none in use
                            self._check_failed(f, err, what)
                        elif reissuable(err):
                            with self.cond:
                                self._give_up(f, err)
                        else:
                            self._stop_all(err)

    def _report(self, f: FileState, prefix: int, *, last: bool = False) -> None:
        """Tell the cache the first ``prefix`` bytes of ``f`` are written, if worth a journal line.

        At most every :data:`_REPORT_INTERVAL` seconds per file and between
        :data:`_REPORT_MIN` and :data:`_REPORT_MAX` bytes apart, so a killed process loses
        about a tenth of a second of the file; ``last`` (the attempt is over) reports
        whatever is new.
        """
        if prefix >= f.spec.size:
            return  # file_done follows, or the file failed its check: either way nothing to resume
        now = time.monotonic()
        ahead = prefix - f.reported
        if ahead <= 0 or not (
            last or (ahead >= _REPORT_MIN and (ahead >= _REPORT_MAX or now - f.reported_at >= _REPORT_INTERVAL))
        ):
            return
        f.reported, f.reported_at = prefix, now
        try:
            self.ctx.file_progress(f.spec.path, prefix)
        except (OSError, ModelLoaderError) as exc:  # the download goes on; only its resumption is lost
            logger.warning("cannot record that %s has %d bytes written: %s", f.spec.path, prefix, exc)

    def _hash_range(self, f: FileState, view: memoryview, start: int, stop: int) -> None:
        assert f.verifier is not None
        pos = start
        while pos < stop:
            n = read_into(f.fd, view[: min(len(view), stop - pos)], pos, self.dest / f.spec.path)
            f.sha.update(view[:n])
            f.verifier.update(view[:n])
            pos += n


def download(
    runner: Runner,
    client: S3Client,
    bucket: str,
    specs: Sequence[ObjectSpec],
    dest: Path,
    opts: TransferOptions,
    uri: str,
    deadline: Deadline,
    ctx: FetchContext,
) -> list[FileEntry]:
    """Download ``specs`` into ``dest`` (parents must exist) and return what was written.

    Each file is reported to ``ctx.file_done`` once written and verified, and its bytes to
    ``ctx.progress`` as they are written. A large file named in ``ctx.partial`` continues
    at its prefix (hashed again from disk with the rest); a large file's contiguous written
    prefix is reported to ``ctx.file_progress`` as it grows. A file whose bytes fail their
    check is downloaded again from byte 0, within its ``request_attempts``.

    Raises:
        SourceError: A mapped S3 error (a fatal one at once; else the first file given up,
            once the others are done).
        IntegrityError: The bytes do not match the object's checksum or ETag, in every
            download the file's attempts allowed.
        CacheError: The staging directory cannot be written (disk full).
    """
    return _Job(runner, client, bucket, specs, dest, opts, uri, deadline, ctx).run()
