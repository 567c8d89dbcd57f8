"""Value objects passed between the loader, the cache and the sources.

All are frozen, slotted dataclasses: hashable, cheap, safe to share across threads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

__all__ = [
    "FetchResult",
    "FileEntry",
    "LoadedModel",
    "Manifest",
    "ModelRef",
    "ResolvedModel",
    "SelectorKind",
    "Timings",
]

SelectorKind = Literal["none", "alias", "version", "stage", "latest", "logged_model", "version_id"]


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A parsed model reference.

    Attributes:
        scheme: ``"models"``, ``"s3"``, ``"file"`` or a plug-in's scheme.
        uri: The canonical URI; caches key last-known-good pointers on it.
        location: ``models``: the model name (or ``m-<id>``); ``s3``: ``bucket/key-or-prefix``;
            ``file``: the absolute directory path.
        selector: The alias, version number, stage, or S3 ``versionId``; ``None`` if absent.
        selector_kind: What ``selector`` is.
        params: Extra query parameters, sorted, as ``(key, value)`` pairs.
    """

    scheme: str
    uri: str
    location: str
    selector: str | None = None
    selector_kind: SelectorKind = "none"
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.uri

    @property
    def pinned(self) -> bool:
        """True when the reference itself names an immutable version."""
        return self.selector_kind in ("version", "logged_model", "version_id")


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a model.

    Attributes:
        path: Relative POSIX path inside the model directory (validated safe).
        size: Size in bytes.
        sha256: Hex SHA-256 of the content, when known.
        pin: A source-specific pin for fetching exactly this content (ETag, VersionId).
        verified: How the received bytes were checked against what the origin published,
            beyond their size: ``"sha256"`` (a SHA-256 known before the download),
            ``"md5"`` (S3 single-part ETag), ``"md5-parts"`` (S3 multipart ETag),
            ``"s3-crc32"``, ``"s3-crc32c"``, ``"s3-sha1"``, ``"s3-sha256"``,
            ``"s3-crc64nvme"`` (checksums S3 stores); ``None``: the size only.
    """

    path: str
    size: int
    sha256: str | None = None
    pin: str | None = None
    verified: str | None = None


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A reference resolved to one immutable version.

    Once issued, ``fetch`` of a ``ResolvedModel`` returns these bytes or raises
    :class:`~model_loader.errors.StaleResolutionError`; never other bytes.

    Attributes:
        ref: The reference that was resolved.
        source_id: The identity of the source that resolved it (no credentials).
        version: The immutable version: an MLflow version number, an S3 listing hash, a
            content hash. Caches key on ``(source_id, version)``.
        files: The files this version is expected to contain, when the source knows them
            before fetching (sizes always, hashes when known).
        metadata: Source-specific facts, e.g. the artifact location, as sorted pairs.
    """

    ref: ModelRef
    source_id: str
    version: str
    files: tuple[FileEntry, ...] | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def cache_key(self) -> str:
        """A filesystem-safe key derived from ``(source_id, version)``."""
        return hashlib.sha256(f"{self.source_id}\0{self.version}".encode()).hexdigest()[:32]

    @property
    def meta(self) -> dict[str, str]:
        """``metadata`` as a new dict."""
        return dict(self.metadata)

    @staticmethod
    def pack_metadata(values: Mapping[str, str | None]) -> tuple[tuple[str, str], ...]:
        """Sorted, hashable metadata pairs, dropping ``None`` values."""
        return tuple(sorted((k, v) for k, v in values.items() if v is not None))


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a fetch wrote: every file with its size and SHA-256."""

    files: tuple[FileEntry, ...]

    @classmethod
    def of(cls, entries: Iterable[FileEntry]) -> Manifest:
        """A manifest with entries sorted by path."""
        return cls(tuple(sorted(entries, key=lambda e: e.path)))

    @property
    def total_size(self) -> int:
        """Sum of the file sizes."""
        return sum(e.size for e in self.files)

    @property
    def verified(self) -> bool:
        """True when every file was checked end to end (see :attr:`FileEntry.verified`)."""
        return all(e.verified for e in self.files)

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` over the sorted (path, size, sha256) triples: the content's identity."""
        h = hashlib.sha256()
        for e in sorted(self.files, key=lambda e: e.path):
            h.update(f"{e.path}\0{e.size}\0{e.sha256 or ''}\n".encode())
        return "sha256:" + h.hexdigest()


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds spent in each step of one load.

    ``verify`` is the disk-hit check on a cache hit, or the staged-file check and publish
    after a download; ``fetch`` is the rest of getting the files (the download itself);
    ``deserialize`` is the ``loader_fn`` (``load()`` only; 0 for a memory hit).
    """

    resolve: float = 0.0
    fetch: float = 0.0
    verify: float = 0.0
    deserialize: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "resolve": self.resolve,
            "fetch": self.fetch,
            "verify": self.verify,
            "deserialize": self.deserialize,
            "total": self.total,
        }


@dataclass(frozen=True, slots=True)
class FetchResult:
    """What :meth:`ResilientLoader.fetch` served.

    Attributes:
        path: The local directory holding the model files (read-only by convention).
        source: The URI of the source that served (``"models:/iris@champion"``).
        ref: The parsed reference of that source.
        version: The immutable version served.
        digest: ``sha256:<hex>`` over the served files' paths, sizes and hashes.
        from_cache: True when no bytes were downloaded.
        degraded: True when every source failed and a last-known-good version was served.
        offline: True when served in offline mode (no source was contacted).
        timings: Seconds spent resolving, fetching, verifying, deserializing.
        failures: ``(source_uri, "ErrorType: message")`` for each source that failed first.
        verified: True when every file was checked end to end against a hash or checksum
            the origin published (not only its size); see ``FileEntry.verified``.
        size: Bytes of the model's files.
        downloaded: Bytes downloaded for this result (0 when served from a cache).
        retries: ``(source_uri, count)`` of the retries each source needed.
    """

    path: Path
    source: str
    ref: ModelRef
    version: str
    digest: str
    from_cache: bool
    degraded: bool = False
    offline: bool = False
    timings: Timings = field(default_factory=Timings)
    failures: tuple[tuple[str, str], ...] = ()
    verified: bool = False
    size: int = 0
    downloaded: int = 0
    retries: tuple[tuple[str, int], ...] = ()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (used by ``model-loader fetch --json``)."""
        return {
            "path": str(self.path),
            "source": self.source,
            "ref": self.ref.uri,
            "version": self.version,
            "digest": self.digest,
            "from_cache": self.from_cache,
            "degraded": self.degraded,
            "offline": self.offline,
            "verified": self.verified,
            "size": self.size,
            "downloaded": self.downloaded,
            "timings": self.timings.as_dict(),
            "failures": [{"source": s, "error": e} for s, e in self.failures],
            "retries": {s: n for s, n in self.retries},
        }


class LoadedModel(NamedTuple):
    """What :meth:`ResilientLoader.load_with_result` returns: the object and what served it.

    Unpacks as ``model, result = loader.load_with_result()``.
    """

    model: Any
    result: FetchResult
