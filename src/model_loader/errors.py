"""The exception tree of model_loader.

Every error the package raises derives from :class:`ModelLoaderError`, and most also
derive from the matching builtin so callers can keep their ``except`` clauses::

    ModelLoaderError
    ├── InvalidReferenceError(ModelLoaderError, ValueError)
    │   └── UnknownSchemeError
    ├── MissingDependencyError(ModelLoaderError, ImportError)   # names the extra to install
    ├── SourceError                       # .scheme, .ref; __cause__ = the SDK error
    │   ├── ModelNotFoundError(SourceError, LookupError)          # permanent
    │   ├── AccessDeniedError(SourceError, PermissionError)       # permanent
    │   ├── StaleResolutionError          # the object changed between resolve and fetch
    │   └── SourceUnavailableError(SourceError, ConnectionError)  # transient: the only retried error
    │       ├── SourceTimeoutError(SourceUnavailableError, TimeoutError)
    │       └── InvalidResponseError          # an answer that does not parse against its schema
    ├── IntegrityError                    # size or hash mismatch; staging discarded
    ├── CacheError(ModelLoaderError, OSError)   # disk full, lock timeout, unwritable cache
    ├── DeserializationError              # the loader function raised
    ├── ModelNotReadyError(ModelLoaderError, RuntimeError)    # serving: nothing loaded yet
    └── AllSourcesFailedError             # .failures: every source's error, in order

Sources translate their SDK's exceptions in exactly one place (a ``_map_errors()``
context manager) with ``raise X from exc``, so no SDK exception leaves a source.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AccessDeniedError",
    "AllSourcesFailedError",
    "CacheError",
    "DeserializationError",
    "IntegrityError",
    "InvalidReferenceError",
    "InvalidResponseError",
    "MissingDependencyError",
    "ModelLoaderError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "SourceError",
    "SourceTimeoutError",
    "SourceUnavailableError",
    "StaleResolutionError",
    "UnknownSchemeError",
]


class ModelLoaderError(Exception):
    """Base class of every error raised by model_loader."""


class InvalidReferenceError(ModelLoaderError, ValueError):
    """A model reference (URI) is malformed."""


class UnknownSchemeError(InvalidReferenceError):
    """No source is registered for the reference's scheme."""


class MissingDependencyError(ModelLoaderError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, message: str, *, extra: str | None = None) -> None:
        super().__init__(message)
        self.extra = extra


class SourceError(ModelLoaderError):
    """A source failed to resolve or fetch a model.

    Attributes:
        scheme: The scheme of the source that failed (``"s3"``, ``"models"``...).
        ref: The reference (URI) being resolved or fetched, if known.
    """

    def __init__(self, message: str, *, scheme: str = "", ref: str = "") -> None:
        super().__init__(message)
        self.scheme = scheme
        self.ref = ref


class ModelNotFoundError(SourceError, LookupError):
    """The model, version, alias, key or directory does not exist (permanent)."""


class AccessDeniedError(SourceError, PermissionError):
    """The source refused the credentials (permanent)."""


class StaleResolutionError(SourceError):
    """What ``resolve`` pinned changed before ``fetch`` finished; resolve again."""


class SourceUnavailableError(SourceError, ConnectionError):
    """The source could not be reached or answered with a transient error (retried)."""


class SourceTimeoutError(SourceUnavailableError, TimeoutError):
    """A connect or read timeout, or a deadline, expired."""


class InvalidResponseError(SourceUnavailableError):
    """A server answered with something malformed (wrong shape, missing or out-of-range
    fields, an unbounded listing).

    It is the server's fault, not the reference's, so the loader treats it like an
    outage: retried, then the next source, then the last-known-good version.
    """


class IntegrityError(ModelLoaderError):
    """Fetched or cached bytes do not match the expected sizes or hashes."""


class CacheError(ModelLoaderError, OSError):
    """The disk cache cannot be used: not writable, disk full, lock timeout."""


class DeserializationError(ModelLoaderError):
    """The loader function raised while turning a fetched model into an object."""


class ModelNotReadyError(ModelLoaderError, RuntimeError):
    """No model is served yet: the first load is running, or failed and will be retried."""


class AllSourcesFailedError(ModelLoaderError):
    """Every source failed and no last-known-good version could be served.

    Attributes:
        failures: ``(source_uri, error)`` pairs, in the order the sources were tried.
    """

    def __init__(self, message: str, failures: Sequence[tuple[str, BaseException]]) -> None:
        lines = [message] + [f"  {uri}: {type(err).__name__}: {err}" for uri, err in failures]
        super().__init__("\n".join(lines))
        self.failures: tuple[tuple[str, BaseException], ...] = tuple(failures)
