"""What each fsspec backend tells about an object, parsed and bounded: its size, a pin
for fetching exactly that content, and the checksums it publishes.

One :class:`Dialect` per family of protocols:

============  ==================================  ========================  =================
protocols     pin                                 checksum checked          pinned read
============  ==================================  ========================  =================
gs, gcs       object generation                   MD5 (``md5Hash``)         ``generation=``
az, abfs(s)   ``version_id`` (version-aware), or  MD5 (``content_md5``)     ``?versionid=``;
              the ETag                                                      ETag re-checked
http(s)       strong ETag, else Last-Modified,    ``Content-MD5``,          ``If-Match`` /
              else the size                       ``Digest`` (sha-256, md5) ``If-Unmodified-Since``
hf            the commit the revision points at   SHA-256 (LFS), git blob   the commit, in
                                                  SHA-1 (other files)       the path
others        ETag if listed, else a hash of      none                      re-checked after
              (path, size, modification times)                              reading
============  ==================================  ========================  =================

Everything read from a listing or an info dict goes through :func:`parse_entry`:
anything malformed or out of bounds is an ``InvalidResponseError``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model_loader.errors import InvalidResponseError, SourceError

__all__ = [
    "MAX_NAME",
    "MAX_SIZE",
    "Dialect",
    "Pin",
    "Remote",
    "dialect_for",
    "parse_entry",
]

MAX_SIZE = 50 * 1024**4
"""Largest object accepted (GCS, Azure and S3 all stop at about 5 TiB; this only bounds garbage)."""
MAX_NAME = 4096
_MAX_TOKEN = 1024  # an ETag, a version id, a Last-Modified date
_PRINTABLE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DIGITS = re.compile(r"^[0-9]{1,32}$")
_STAT_FIELDS = ("mtime", "created", "ctime", "LastModified", "last_modified", "modified", "time", "ino")


@dataclass(frozen=True, slots=True)
class Pin:
    """How one object's content is pinned and checked.

    Attributes:
        kind: ``"generation"``, ``"version_id"``, ``"etag"``, ``"last-modified"``,
            ``"commit"``, ``"stat"`` (a hash of path, size and modification times) or
            ``"size"`` (nothing better: only the size).
        value: The generation, version id, ETag, date, commit or stat hash.
        md5: Hex MD5 the backend publishes for the content.
        sha256: Hex SHA-256 the backend publishes (Hugging Face LFS, HTTP ``Digest``).
        git_sha1: Hex git blob id (Hugging Face files stored in git, not LFS).
        etag: The ETag as well, where the pin is another kind.
        name: The backend's name of the object, when it cannot be derived from the
            relative path (an HTTP link encoded differently than ``quote`` would).
    """

    kind: str
    value: str
    md5: str | None = None
    sha256: str | None = None
    git_sha1: str | None = None
    etag: str | None = None
    name: str | None = None

    def encode(self) -> str:
        """The pin as :attr:`FileEntry.pin`: compact JSON (dates and ETags may hold spaces)."""
        fields = {"k": self.kind, "v": self.value, "md5": self.md5, "sha256": self.sha256}
        fields.update({"git": self.git_sha1, "etag": self.etag, "n": self.name})
        return json.dumps({k: v for k, v in fields.items() if v is not None}, separators=(",", ":"), sort_keys=True)

    @classmethod
    def decode(cls, text: str | None) -> Pin:
        """Parse :meth:`encode`'s output (a ``ResolvedModel`` this source issued)."""
        try:
            data = json.loads(text or "")
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                raise ValueError("not a flat object of strings")
            return cls(
                data["k"],
                data["v"],
                data.get("md5"),
                data.get("sha256"),
                data.get("git"),
                data.get("etag"),
                data.get("n"),
            )
        except (ValueError, KeyError) as exc:
            raise SourceError(f"a file's pin {text!r} was not issued by this source: {exc}") from exc

    @property
    def checksum(self) -> str | None:
        """What the bytes will be checked against beyond their size (``FileEntry.verified``)."""
        if self.sha256:
            return "sha256"
        if self.md5:
            return "md5"
        if self.git_sha1:
            return "git-sha1"
        return None


@dataclass(frozen=True, slots=True)
class Remote:
    """One object as the backend described it (parsed)."""

    name: str
    size: int
    pin: Pin


