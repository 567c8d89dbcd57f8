"""The loader's settings as plain values, read from ``MODEL_LOADER_*`` without pydantic.

:mod:`model_loader.config` declares the settings users write (pydantic models with their
validation and messages). Importing pydantic and building those models costs more than
a warm start of ``model-loader fetch`` should take, so the environment is first read
here: every value in a plain, canonical form (``"5"``, ``"true"``, ``"20GiB"``, a path)
is checked with the same rules and stored in frozen dataclasses with the same fields and
defaults. Anything else (a value out of range, ``"1e3"``, an unknown field) is left to
pydantic, so an error and its message are always pydantic's.

The loader reads either kind alike; tests check that both paths agree, field by field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model_loader.config import LoaderConfig

__all__ = [
    "CacheSettings",
    "RetrySettings",
    "Settings",
    "default_cache_dir",
    "default_of",
    "parse_size",
    "settings_from_env",
]

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


def split_csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# -- the fields and their defaults (config.py's models take their defaults from here) ------


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """See :class:`model_loader.config.RetryPolicy`."""

    attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 5.0
    jitter: float = 0.05
    source_deadline: float = 60.0


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """See :class:`model_loader.config.CacheConfig`."""

    dir: Path = field(default_factory=default_cache_dir)
    max_size: int | None = None
    verify: str = "fast"
    lock_timeout: float = 30.0
    min_free: int = 0
    memory_items: int = 4
    tiers: tuple[Path, ...] = ()
    promote: str = "link"
    shared: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    """See :class:`model_loader.config.LoaderConfig`."""

    sources: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    deadline: float = 600.0
    resolve_timeout: float = 3.0
    offline: bool = False
    max_concurrency: int = 16
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    fallback_versions: int = 0
    resolve_ttl: float = 0.0
    require_verified: bool = False
    allow_local_artifacts: bool = False
    retry: RetrySettings = field(default_factory=RetrySettings)
    cache: CacheSettings = field(default_factory=CacheSettings)


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of a settings dataclass (what config.py declares too)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


# -- the environment --------------------------------------------------------------------------

PREFIX = "MODEL_LOADER_"
CACHE_KEYS = {
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
_TOP = frozenset(f.name for f in dataclasses.fields(Settings)) - {"retry", "cache"}
ENV_NAMES = _TOP | set(CACHE_KEYS) | {"retry_attempts", "source_deadline"}


def read_env(environ: Mapping[str, str] | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The ``MODEL_LOADER_*`` variables this package knows, split into the top-level, retry
    and cache fields they set (names matched case-insensitively).

    With ``environ=None`` the process environment is read; a given mapping is used instead
    of it, never merged with it (the default cache directory included).
    """
    env = os.environ if environ is None else environ
    top: dict[str, Any] = {}
    for name, value in env.items():
        if name[: len(PREFIX)].upper() == PREFIX:
            key = name[len(PREFIX) :].lower()
            if key in ENV_NAMES:
                top[key] = value
    retry = {k[len("retry_") :]: top.pop(k) for k in list(top) if k.startswith("retry_")}
    if "source_deadline" in top:
        retry["source_deadline"] = top.pop("source_deadline")
    cache = {key: top.pop(name) for name, key in CACHE_KEYS.items() if name in top}
    if environ is not None and "dir" not in cache:
        cache["dir"] = default_cache_dir(environ)
    return top, retry, cache


# -- the light checks ---------------------------------------------------------------------------


class Unsure(Exception):
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
            raise Unsure
        if (gt is not None and not number > gt) or (ge is not None and not number >= ge):
            raise Unsure
        if le is not None and not number <= le:
            raise Unsure
        return number

    return check


def _flag(value: Any) -> bool:
    if type(value) is bool:
        return value
    if isinstance(value, str):
        low = value.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
    raise Unsure


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return split_csv(value)
    if isinstance(value, tuple | list) and all(type(v) is str for v in value):
        return tuple(value)
    raise Unsure


def _choice(*allowed: str) -> _Check:
    def check(value: Any) -> str:
        if type(value) is str and value in allowed:
            return value
        raise Unsure

    return check


def _size(value: Any) -> int:
    if type(value) is int and value >= 0:
        return value
    if not isinstance(value, str):
        raise Unsure
    try:
        return parse_size(value)
    except ValueError:
        raise Unsure from None


def _optional_size(value: Any) -> int | None:
    return None if value is None else _size(value)


def _directory(value: Any) -> Path:
    if isinstance(value, str | os.PathLike) and os.fspath(value):
        return Path(value).expanduser()
    raise Unsure


def _paths(value: Any) -> tuple[Path, ...]:
    parts = split_csv(value) if isinstance(value, str) else value
    if isinstance(parts, tuple | list) and all(isinstance(v, str | os.PathLike) and os.fspath(v) for v in parts):
        return tuple(Path(v) for v in parts)
    raise Unsure


def _nested(cls: type) -> _Check:
    def check(value: Any) -> Any:
        if type(value) is cls:
            return value
        if isinstance(value, Mapping):
            return light(cls, value)
        if _is_pydantic_twin(value, cls):
            return light(cls, {f.name: getattr(value, f.name) for f in dataclasses.fields(cls)})
        raise Unsure

    return check


def _is_pydantic_twin(value: Any, cls: type) -> bool:
    names = {"RetrySettings": "RetryPolicy", "CacheSettings": "CacheConfig"}
    return type(value).__name__ == names.get(cls.__name__) and type(value).__module__ == "model_loader.config"


CHECKS: dict[type, dict[str, _Check]] = {
    RetrySettings: {
        "attempts": _number(int, ge=1, le=100),
        "initial_backoff": _number(float, ge=0),
        "max_backoff": _number(float, ge=0),
        "jitter": _number(float, ge=0),
        "source_deadline": _number(float, gt=0),
    },
    CacheSettings: {
        "dir": _directory,
        "max_size": _optional_size,
        "verify": _choice("fast", "full"),
        "lock_timeout": _number(float, gt=0),
        "min_free": _size,
        "memory_items": _number(int, ge=0),
        "tiers": _paths,
        "promote": _choice("link", "copy", "off"),
        "shared": _flag,
    },
    Settings: {
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
        "retry": _nested(RetrySettings),
        "cache": _nested(CacheSettings),
    },
}


def light(cls: type[Any], given: Mapping[str, Any]) -> Any:
    """``cls`` (a settings dataclass) from ``given``, every value checked; ``Unsure`` when
    pydantic must judge."""
    checks = CHECKS[cls]
    values: dict[str, Any] = {}
    for name, value in given.items():
        check = checks.get(name)
        if check is None:
            raise Unsure  # not a field: pydantic names it
        values[name] = check(value)
    return cls(**values)


def light_from_env(environ: Mapping[str, str] | None, overrides: Mapping[str, Any]) -> Settings:
    """The settings from the environment and ``overrides``, or ``Unsure``."""
    top, retry, cache = read_env(environ)
    data: dict[str, Any] = dict(top)
    if retry:
        data["retry"] = light(RetrySettings, retry)
    if cache:
        data["cache"] = light(CacheSettings, cache)
    data.update(overrides)
    settings: Settings = light(Settings, data)
    return settings


def settings_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings | LoaderConfig:
    """What the loader reads: plain :class:`Settings` when every value is plain, else a
    validated :class:`~model_loader.config.LoaderConfig` (whose errors name the field).

    Raises:
        pydantic.ValidationError: A value is invalid.
    """
    try:
        return light_from_env(environ, overrides)
    except Unsure:
        from model_loader.config import LoaderConfig

        return LoaderConfig.from_env(environ, **overrides)
