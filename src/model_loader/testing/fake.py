"""An in-memory source for users' tests and ours.

It keeps every published version (immutable versions, version history), and faults can
be injected: :meth:`InMemorySource.set_available` and :meth:`InMemorySource.fail_next`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from model_loader._deadline import FetchContext
from model_loader._io import safe_relpath, write_chunks
from model_loader._types import FileEntry, Manifest, ModelRef, ResolvedModel
from model_loader.errors import ModelNotFoundError, SourceError, SourceUnavailableError
from model_loader.protocol import SourceCapabilities

__all__ = ["InMemorySource"]


class InMemorySource:
    """A thread-safe in-memory model store speaking the ``mem://name`` scheme.

    ``mem://name`` follows the newest version, ``mem://name?alias=prod`` an alias and
    ``mem://name?version=2`` pins one.

    Example:
        >>> src = InMemorySource()
        >>> ref = src.publish("iris", {"model.pkl": b"..."}, alias="prod")
        >>> src.resolve(ref).version
        'iris/1'
    """

    scheme: ClassVar[str] = "mem"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        remote=True, immutable_versions=True, version_history=True, resumable=True
    )

    def __init__(self, name: str = "default") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._versions: dict[str, list[dict[str, bytes]]] = {}
        self._aliases: dict[tuple[str, str], int] = {}
        self._available = True
        self._faults: list[SourceError] = []
        self.calls: list[str] = []
        self.closed = False

    @property
    def identity(self) -> str:
        return f"mem://{self._name}"

    def publish(self, name: str, files: Mapping[str, bytes], alias: str | None = None) -> ModelRef:
        """Store a new version of ``name``; point ``alias`` at it. Returns its moving ref."""
        for path in files:
            safe_relpath(path)
        with self._lock:
            versions = self._versions.setdefault(name, [])
            versions.append(dict(files))
            if alias:
                self._aliases[(name, alias)] = len(versions)
        uri = f"mem://{name}?alias={alias}" if alias else f"mem://{name}"
        return self.ref(uri)

    @staticmethod
    def ref(uri: str) -> ModelRef:
        """Parse a ``mem://`` reference."""
        from model_loader._uri import parse_ref

        return parse_ref(uri, check_scheme=False)

    def delete_version(self, name: str, version: int) -> None:
        """Make one version's files disappear (as if its artifacts were deleted)."""
        with self._lock:
            self._versions[name][version - 1] = {}

    def set_available(self, available: bool) -> None:
        """Simulate the store going down (every call raises ``SourceUnavailableError``)."""
        self._available = available

    def fail_next(self, count: int, error: SourceError | None = None) -> None:
        """Make the next ``count`` calls raise ``error`` (default: ``SourceUnavailableError``)."""
        err = error or SourceUnavailableError("injected fault", scheme=self.scheme)
        with self._lock:
            self._faults.extend([err] * count)

    def _enter(self, what: str) -> None:
        self.calls.append(what)
        with self._lock:
            fault = self._faults.pop(0) if self._faults else None
        if fault is not None:
            raise fault
        if not self._available:
            raise SourceUnavailableError(f"{self.identity} is unavailable", scheme=self.scheme)

    def resolve(self, ref: ModelRef) -> ResolvedModel:
        self._enter(f"resolve {ref.uri}")
        name = ref.location
        params = dict(ref.params)
        with self._lock:
            versions = self._versions.get(name)
            if not versions:
                raise ModelNotFoundError(f"no model {name!r}", scheme=self.scheme, ref=ref.uri)
            if "version" in params:
                number = int(params["version"])
            elif "alias" in params:
                found = self._aliases.get((name, params["alias"]))
                if found is None:
                    raise ModelNotFoundError(
                        f"no alias {params['alias']!r} on {name!r}", scheme=self.scheme, ref=ref.uri
                    )
                number = found
            else:
                number = len(versions)
            if not 1 <= number <= len(versions):
                raise ModelNotFoundError(f"no version {number} of {name!r}", scheme=self.scheme, ref=ref.uri)
            files = versions[number - 1]
        return self._resolved(ref, name, number, files)

    def _resolved(self, ref: ModelRef, name: str, number: int, files: Mapping[str, bytes]) -> ResolvedModel:
        entries = tuple(FileEntry(p, len(b), hashlib.sha256(b).hexdigest()) for p, b in sorted(files.items()))
        return ResolvedModel(ref, self.identity, f"{name}/{number}", entries, (("name", name), ("number", str(number))))

    def fetch(self, resolved: ResolvedModel, dest: Path) -> Manifest:
        self._enter(f"fetch {resolved.version}")
        name, number = resolved.meta["name"], int(resolved.meta["number"])
        with self._lock:
            files = dict(self._versions[name][number - 1])
        if not files:
            raise ModelNotFoundError(
                f"the files of {resolved.version} are gone", scheme=self.scheme, ref=resolved.ref.uri
            )
        ctx = FetchContext.current()
        wanted = {f.path for f in resolved.files} if resolved.files is not None else set(files)
        entries = []
        for path, data in sorted(files.items()):
            if path not in wanted:
                continue  # already fetched by an earlier attempt (resumed)
            target = Path(dest, safe_relpath(path))
            target.parent.mkdir(parents=True, exist_ok=True)
            size, sha = write_chunks([data], target)
            entry = FileEntry(path, size, sha)
            ctx.progress(size)
            ctx.file_done(entry)
            entries.append(entry)
        return Manifest.of(entries)

    def previous_versions(self, resolved: ResolvedModel, limit: int) -> list[ResolvedModel]:
        self._enter(f"history {resolved.version}")
        name, number = resolved.meta["name"], int(resolved.meta["number"])
        with self._lock:
            versions = list(self._versions.get(name, []))
        out = []
        for n in range(number - 1, max(0, number - 1 - limit), -1):
            ref = self.ref(f"mem://{name}?version={n}")
            out.append(self._resolved(ref, name, n, versions[n - 1]))
        return out

    def close(self) -> None:
        self.closed = True
