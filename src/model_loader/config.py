"""User-facing configuration: validated pydantic models.

Precedence: constructor arguments > :meth:`LoaderConfig.from_env` (prefix ``MODEL_LOADER_``)
> defaults. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from model_loader._settings import (
    CacheSettings,
    RetrySettings,
    Settings,
    Unsure,
    default_cache_dir,
    light_from_env,
    parse_size,
    read_env,
    split_csv,
)
from model_loader._settings import default_of as _d

__all__ = ["CacheConfig", "LoaderConfig", "RetryPolicy", "default_cache_dir", "parse_size"]


Size = Annotated[int, BeforeValidator(parse_size)]


class _Model(BaseModel):
    # defer_build: the validator is generated on first validation, not at import; the light
    # path of from_env (below) never needs it.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, defer_build=True)


class RetryPolicy(_Model):
    """How a failing source is retried (only ``SourceUnavailableError`` is retried).

    Attributes:
        attempts: Attempts per step (resolve, fetch) per source, the first included. A
            fetch attempt that made progress (completed files are kept) does not count.
        initial_backoff: Seconds before the first retry; doubles each time.
        max_backoff: Cap on one backoff.
        jitter: Up to this many seconds added at random to each backoff.
        source_deadline: Seconds one source may take in all before the next is tried.
    """

    attempts: int = Field(_d(RetrySettings, "attempts"), ge=1, le=100)
    initial_backoff: float = Field(_d(RetrySettings, "initial_backoff"), ge=0)
    max_backoff: float = Field(_d(RetrySettings, "max_backoff"), ge=0)
    jitter: float = Field(_d(RetrySettings, "jitter"), ge=0)
    source_deadline: float = Field(_d(RetrySettings, "source_deadline"), gt=0)


class CacheConfig(_Model):
    """The on-disk and in-memory caches.

    Attributes:
        dir: Cache root. Default: ``$MODEL_LOADER_CACHE_DIR`` or ``~/.cache/model_loader``.
        max_size: Evict least recently used entries beyond this many bytes (``"20GiB"``).
        verify: On a disk hit, check sizes and manifest (``fast``) or every hash (``full``).
        lock_timeout: Seconds to wait for another process fetching the same entry while
            its download shows no progress; then this process fetches on its own (a lock
            only saves bandwidth). Never longer than the load's deadline.
        min_free: Bytes that must stay free on the cache's filesystem after a fetch.
        memory_items: Loaded objects kept in memory per loader.
        tiers: Further cache directories searched after ``dir``, in order (e.g. a shared
            volume pre-warmed by a job, often read-only). Read-only tiers are never written.
        promote: What a hit in a later tier does: ``link`` into ``dir`` (hard links where
            both are on one filesystem, else a copy), ``copy``, or ``off`` (served in place).
        shared: Several hosts use the cache directory (NFS, EFS, a FUSE volume), where
            ``flock`` may not reach between hosts: in-use entries are also marked with
            files other hosts see, so eviction spares them.
    """

    dir: Path = Field(default_factory=default_cache_dir)
    max_size: Size | None = None
    verify: Literal["fast", "full"] = "fast"
    lock_timeout: float = Field(_d(CacheSettings, "lock_timeout"), gt=0)
    min_free: Size = 0
    memory_items: int = Field(_d(CacheSettings, "memory_items"), ge=0)
    tiers: tuple[Path, ...] = ()
    promote: Literal["link", "copy", "off"] = "link"
    shared: bool = False

    @field_validator("tiers", mode="before")
    @classmethod
    def _split_tiers(cls, value: Any) -> Any:
        return split_csv(value) if isinstance(value, str) else value

    @field_validator("dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class LoaderConfig(_Model):
    """Everything a :class:`~model_loader.ResilientLoader` needs besides its sources.

    Attributes:
        sources: Source URIs, tried in order (used when the loader is given none).
        connect_timeout: Seconds to open a connection.
        read_timeout: Seconds to wait for bytes on an open connection.
        deadline: Seconds one ``fetch()`` may take across all sources: every connect,
            read, body, listing, lock wait and backoff is capped by what is left.
        resolve_timeout: Seconds resolving may take on one source, retries included,
            when there is something to fall back on (a later source, or a last-known-good
            version in the cache); otherwise the source deadline applies.
        offline: Serve only from the cache; never touch the network.
        max_concurrency: Parallel transfers per fetch.
        include: Globs of model files to fetch (empty: all).
        exclude: Globs of model files to skip.
        fallback_versions: On a broken version, try up to this many earlier versions.
        resolve_ttl: Seconds a ``fetch()``/``load()`` result is reused without resolving
            again (0: resolve on every call). Set it when ``load()`` sits on a hot path.
        require_verified: Refuse a model unless every file was checked end to end
            against a hash or checksum its origin published (not only its size).
        allow_local_artifacts: Let a remote registry point at local paths for artifacts.
        retry: The retry policy.
        cache: The cache settings.
    """

    sources: tuple[str, ...] = ()
    connect_timeout: float = Field(_d(Settings, "connect_timeout"), gt=0)
    read_timeout: float = Field(_d(Settings, "read_timeout"), gt=0)
    deadline: float = Field(_d(Settings, "deadline"), gt=0)
    resolve_timeout: float = Field(_d(Settings, "resolve_timeout"), gt=0)
    offline: bool = False
    max_concurrency: int = Field(_d(Settings, "max_concurrency"), ge=1, le=256)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    fallback_versions: int = Field(_d(Settings, "fallback_versions"), ge=0, le=100)
    resolve_ttl: float = Field(_d(Settings, "resolve_ttl"), ge=0)
    require_verified: bool = False
    allow_local_artifacts: bool = False
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    @field_validator("sources", "include", "exclude", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_csv(value) if isinstance(value, str) else value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> LoaderConfig:
        """Build from ``MODEL_LOADER_*`` variables; keyword arguments win over them.

        Variables: ``SOURCES`` (comma-separated), ``CACHE_DIR``, ``MAX_CACHE_SIZE``, ``VERIFY``,
        ``CONNECT_TIMEOUT``, ``READ_TIMEOUT``, ``DEADLINE``, ``OFFLINE``, ``MAX_CONCURRENCY``,
        ``INCLUDE``, ``EXCLUDE``, ``FALLBACK_VERSIONS``, ``RESOLVE_TTL``, ``RESOLVE_TIMEOUT``,
        ``REQUIRE_VERIFIED``, ``ALLOW_LOCAL_ARTIFACTS``, ``RETRY_ATTEMPTS``, ``SOURCE_DEADLINE``,
        ``LOCK_TIMEOUT``, ``MEMORY_ITEMS``.

        Raises:
            pydantic.ValidationError: A value is invalid; the message names the variable's field.

        Example:
            >>> LoaderConfig.from_env({"MODEL_LOADER_OFFLINE": "1"}).offline
            True
        """
        try:
            built: LoaderConfig = _pydantic_twin(light_from_env(environ, overrides))  # no validator built: fast
            return built
        except Unsure:
            pass  # pydantic validates and, if something is wrong, says what
        top, retry, cache = read_env(environ)
        data: dict[str, Any] = {**top}
        if retry:
            data["retry"] = RetryPolicy(**retry)
        if cache:
            data["cache"] = CacheConfig(**cache)
        data.update(overrides)
        return cls(**data)


_TWINS: dict[type, type[_Model]] = {}


def _pydantic_twin(settings: Any) -> Any:
    """The pydantic model holding the same, already checked, values (``model_construct``)."""
    if not _TWINS:
        _TWINS.update({Settings: LoaderConfig, RetrySettings: RetryPolicy, CacheSettings: CacheConfig})
    model = _TWINS[type(settings)]
    values = {
        f.name: _pydantic_twin(getattr(settings, f.name))
        if type(getattr(settings, f.name)) in _TWINS
        else getattr(settings, f.name)
        for f in dataclasses.fields(settings)
    }
    return model.model_construct(**values)


def validation_message(exc: ValidationError) -> str:
    """One line per invalid field: ``field: message``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