class Dialect:
    """How one family of backends pins and checks objects (the generic one: see the table)."""

    family = "generic"
    immutable = False
    """A pin keeps the old bytes fetchable after the object is overwritten."""
    needs_info = False
    """A listing lacks what :meth:`pin` needs, so each file is asked for its info."""

    def pin(self, info: Mapping[str, Any], what: str) -> Pin:
        etag = _token(info.get("ETag", info.get("etag")), "ETag", what)
        if etag is not None:
            return Pin("etag", etag)
        return Pin("stat", _stat_hash(info, what))

    def read_path(self, name: str, pin: Pin) -> str:
        """The path to read ``pin``'s content from."""
        return name

    def read_kwargs(self, pin: Pin) -> dict[str, Any]:
        """Extra keyword arguments for the backend's read calls that pin the content."""
        return {}

    def pinned_read(self, pin: Pin) -> bool:
        """True when the read itself can only return the pinned content (no re-check needed)."""
        return False


class GcsDialect(Dialect):
    family = "gcs"

    def pin(self, info: Mapping[str, Any], what: str) -> Pin:
        generation = info.get("generation")
        if isinstance(generation, int) and not isinstance(generation, bool):
            generation = str(generation)
        if not isinstance(generation, str) or not _DIGITS.match(generation):
            raise InvalidResponseError(f"{what}: no valid object generation ({_short(generation)})")
        md5 = _b64_digest(info.get("md5Hash"), 16, "md5Hash", what)  # absent for composite objects
        return Pin("generation", generation, md5=md5, etag=_token(info.get("etag"), "etag", what))

    def read_kwargs(self, pin: Pin) -> dict[str, Any]:
        return {"generation": pin.value}

    def pinned_read(self, pin: Pin) -> bool:
        return True


class AzureDialect(Dialect):
    family = "azure"

    def pin(self, info: Mapping[str, Any], what: str) -> Pin:
        etag = _token(info.get("etag"), "etag", what)
        settings = info.get("content_settings")
        raw_md5 = _field(settings, "content_md5") if settings is not None else None
        md5 = _raw_digest(raw_md5, 16, "content_md5", what)
        version_id = _token(info.get("version_id"), "version_id", what)
        if version_id is not None:
            return Pin("version_id", version_id, md5=md5, etag=etag)
        if etag is None:
            raise InvalidResponseError(f"{what}: neither a version_id nor an etag")
        return Pin("etag", etag, md5=md5)

    def read_path(self, name: str, pin: Pin) -> str:
        return f"{name}?versionid={pin.value}" if pin.kind == "version_id" else name

    def pinned_read(self, pin: Pin) -> bool:
        return pin.kind == "version_id"


class HttpDialect(Dialect):
    family = "http"
    needs_info = True  # an index page gives names only: sizes and ETags come from HEAD

    def pin(self, info: Mapping[str, Any], what: str) -> Pin:
        md5 = _b64_digest(info.get("Content-MD5"), 16, "Content-MD5", what)
        sha256 = None
        digest = info.get("Digest")
        if digest is not None:
            if not isinstance(digest, str) or len(digest) > _MAX_TOKEN:
                raise InvalidResponseError(f"{what}: malformed Digest header")
            for part in digest.split(","):
                algo, _, value = part.strip().partition("=")
                if algo.lower() == "sha-256":
                    sha256 = _b64_digest(value, 32, "Digest sha-256", what)
                elif algo.lower() == "md5" and md5 is None:
                    md5 = _b64_digest(value, 16, "Digest md5", what)
        etag = _token(info.get("ETag"), "ETag", what)
        if etag is not None and not etag.startswith("W/"):
            return Pin("etag", etag, md5=md5, sha256=sha256)
        modified = _token(info.get("Last-Modified"), "Last-Modified", what)
        if modified is not None:
            return Pin("last-modified", modified, md5=md5, sha256=sha256, etag=etag)
        return Pin("size", "", md5=md5, sha256=sha256, etag=etag)


