"""User-facing configuration: validated pydantic models.

Precedence: constructor arguments > :meth:`LoaderConfig.from_env` (prefix ``MODEL_LOADER_``)
> defaults. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

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

    attempts: int = Field(5, ge=1, le=100)
    initial_backoff: float = Field(0.05, ge=0)
    max_backoff: float = Field(5.0, ge=0)
    jitter: float = Field(0.05, ge=0)
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
    lock_timeout: float = Field(30.0, gt=0)
    min_free: Size = 0
    memory_items: int = Field(4, ge=0)
    tiers: tuple[Path, ...] = ()
    promote: Literal["link", "copy", "off"] = "link"
    shared: bool = False

    @field_validator("tiers", mode="before")
    @classmethod
    def _split_tiers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

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
        return _split_csv(value) if isinstance(value, str) else value

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
        cache: dict[str, Any] = {key: env.pop(name) for name, key in _CACHE_KEYS.items() if name in env}
        if environ is not None and "dir" not in cache:
            cache["dir"] = default_cache_dir(environ)  # the given mapping only, never os.environ
        try:
            return _light_from_env(env, retry, cache, overrides)
        except _Unsure:
            pass  # pydantic validates and, if something is wrong, says what
        data: dict[str, Any] = {**env}
        if retry:
            data["retry"] = RetryPolicy(**retry)
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
    "cache_tiers": "tiers",
    "cache_promote": "promote",
    "cache_shared": "shared",
}


_PREFIX = "MODEL_LOADER_"


def _env_names() -> set[str]:
    """Every ``MODEL_LOADER_<NAME>`` suffix, lower case: the top-level fields, the cache keys, retry's two."""
    top = set(LoaderConfig.model_fields) - {"retry", "cache"}
    return top | set(_CACHE_KEYS) | {"retry_attempts", "source_deadline"}


def _read_env(environ: Mapping[str, str] | None) -> dict[str, str]:
    """The ``MODEL_LOADER_*`` variables this module knows, as ``{lower-case suffix: text}``.

    Names are matched case-insensitively. With ``environ=None`` the process environment is
    read; a given mapping is used instead of it, never merged with it.
    """
    env = os.environ if environ is None else environ
    names = _env_names()
    found: dict[str, str] = {}
    for name, value in env.items():
        if name[: len(_PREFIX)].upper() == _PREFIX:
            key = name[len(_PREFIX) :].lower()
            if key in names:
                found[key] = value
    return found


# -- the light path --------------------------------------------------------------------------
#
# Building these models the first time costs pydantic's schema generation (tens of ms, most of
# a warm ``model-loader fetch``). ``from_env`` therefore checks the values itself first, using
# the rules below, and builds the models with ``model_construct`` when every value is in a plain,
# canonical form that pydantic would accept and convert the same way. Anything else (a value out
# of range, "1e3", " 5", an unknown field) is left to pydantic, so errors and their messages are
# always pydantic's. tests/test_cli.py checks that both paths agree on a corpus of inputs.


class _Unsure(Exception):
    """A value the light path leaves to pydantic, which accepts it or names the problem."""


_INT_TEXT = re.compile(r"[0-9]{1,18}")
_FLOAT_TEXT = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,15})?")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_Check = Callable[[Any], Any]


def _number(
    kind: type[int] | type[float], *, gt: float | None = None, ge: float | None = None, le: float | None = None
) -> _Check:
    text = _INT_TEXT if kind is int else _FLOAT_TEXT

    def check(value: Any) -> Any:
        if isinstance(value, str) and text.fullmatch(value):
            number: float = kind(value)
        elif (type(value) is int and abs(value) < 2**53) or (
            kind is float and type(value) is float and math.isfinite(value)
        ):
            number = kind(value)  # ints beyond 2**53 are pydantic's to judge (float() loses or overflows)
        else:
            raise _Unsure
        if (gt is not None and not number > gt) or (ge is not None and not number >= ge):
            raise _Unsure
        if le is not None and not number <= le:
            raise _Unsure
        return number

    return check


def _flag(value: Any) -> bool:
    if type(value) is bool:
        return value
    if isinstance(value, str):
        low = value.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
    raise _Unsure


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return _split_csv(value)
    if isinstance(value, tuple | list) and all(type(v) is str for v in value):
        return tuple(value)
    raise _Unsure


