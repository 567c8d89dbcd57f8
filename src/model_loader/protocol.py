"""The contract every model source implements.

A source turns a moving reference into an immutable version (``resolve``) and writes
exactly that version's files into an empty staging directory (``fetch``). It never
renames, locks or publishes: the cache does that, in one place. Errors leave a source
only as :mod:`model_loader.errors` types.

Time: every blocking call of a source is capped by ``Deadline.current()`` (see
:mod:`model_loader._deadline`), which the loader sets around ``resolve``, ``fetch`` and
``previous_versions``; threads a source starts get it passed explicitly. Data a source
receives from a server is parsed against a schema and bounded; anything malformed
becomes a ``SourceError`` (``SourceUnavailableError`` when a retry may help).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from model_loader._types import Manifest, ModelRef, ResolvedModel

__all__ = [
    "FetchObserver",
    "ModelSource",
    "ProgressObserver",
    "SourceCapabilities",
    "SourceSettings",
    "SupportsVersionHistory",
]


@dataclass(frozen=True, slots=True)
class SourceCapabilities:
    """What a source can do; the conformance suite skips on these, never on type.

    Attributes:
        remote: It talks to a server; offline mode never calls it and faults can be injected.
        immutable_versions: A ``ResolvedModel`` stays fetchable with its original bytes after
            the reference moves (MLflow versions, versioned S3 buckets). Otherwise fetching a
            superseded resolution raises ``StaleResolutionError``.
        version_history: It implements :class:`SupportsVersionHistory` (rollback to earlier
            versions of the same model).
        resumable: ``fetch`` may find files of an earlier attempt in ``dest`` (listed in
            ``FetchContext.current().completed``) and leaves them as they are; with a
            resolution that lists its files, it is handed only the files still missing.
            Without it, every attempt starts from an empty directory.
    """

    remote: bool = False
    immutable_versions: bool = False
    version_history: bool = False
    resumable: bool = False


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """Settings the loader hands to sources it builds from URIs.

    Attributes:
        connect_timeout: Seconds to establish a connection.
        read_timeout: Seconds to wait for bytes on an open connection.
        max_concurrency: Parallel transfers a source may run.
        include: Glob patterns of relative paths to fetch (empty: everything).
        exclude: Glob patterns of relative paths to skip.
        state_dir: A directory a source may keep small state in across processes (the
            loader gives ``<cache>/state``); ``None``: keep nothing.
        allow_local_artifacts: A remote registry may point at local paths (``file:``)
            for artifacts. Off: such a location is refused, so a registry cannot make
            the loader copy a directory of its choosing.
    """

    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_concurrency: int = 16
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    state_dir: Path | None = None
    allow_local_artifacts: bool = False

    def as_kwargs(self) -> dict[str, Any]:
        """The transfer settings as keyword arguments, for ``from_settings`` implementations."""
        return {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "max_concurrency": self.max_concurrency,
            "include": self.include,
            "exclude": self.exclude,
        }


@runtime_checkable
class ModelSource(Protocol):
    """A place models are loaded from.

    Attributes:
        scheme: The URI scheme this source serves (``"s3"``).
        capabilities: What the source supports.
        identity: A stable, credential-free name of the backend this instance talks to
            (``"s3+http://127.0.0.1:9000"``). Known without network I/O; caches key on it.

    A class registered for a scheme may define ``from_settings(settings)``, a classmethod
    the registry calls to build it from :class:`SourceSettings`; otherwise it is built
    with no arguments.
    """

    scheme: ClassVar[str]
    capabilities: ClassVar[SourceCapabilities]

    @property
    def identity(self) -> str: ...

    def resolve(self, ref: ModelRef) -> ResolvedModel:
        """Pin ``ref`` to an immutable version. Raises ``SourceError`` subclasses."""
        ...

    def fetch(self, resolved: ResolvedModel, dest: Path) -> Manifest:
        """Write exactly ``resolved``'s files into the empty directory ``dest``.

        Returns a manifest with every file's size and SHA-256 (hashed while written).
        Raises ``StaleResolutionError`` if the pinned content changed.
        """
        ...

    def close(self) -> None:
        """Release connections. Idempotent."""
        ...


@runtime_checkable
class SupportsVersionHistory(Protocol):
    """A source that can list earlier versions of a resolved model (rollback path)."""

    def previous_versions(self, resolved: ResolvedModel, limit: int) -> list[ResolvedModel]:
        """Up to ``limit`` earlier versions of the same model, newest first."""
        ...


@runtime_checkable
class FetchObserver(Protocol):
    """Hooks around a download (the CLI draws its progress bar with them)."""

    def fetch_started(self, source: str, staging: Path, expected_bytes: int | None) -> None:
        """Bytes are about to be written under ``staging`` (``expected_bytes`` when known)."""
        ...

    def fetch_finished(self, source: str) -> None:
        """The download ended, successfully or not."""
        ...


@runtime_checkable
class ProgressObserver(FetchObserver, Protocol):
    """A :class:`FetchObserver` that is also told of bytes as they arrive."""

    def fetch_progress(self, source: str, nbytes: int) -> None:
        """``nbytes`` more bytes were written for ``source`` (called from download threads)."""
        ...