class HfDialect(Dialect):
    family = "hf"
    immutable = True  # a commit's files never change

    def pin(self, info: Mapping[str, Any], what: str) -> Pin:
        lfs = info.get("lfs")
        sha256 = None
        if lfs is not None:
            raw = _field(lfs, "sha256")
            if not isinstance(raw, str) or not _HEX64.match(raw):
                raise InvalidResponseError(f"{what}: malformed LFS sha256 ({_short(raw)})")
            sha256 = raw
        blob = info.get("blob_id")
        git_sha1 = None
        if sha256 is None and blob is not None:
            if not isinstance(blob, str) or not _HEX40.match(blob):
                raise InvalidResponseError(f"{what}: malformed blob_id ({_short(blob)})")
            git_sha1 = blob
        # the commit is in the path (``repo@<sha>/file``); the source sets it on the pin
        return Pin("commit", "", sha256=sha256, git_sha1=git_sha1)

    def pinned_read(self, pin: Pin) -> bool:
        return True


_DIALECTS: dict[str, type[Dialect]] = {
    "gs": GcsDialect,
    "gcs": GcsDialect,
    "az": AzureDialect,
    "abfs": AzureDialect,
    "abfss": AzureDialect,
    "http": HttpDialect,
    "https": HttpDialect,
    "hf": HfDialect,
}


def dialect_for(protocols: tuple[str, ...]) -> Dialect:
    """The dialect of a filesystem serving ``protocols`` (the generic one when unknown)."""
    for protocol in protocols:
        cls = _DIALECTS.get(protocol)
        if cls is not None:
            return cls()
    return Dialect()


def parse_entry(entry: object, what: str) -> tuple[str, str, int | None, dict[str, Any]]:
    """``(name, type, size, entry)`` of one listing or info entry; ``type`` is ``"file"``,
    ``"directory"`` or ``"other"``; ``size`` is None when the backend does not say.

    Raises:
        InvalidResponseError: Not a mapping, no usable name, a size out of bounds.
    """
    if not isinstance(entry, Mapping):
        raise InvalidResponseError(f"{what}: a listing entry is a {type(entry).__name__}, not a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\0" in name:
        raise InvalidResponseError(f"{what}: a listing entry has no valid name ({_short(name)})")
    kind = entry.get("type")
    kind = kind if kind in ("file", "directory") else "other"
    size = entry.get("size")
    fields = dict(entry)
    if size is None:
        return name, kind, None, fields
    if isinstance(size, float) and size.is_integer():
        size = int(size)
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
        raise InvalidResponseError(f"{what}: {name!r} has an invalid size ({_short(size)})")
    return name, kind, size, fields


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field(holder: object, name: str) -> object:
    """``holder[name]`` for mappings, ``holder.name`` for SDK objects (azure's ContentSettings)."""
    if isinstance(holder, Mapping):
        return holder.get(name)
    return getattr(holder, name, None)


def _token(value: object, field: str, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > _MAX_TOKEN or not _PRINTABLE.match(value):
        raise InvalidResponseError(f"{what}: malformed {field} ({_short(value)})")
    return value


def _raw_digest(value: object, length: int, field: str, what: str) -> str | None:
    if value is None or (isinstance(value, (bytes, bytearray)) and not any(value)):
        return None  # azure returns an all-zero / empty content_md5 when none was stored
    if not isinstance(value, (bytes, bytearray)) or len(value) != length:
        raise InvalidResponseError(f"{what}: malformed {field} ({_short(value)})")
    return bytes(value).hex()


def _b64_digest(value: object, length: int, field: str, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 4 * length:
        raise InvalidResponseError(f"{what}: malformed {field} ({_short(value)})")
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidResponseError(f"{what}: malformed {field} ({_short(value)})") from exc
    return _raw_digest(raw, length, field, what)


def _stat_hash(info: Mapping[str, Any], what: str) -> str:
    """A hash of the name, size and whatever modification times the backend reports.

    Listings and info dicts may report the same time differently (a float in one, a
    ``datetime`` in the other): both become a POSIX timestamp first.
    """
    parts = [str(info.get("name")), str(info.get("size"))]
    for key in _STAT_FIELDS:
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, _dt.datetime):
            value = value.timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key}={float(value)!r}")
        elif isinstance(value, str) and len(value) <= _MAX_TOKEN:
            parts.append(f"{key}={value}")
        else:
            raise InvalidResponseError(f"{what}: malformed {key} ({_short(value)})")
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]
