"""Which end-to-end check each object of a fetch gets, and asking the store for what it needs.

:mod:`._s3_integrity` says what a response's headers allow; this module gets the rest
from the store: the object's HEAD (for large and multipart objects, whose GETs carry no
usable checksum header), the part layout (``HEAD ?partNumber=``), and, when a per-part
check fails under the assumed layout, every part's true size before the bytes are called
corrupt. Every request is pinned and runs through the source's :class:`Runner`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from model_loader._deadline import Deadline
from model_loader.errors import (
    IntegrityError,
    InvalidResponseError,
    SourceError,
    SourceUnavailableError,
    StaleResolutionError,
)
from model_loader.sources._s3_integrity import Layout, Mismatch, Verifier, choose, layout_from_head
from model_loader.sources._s3_listing import ObjectSpec, etag_of, integer
from model_loader.sources._s3_requests import Runner

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["Planner"]

logger = logging.getLogger(__name__)

_MAX_LAYOUT_HEADS = 64  # unequal parts asked for one by one up front (always, before calling bytes corrupt)
_READ_BACK = 1024 * 1024


class Planner:
    """Plans and completes the end-to-end checks of one fetch.

    Args:
        enabled: ``verify_checksums``; off, every file is ``verified=None`` (sizes only).
    """

    def __init__(
        self, runner: Runner, client: S3Client, bucket: str, uri: str, deadline: Deadline, *, enabled: bool
    ) -> None:
        self.runner = runner
        self.client = client
        self.bucket = bucket
        self.uri = uri
        self.deadline = deadline
        self.enabled = enabled

    def from_head(self, spec: ObjectSpec, what: str) -> Verifier:
        """Plan from a pinned HEAD (large or multipart objects); a changed object is stale."""
        if not self.enabled:
            return Verifier(None)
        head_what = f"HEAD s3://{self.bucket}/{spec.key}"
        head = self.runner.call(
            self.deadline,
            head_what,
            self.uri,
            self.client.head_object,
            Bucket=self.bucket,
            Key=spec.key,
            ChecksumMode="ENABLED",
            **spec.pin(),
        )
        if spec.etag and etag_of(head.get("ETag"), head_what) != spec.etag:
            raise StaleResolutionError(f"{head_what}: the object changed", scheme="s3", ref=self.uri)
        if integer(head.get("ContentLength"), head_what, "Content-Length") != spec.size:
            raise StaleResolutionError(f"{head_what}: the object's size changed", scheme="s3", ref=self.uri)
        return self.from_headers(spec, head, what)

    def from_headers(self, spec: ObjectSpec, headers: Any, what: str) -> Verifier:
        """The cheapest check ``headers`` allow (asking for the part layout if that check needs one)."""
        if not self.enabled:
            return Verifier(None)
        layout: Layout | None = None
        asked = False
        for choice in choose(headers, spec.etag or headers.get("ETag"), what):
            if not choice.parts:
                return Verifier(choice)
            if not asked:
                layout, asked = self._layout(spec, choice.parts, what), True
            if layout is not None and len(layout.sizes) == choice.parts:
                return Verifier(choice, layout)
        logger.debug("%s: no end-to-end check available (size only)", what)
        return Verifier(None)

    def result(
        self, spec: ObjectSpec, verifier: Verifier, sha256: bytes, read: Callable[[int, int], bytes], what: str
    ) -> str | None:
        """``FileEntry.verified`` for a complete file; re-checked from disk with the true part sizes if need be.

        Args:
            read: ``read(pos, n)``: bytes of the written file.

        Raises:
            IntegrityError: The bytes match no candidate of the check.
        """
        try:
            return verifier.result(sha256, what)
        except Mismatch as exc:
            if not exc.relayout or verifier.layout is None:
                raise IntegrityError(str(exc)) from None
            layout = self._true_layout(spec, len(verifier.layout.sizes), what)
            if layout.sizes == verifier.layout.sizes:
                raise IntegrityError(str(exc)) from None
        again = verifier.again(layout)  # parts of unequal sizes: hash the file again with them
        pos = 0
        while pos < spec.size:
            data = read(pos, min(_READ_BACK, spec.size - pos))
            again.update(data)
            pos += len(data)
        try:
            return again.result(sha256, what)
        except Mismatch as exc:
            raise IntegrityError(str(exc)) from None

    def _layout(self, spec: ObjectSpec, count: int, what: str) -> Layout | None:
        """Equal parts but the last, from ``HEAD ?partNumber=1``; else every part's size (few parts)."""
        head = self._part_head(spec, 1)
        if head is None:
            return None
        layout = layout_from_head(head, spec.size, count)
        if layout is None and head.get("PartsCount") == count and count <= _MAX_LAYOUT_HEADS:
            layout = self._true_layout(spec, count, what, first=head)
        return layout

    def _part_head(self, spec: ObjectSpec, part: int) -> Any:
        # pinned by VersionId only: some stores (moto) compare If-Match with the part's own ETag; an
        # object replaced since resolve is caught by the pinned GETs
        pin = {"VersionId": spec.version_id} if spec.version_id else {}
        try:
            return self.runner.call(
                self.deadline,
                f"HEAD s3://{self.bucket}/{spec.key}?partNumber={part}",
                self.uri,
                self.client.head_object,
                Bucket=self.bucket,
                Key=spec.key,
                PartNumber=part,
                **pin,
            )
        except (SourceUnavailableError, StaleResolutionError):
            raise
        except SourceError as exc:  # a store without ?partNumber: the check cannot be made
            logger.debug("%s: no part layout: %s", spec.key, exc)
            return None

    def _true_layout(self, spec: ObjectSpec, count: int, what: str, *, first: Any = None) -> Layout:
        sizes = []
        for part in range(1, count + 1):
            head = first if part == 1 and first is not None else self._part_head(spec, part)
            size = None if head is None else head.get("ContentLength")
            sizes.append(integer(size, what, f"the size of part {part}", low=1))
        if sum(sizes) != spec.size:
            raise InvalidResponseError(
                f"{what}: the parts' sizes do not add up to the object's", scheme="s3", ref=self.uri
            )
        return Layout(tuple(sizes), True)