def _verify(value: Any) -> str:
    if value in ("fast", "full") and type(value) is str:
        return str(value)
    raise _Unsure


def _size(value: Any) -> int:
    if type(value) is int and value >= 0:
        return value
    if not isinstance(value, str):
        raise _Unsure
    try:
        return parse_size(value)
    except ValueError:
        raise _Unsure from None


def _optional_size(value: Any) -> int | None:
    return None if value is None else _size(value)


def _directory(value: Any) -> Path:
    if isinstance(value, str | os.PathLike) and os.fspath(value):
        return Path(value).expanduser()
    raise _Unsure


def _paths(value: Any) -> tuple[Path, ...]:
    parts = _split_csv(value) if isinstance(value, str) else value
    if isinstance(parts, tuple | list) and all(isinstance(v, str | os.PathLike) and os.fspath(v) for v in parts):
        return tuple(Path(v) for v in parts)
    raise _Unsure


def _promote(value: Any) -> str:
    if value in ("link", "copy", "off") and type(value) is str:
        return str(value)
    raise _Unsure


def _split_csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _light_from_env(
    env: dict[str, str], retry: dict[str, str], cache: dict[str, Any], overrides: dict[str, Any]
) -> LoaderConfig:
    """What ``from_env`` builds, without pydantic's validator; raises ``_Unsure`` to defer to it."""
    data: dict[str, Any] = dict(env)
    if retry:
        data["retry"] = _light(RetryPolicy, retry)
    if cache:
        data["cache"] = _light(CacheConfig, cache)
    data.update(overrides)
    return _light(LoaderConfig, data)


_M = TypeVar("_M", bound=_Model)


def _light(model: type[_M], given: Mapping[str, Any]) -> _M:
    checks = _CHECKS[model]
    values: dict[str, Any] = {}
    for name, value in given.items():
        check = checks.get(name)
        if check is None:
            raise _Unsure  # not a field: pydantic names it
        values[name] = check(value)
    fields_set = set(values)
    for name, info in model.model_fields.items():
        if name in values:
            continue
        if name not in checks:
            raise _Unsure  # a field the light path does not know yet: pydantic builds it all
        factory = info.default_factory
        if factory is None:
            values[name] = checks[name](info.default)  # validate_default=True
        elif factory is RetryPolicy or factory is CacheConfig:
            values[name] = _light(factory, {})
        else:
            values[name] = checks[name](factory())  # type: ignore[call-arg]
    return cast(_M, model.model_construct(fields_set, **values))  # the plugin types it as the base class


def _nested(model: type[_Model]) -> _Check:
    def check(value: Any) -> Any:
        if type(value) is model:
            return value  # already validated (pydantic does not validate instances again)
        if isinstance(value, Mapping):
            return _light(model, value)
        raise _Unsure

    return check


_CHECKS: dict[type[_Model], dict[str, _Check]] = {
    RetryPolicy: {
        "attempts": _number(int, ge=1, le=100),
        "initial_backoff": _number(float, ge=0),
        "max_backoff": _number(float, ge=0),
        "jitter": _number(float, ge=0),
        "source_deadline": _number(float, gt=0),
    },
    CacheConfig: {
        "dir": _directory,
        "max_size": _optional_size,
        "verify": _verify,
        "lock_timeout": _number(float, gt=0),
        "min_free": _size,
        "memory_items": _number(int, ge=0),
        "tiers": _paths,
        "promote": _promote,
        "shared": _flag,
    },
    LoaderConfig: {
        "sources": _strings,
        "connect_timeout": _number(float, gt=0),
        "read_timeout": _number(float, gt=0),
        "deadline": _number(float, gt=0),
        "resolve_timeout": _number(float, gt=0),
        "offline": _flag,
        "max_concurrency": _number(int, ge=1, le=256),
        "include": _strings,
        "exclude": _strings,
        "fallback_versions": _number(int, ge=0, le=100),
        "resolve_ttl": _number(float, ge=0),
        "require_verified": _flag,
        "allow_local_artifacts": _flag,
        "retry": _nested(RetryPolicy),
        "cache": _nested(CacheConfig),
    },
}


def validation_message(exc: ValidationError) -> str:
    """One line per invalid field: ``field: message``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
