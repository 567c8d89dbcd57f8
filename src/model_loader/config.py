"""User-facing configuration: validated pydantic models.

Precedence: constructor arguments > :meth:`LoaderConfig.from_env` (prefix ``MODEL_LOADER_``)
> defaults. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

__all__ = ["CacheConfig", "LoaderConfig", "RetryPolicy", "default_cache_dir", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "p": 1000**5}


def parse_size(value: int | str) -> int:
    """Parse ``"10GiB"``, ``"500MB"``, ``"1024"`` or an int into bytes.

    Raises:
        ValueError: The text is not a size.
    """
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size (examples: 1048576, 500MB, 10GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    base = unit[:1]
    factor = 1024 ** "bkmgtp".index(base) if unit.endswith(("ib", "i")) and base != "b" else _UNITS[base]
    return int(number * factor)


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$MODEL_LOADER_CACHE_DIR``, else ``$XDG_CACHE_HOME/model_loader``, else ``~/.cache/model_loader``.

    Args:
        environ: Read the variables from this mapping instead of ``os.environ``.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("MODEL_LOADER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "model_loader"


Size = Annotated[int, BeforeValidator(parse_size)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


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

    attempts: int = Field(5, ge=1, le=100)
    initial_backoff: float = Field(0.1, ge=0)
    max_backoff: float = Field(5.0, ge=0)
    jitter: float = Field(0.1, ge=0)
    source_deadline: float = Field(60.0, gt=0)


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
    """

    dir: Path = Field(default_factory=default_cache_dir)
    max_size: Size | None = None
    verify: Literal["fast", "full"] = "fast"
    lock_timeout: float = Field(30.0, gt=0)
    min_free: Size = 0
    memory_items: int = Field(4, ge=0)

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
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    deadline: float = Field(600.0, gt=0)
    resolve_timeout: float = Field(4.0, gt=0)
    offline: bool = False
    max_concurrency: int = Field(16, ge=1, le=256)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    fallback_versions: int = Field(0, ge=0, le=100)
    resolve_ttl: float = Field(0.0, ge=0)
    require_verified: bool = False
    allow_local_artifacts: bool = False
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    @field_validator("sources", "include", "exclude", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

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
        env = _read_env(environ)
        retry = {k[len("retry_") :]: env.pop(k) for k in list(env) if k.startswith("retry_")}
        if "source_deadline" in env:
            retry["source_deadline"] = env.pop("source_deadline")
        cache = {key: env.pop(name) for name, key in _CACHE_KEYS.items() if name in env}
        data: dict[str, Any] = {**env}
        if retry:
            data["retry"] = RetryPolicy(**retry)
        if environ is not None and "dir" not in cache:
            cache["dir"] = default_cache_dir(environ)  # the given mapping only, never os.environ
        if cache:
            data["cache"] = CacheConfig(**cache)
        data.update(overrides)
        return cls(**data)


_CACHE_KEYS = {
    "cache_dir": "dir",
    "max_cache_size": "max_size",
    "verify": "verify",
    "lock_timeout": "lock_timeout",
    "min_free": "min_free",
    "memory_items": "memory_items",
}


def _read_env(environ: Mapping[str, str] | None) -> dict[str, Any]:
    """``MODEL_LOADER_*`` variables, read by pydantic-settings (imported only here).

    With ``environ=None`` pydantic-settings reads the process environment itself; a given
    mapping is used instead of it, never merged with it.
    """
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

    use_process_env = environ is None

    class _Env(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="MODEL_LOADER_", extra="ignore", case_sensitive=False)
        sources: str | None = None
        cache_dir: str | None = None
        max_cache_size: str | None = None
        verify: str | None = None
        connect_timeout: str | None = None
        read_timeout: str | None = None
        deadline: str | None = None
        offline: str | None = None
        max_concurrency: str | None = None
        include: str | None = None
        exclude: str | None = None
        fallback_versions: str | None = None
        resolve_ttl: str | None = None
        resolve_timeout: str | None = None
        require_verified: str | None = None
        allow_local_artifacts: str | None = None
        retry_attempts: str | None = None
        source_deadline: str | None = None
        lock_timeout: str | None = None
        min_free: str | None = None
        memory_items: str | None = None

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (env_settings,) if use_process_env else (init_settings,)

    if use_process_env:
        parsed = _Env()
    else:
        assert environ is not None
        prefix = "MODEL_LOADER_"
        values = {k[len(prefix) :].lower(): v for k, v in environ.items() if k.upper().startswith(prefix)}
        parsed = _Env.model_validate({k: v for k, v in values.items() if k in _Env.model_fields})
    return {k: v for k, v in parsed.model_dump().items() if v is not None}


def validation_message(exc: ValidationError) -> str:
    """One line per invalid field: ``field: message``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
