"""The state of one object's download: its segments, its contiguous written prefix, where it resumes.

A file is written by *segments* that partition ``[0, size)``, each one GET of a byte
range; a worker may split a streaming segment and fetch its tail. What is on disk
contiguously from byte 0 (:meth:`FileState.frontier`) is what the hasher may read back
and what the cache may journal as the file's prefix. A file can start part-way, at a
prefix an earlier attempt left (:class:`FileState` ``resume_at``: those bytes are read
back and hashed like any other), and can be started again from byte 0 when its bytes
fail their end-to-end check (:meth:`FileState.restart`).

Every method that reads or changes segments is called with the job's lock held.
"""

from __future__ import annotations

import hashlib
import threading

from model_loader.sources._s3_integrity import Verifier
from model_loader.sources._s3_listing import ObjectSpec

__all__ = ["FileState", "Segment"]


class FileState:
    """One object being downloaded into one file.

    Args:
        spec: The object.
        big: Preallocated, splittable, hashed by the hasher thread (``>= multipart_threshold``).
        resume_at: Bytes ``[0, resume_at)`` are already in the file (an earlier attempt's
            journalled prefix); the download starts there. Only for ``big`` files.
    """

    __slots__ = (
        "big",
        "downloads",
        "failed",
        "fd",
        "finished",
        "hashed_to",
        "prepare_lock",
        "reported",
        "reported_at",
        "resumed",
        "segments",
        "sha",
        "spec",
        "splits",
        "ttfb",
        "verifier",
    )

    def __init__(self, spec: ObjectSpec, big: bool, resume_at: int = 0) -> None:
        self.spec = spec
        self.big = big
        self.fd = -1  # opened by the first request that reaches the body (or, resuming, its HEAD)
        self.sha = hashlib.sha256()
        self.verifier: Verifier | None = None  # planned from a HEAD or the first response
        self.hashed_to = 0
        self.finished = False
        self.failed = False
        self.ttfb: float | None = None
        self.splits = 0
        self.downloads = 1  # times the file was started from byte 0 (or from its resumed prefix)
        self.prepare_lock = threading.Lock()  # one HEAD and one open, whichever segment comes first
        self.resumed = resume_at if big else 0
        self.reported = self.resumed  # the prefix last reported to FetchContext.file_progress
        self.reported_at = 0.0
        first = Segment(self, 0, spec.size)
        first.written = first.reserved = first.rate_base = self.resumed
        self.segments = [first]

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

    def written(self) -> bool:
        """Every byte is on disk: no segment has anything left to write."""
        return all(seg.written >= seg.end for seg in self.segments)

    def attempts(self) -> int:
        """Requests spent on the file's current download, by the segment that spent the most."""
        return max(seg.attempts for seg in self.segments)

    def restart(self, attempts: int) -> Segment:
        """Forget every byte (the whole file is written again) and return its one new segment.

        The check is planned again too (a HEAD, or the next response's headers): what was
        received with the bad bytes is not trusted either. ``fd`` stays open: every byte
        of it is overwritten.
        """
        self.sha = hashlib.sha256()
        self.verifier = None
        self.hashed_to = 0
        self.splits = 0
        self.resumed = 0
        self.downloads += 1
        seg = Segment(self, 0, self.spec.size)
        seg.attempts = attempts
        self.segments = [seg]
        return seg


class Segment:
    """One GET of ``[start, end)`` of a file; ``written`` is how far it got on disk."""

    __slots__ = (
        "attempts",
        "end",
        "file",
        "rate_base",
        "ready_at",
        "requested_end",
        "reserved",
        "start",
        "started",
        "t_first",
        "written",
    )

    def __init__(self, file: FileState, start: int, end: int) -> None:
        self.file = file
        self.start = start
        self.end = end  # exclusive; lowered when another worker steals the tail
        self.requested_end = end
        self.reserved = start  # bytes claimed for writing
        self.written = start  # bytes on disk
        self.started = False  # a response is streaming
        self.t_first = 0.0
        self.rate_base = start  # written when t_first was taken
        self.attempts = 1
        self.ready_at = 0.0  # a re-issue waits for its backoff

    def live(self) -> bool:
        """Still wanted: its file neither failed nor was started again since."""
        return not self.file.failed and self in self.file.segments

    def rate(self, now: float, sample: int) -> float | None:
        streamed = self.written - self.rate_base
        if not self.started or streamed < sample or now <= self.t_first:
            return None
        return streamed / (now - self.t_first)
