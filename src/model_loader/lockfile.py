"""Lock files: the exact versions a release was tested with, served again exactly.

``model-loader lock URI... > models.lock`` records what each reference resolves to now
(the source that served, its immutable version, the digest, every file with its size and
SHA-256). ``model-loader fetch --lock models.lock`` and :meth:`ResilientLoader.from_lock`
serve exactly those versions, online or offline:

- from the cache when it holds the version, checked against the recorded digest (no
  network at all);
- else from the sources, asking for the recorded version itself where the reference can
  name it (``models:/name/3``; a pinned reference), so a moved alias does not matter;
  where it cannot (an S3 prefix), only if the source still resolves to that version.

Anything else, and any difference from the recorded digest, is an ``IntegrityError``:
never served.

Example:
    >>> lock = LockFile.loads(Path("models.lock").read_text())
    >>> with ResilientLoader.from_lock(lock.models[0]) as loader:
    ...     model = loader.load()
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from model_loader._types import FileEntry, Manifest, ResolvedModel
from model_loader.errors import IntegrityError, InvalidReferenceError, SourceUnavailableError

if TYPE_CHECKING:
    from model_loader._settings import Settings
    from model_loader.config import LoaderConfig

__all__ = ["FORMAT", "LockFile", "LockedModel", "lock", "pinned_uri"]

FORMAT = 1


@dataclass(frozen=True, slots=True)
class LockedModel:
    """One model of a lock file.

    Attributes:
        sources: The source URIs of the reference, in the order they are tried.
        source: The URI of the source that served when the lock was made.
        identity: That source's identity (the backend it talks to, no credentials).
        version: The immutable version served.
        pinned: A URI naming that version where the source has one (``models:/iris/3``).
        digest: ``sha256:...`` over every file's path, size and SHA-256.
        files: Every file with its size and SHA-256.
    """

    sources: tuple[str, ...]
    source: str
    identity: str
    version: str
    pinned: str | None
    digest: str
    files: tuple[FileEntry, ...]

    @property
    def cache_key(self) -> str:
        return ResolvedModel(_dummy_ref(), self.identity, self.version).cache_key

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "source": self.source,
            "identity": self.identity,
            "version": self.version,
            "pinned": self.pinned,
            "digest": self.digest,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }


@dataclass(frozen=True, slots=True)
class LockFile:
    """A set of locked models, read and written as JSON."""

    models: tuple[LockedModel, ...]

    def dumps(self) -> str:
        return json.dumps({"format": FORMAT, "models": [m.to_json() for m in self.models]}, indent=1) + "\n"

    @classmethod
    def loads(cls, text: str) -> LockFile:
        """Parse a lock file.

        Raises:
            InvalidReferenceError: It is not a lock file this version understands.
        """
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a model_loader lock file of format {FORMAT}")
            rows = data["models"]
            if not isinstance(rows, list) or not rows:
                raise ValueError("it lists no models")
            return cls(tuple(_model(row) for row in rows))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidReferenceError(f"invalid lock file: {exc}") from exc


def lock(references: Iterable[Iterable[str]], config: LoaderConfig | Settings | None = None) -> LockFile:
    """Lock each reference (its sources, in order) to what it resolves to now.

    Each model is fetched (and so cached), because the digest covers every file's hash.

    Raises:
        SourceUnavailableError: Only a cached copy could be served (the sources are down):
            a lock records what the sources say, not what the cache remembers.
    """
    from model_loader.loader import ResilientLoader

    models = []
    for sources in references:
        uris = list(sources)
        with ResilientLoader(uris, config=config) as loader:
            result = loader.fetch()
            if result.degraded or result.offline:
                raise SourceUnavailableError(
                    f"cannot lock {uris[0]}: no source answered, only a cached copy was served", ref=uris[0]
                )
            spec = next(s for s in loader._specs if s.uri == result.source)
            resolved = spec.source.resolve(spec.ref)
            pinned = pinned_uri(resolved) if resolved.version == result.version else None
            entry, problem = loader.cache.get(result.path.parent.name)
            if entry is None:
                raise IntegrityError(f"{result.version} vanished from the cache while locking it: {problem}")
            manifest = entry.manifest
        models.append(
            LockedModel(
                sources=loader.sources,
                source=result.source,
                identity=spec.source.identity,
                version=result.version,
                pinned=pinned,
                digest=result.digest,
                files=tuple(FileEntry(f.path, f.size, f.sha256) for f in manifest.files),
            )
        )
    return LockFile(tuple(models))


def _model(row: Any) -> LockedModel:
    if not isinstance(row, dict):
        raise ValueError("a model entry is not an object")

    def text(name: str, optional: bool = False) -> Any:
        value = row.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name!r} is missing or not a string")
        return value

    sources = row.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise ValueError("'sources' must be a non-empty list of URIs")
    files = []
    for f in row.get("files") or []:
        if not isinstance(f, dict):
            raise ValueError("a file entry is not an object")
        path, size, sha = f.get("path"), f.get("size"), f.get("sha256")
        if not isinstance(path, str) or type(size) is not int or size < 0 or not isinstance(sha, str):
            raise ValueError(f"file entry {f!r:.80} is malformed")
        files.append(FileEntry(path, size, sha))
    digest = text("digest")
    if Manifest.of(files).digest != digest:
        raise ValueError(f"the files listed for {text('version')} do not add up to its digest")
    return LockedModel(
        sources=tuple(sources),
        source=text("source"),
        identity=text("identity"),
        version=text("version"),
        pinned=text("pinned", optional=True),
        digest=digest,
        files=tuple(files),
    )


def pinned_uri(resolved: ResolvedModel) -> str | None:
    """A URI naming exactly ``resolved``'s version, where its source has one."""
    if resolved.ref.pinned:
        return resolved.ref.uri
    if resolved.ref.scheme == "models":
        from model_loader.sources.mlflow import pinned_model_uri

        return pinned_model_uri(resolved)
    return None


def _dummy_ref() -> Any:
    from model_loader._types import ModelRef

    return ModelRef("lock", "lock:", "")
