"""S3 answers parsed and bounded: listing pages, HEAD and GET responses.

botocore turns XML and headers into dicts but checks neither presence nor range; a
store (or a proxy) may send anything. Every field used is read here, typed and bounded;
anything missing or out of range is :class:`~model_loader.errors.InvalidResponseError`
(a transient, degradable failure), never a ``KeyError`` or a wrong pin.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model_loader.errors import InvalidResponseError

__all__ = [
    "MAX_OBJECTS",
    "MAX_SIZE",
    "ObjectSpec",
    "S3Object",
    "content_range",
    "etag_of",
    "integer",
    "list_page",
    "object_from_head",
    "versions_page",
]

MAX_OBJECTS = 100_000
"""Objects one model may have; a longer listing is refused (a prefix that is not a model)."""
MAX_SIZE = 50 * 1024**4
"""Largest object size accepted (S3's limit is 50 TB)."""
_MAX_KEY = 1024  # bytes, S3's limit
_MAX_TOKEN = 4096
_ETAG = re.compile(r'^(W/)?"?[\x21\x23-\x7e]{1,200}"?$')  # entity-tag characters: no space, no control
_RANGE = re.compile(r"^bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)$")


@dataclass(frozen=True, slots=True)
class S3Object:
    key: str
    size: int
    etag: str
    version_id: str | None = None


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


def _bad(what: str, detail: str) -> InvalidResponseError:
    return InvalidResponseError(f"{what}: malformed response: {detail}", scheme="s3")


def integer(value: Any, what: str, field: str, *, low: int = 0, high: int = MAX_SIZE) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(what, f"{field} is {value!r}, not an integer in [{low}, {high}]")
    return value


def _text(value: Any, what: str, field: str, limit: int) -> str:
    if not isinstance(value, str) or not value or len(value.encode("utf-8", "surrogatepass")) > limit:
        raise _bad(what, f"{field} is missing, empty or longer than {limit} bytes")
    return value


def etag_of(value: Any, what: str) -> str:
    """An ETag as sent (quotes kept): printable, no spaces, bounded."""
    if not isinstance(value, str) or not _ETAG.match(value):
        raise _bad(what, f"ETag {str(value)[:80]!r} is missing or not an entity tag")
    return value


def _version(value: Any, what: str) -> str | None:
    if value is None or value == "null":
        return None
    return _text(value, what, "VersionId", 1024)


def _entry(item: Any, what: str) -> S3Object:
    if not isinstance(item, Mapping):
        raise _bad(what, "a listing entry is not a record")
    key, size, etag = item.get("Key"), item.get("Size"), item.get("ETag")
    if (  # the common case, checked cheaply: a warm start lists every key
        type(key) is str
        and 0 < len(key) <= _MAX_KEY // 4
        and type(size) is int
        and 0 <= size <= MAX_SIZE
        and type(etag) is str
        and _ETAG.match(etag)
    ):
        return S3Object(key, size, etag)
    key = _text(key, what, "Key", _MAX_KEY)
    return S3Object(key, integer(size, what, f"Size of {key!r}"), etag_of(etag, what))


def _truncation(page: Mapping[str, Any], what: str, token_field: str) -> str | None:
    truncated = page.get("IsTruncated", False)
    if not isinstance(truncated, bool):
        raise _bad(what, f"IsTruncated is {truncated!r}")
    if not truncated:
        return None
    return _text(page.get(token_field), what, token_field, _MAX_TOKEN)


def list_page(page: Mapping[str, Any], what: str) -> tuple[list[S3Object], str | None]:
    """The objects of one ``ListObjectsV2`` page and the continuation token (``None``: last page)."""
    contents = page.get("Contents", [])
    if not isinstance(contents, list) or len(contents) > 1000:
        raise _bad(what, "Contents is not a list of at most 1000 entries")
    return [_entry(item, what) for item in contents], _truncation(page, what, "NextContinuationToken")


def versions_page(page: Mapping[str, Any], what: str) -> tuple[list[S3Object], tuple[str, str | None] | None]:
    """The latest versions on one ``ListObjectVersions`` page and the next (key, version) markers."""
    versions = page.get("Versions", [])
    if not isinstance(versions, list) or len(versions) > 1000:
        raise _bad(what, "Versions is not a list of at most 1000 entries")
    out = []
    for item in versions:
        obj = _entry(item, what)
        latest = item.get("IsLatest")
        if not isinstance(latest, bool):
            raise _bad(what, f"IsLatest of {obj.key!r} is {latest!r}")
        if latest:
            out.append(S3Object(obj.key, obj.size, obj.etag, _version(item.get("VersionId"), what)))
    key_marker = _truncation(page, what, "NextKeyMarker")
    if key_marker is None:
        return out, None
    marker = page.get("NextVersionIdMarker")
    return out, (key_marker, None if marker is None else _text(marker, what, "NextVersionIdMarker", _MAX_TOKEN))


def object_from_head(head: Mapping[str, Any], key: str, what: str, version_id: str | None = None) -> S3Object:
    size = integer(head.get("ContentLength"), what, "Content-Length")
    vid = _version(head.get("VersionId"), what) or version_id
    return S3Object(key, size, etag_of(head.get("ETag"), what), vid)


def content_range(value: Any, what: str) -> tuple[int, int, int | None]:
    """``(first, last, total)`` of a ``Content-Range: bytes a-b/total`` header."""
    match = _RANGE.match(value) if isinstance(value, str) else None
    if match is None:
        raise _bad(what, f"Content-Range is {str(value)[:80]!r}")
    first, last, total = int(match.group(1)), int(match.group(2)), match.group(3)
    return first, last, None if total == "*" else int(total)
