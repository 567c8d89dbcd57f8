"""Translation of fsspec, aiohttp and backend SDK errors into :mod:`model_loader.errors`.

The one place it happens (:func:`map_errors`). No backend module is imported here: errors
are recognised by the builtin they derive from (``FileNotFoundError``, ``PermissionError``,
``TimeoutError``, ``ConnectionError``) and by the HTTP status they carry (aiohttp's
``status``, requests' and huggingface_hub's ``response.status_code``, gcsfs's ``code``,
azure-core's ``status_code``). Messages never carry a URL's query string or user info
(signed URLs, tokens): see :func:`redact`.
"""

from __future__ import annotations

import asyncio
import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from model_loader._deadline import Deadline
from model_loader.errors import (
    AccessDeniedError,
    CacheError,
    ModelLoaderError,
    ModelNotFoundError,
    SourceError,
    SourceTimeoutError,
    SourceUnavailableError,
    StaleResolutionError,
)

__all__ = ["Missing", "disk_error", "map_errors", "redact", "status_of"]

Missing = Literal["not-found", "stale"]
"""What a missing object means: resolving (the model is not there) or fetching (the
object resolve pinned is gone or was replaced: resolve again)."""

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)([^\s/'\"<>@]*@)?([^\s?#'\"<>]*)([?#][^\s'\"<>]*)?")
_NOT_FOUND_NAMES = frozenset(
    {"RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError", "ResourceNotFoundError"}
)
_DENIED_NAMES = frozenset({"GatedRepoError", "ClientAuthenticationError", "DisabledRepoError"})
_TRANSIENT_ERRNO = frozenset(
    {errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH}
)
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def redact(text: str) -> str:
    """``text`` with every URL's user info and query string replaced (signed URLs, tokens)."""

    def one(match: re.Match[str]) -> str:
        scheme, userinfo, rest, query = match.groups()
        return scheme + ("<redacted>@" if userinfo else "") + rest + ("?<redacted>" if query else "")

    return _URL.sub(one, text)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, if any (without importing its library)."""
    for holder in (exc, getattr(exc, "response", None)):
        if holder is None:
            continue
        for attr in ("status", "status_code", "code"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
                return value
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes, outermost first (bounded: causes can form loops)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _classify(exc: BaseException) -> str | None:
    """``"not-found"``, ``"denied"``, ``"stale"``, ``"timeout"``, ``"unavailable"`` or None."""
    name = type(exc).__name__
    status = status_of(exc)
    if name in _NOT_FOUND_NAMES or status in (404, 410):
        return "not-found"
    if name in _DENIED_NAMES or status in (401, 403, 407):
        return "denied"
    if status in (412, 416):
        return "stale"
    if status is not None and (status >= 500 or status in (408, 425, 429)):
        return "unavailable"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or "Timeout" in name:
        return "timeout"
    if isinstance(exc, PermissionError):
        return "denied"
    if isinstance(exc, FileNotFoundError):
        return "not-found"
    if isinstance(exc, ConnectionError) or name in ("ClientPayloadError", "ServerDisconnectedError", "EOFError"):
        return "unavailable"
    if "Connect" in name or "Connection" in name or "Disconnected" in name or "ProxyError" in name:
        return "unavailable"  # aiohttp.ClientConnectorError, requests.ConnectionError, asyncssh...
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return "unavailable"
    if status is not None:
        return "client-error"
    return None


def _describe(exc: BaseException) -> str:
    status = status_of(exc)
    if status is not None:
        # never str(exc): aiohttp and requests put the full (possibly signed) URL in it
        reason = getattr(exc, "message", None) or getattr(exc, "reason", None)
        text = f"HTTP {status}" + (f" {reason}" if isinstance(reason, str) and len(reason) < 200 else "")
        return redact(text)
    detail = str(exc)
    return redact(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)


@contextmanager
def map_errors(
    what: str, scheme: str, ref: str, deadline: Deadline, *, missing: Missing = "not-found"
) -> Iterator[None]:
    """Translate whatever a backend call raises into a :class:`SourceError` subclass.

    A ``FileNotFoundError`` caused by a server error or a refused connection is that
    error, not a missing file (fsspec's HTTP ``info`` turns every failure into
    ``FileNotFoundError``). Errors this package raised pass unchanged.
    """
    try:
        yield
    except ModelLoaderError:
        raise
    except Exception as exc:
        raise translate(exc, what, scheme, ref, deadline, missing=missing) from exc


def translate(
    exc: BaseException, what: str, scheme: str, ref: str, deadline: Deadline, *, missing: Missing = "not-found"
) -> SourceError:
    """The :class:`SourceError` for ``exc`` (see :func:`map_errors`)."""
    kinds = [(k, e) for e in _chain(exc) if (k := _classify(e)) is not None]
    # the most specific cause wins over a wrapper: FileNotFoundError(url) from ClientResponseError(500)
    kind, culprit = kinds[-1] if kinds else (None, exc)
    if kinds and kinds[0][0] != "not-found":
        kind, culprit = kinds[0]
    message = f"{what}: {_describe(culprit)}"
    if kind == "timeout" or (kind == "unavailable" and deadline.expired()):
        if deadline.expired():
            return deadline.error(what, scheme=scheme, ref=ref)
        return SourceTimeoutError(message, scheme=scheme, ref=ref)
    if kind == "not-found":
        if missing == "stale":
            return StaleResolutionError(
                f"{message} (it changed or was deleted since it was resolved)", scheme=scheme, ref=ref
            )
        return ModelNotFoundError(message, scheme=scheme, ref=ref)
    if kind == "denied":
        return AccessDeniedError(message, scheme=scheme, ref=ref)
    if kind == "stale":
        return StaleResolutionError(f"{message} (the object changed since it was resolved)", scheme=scheme, ref=ref)
    if kind == "unavailable":
        return SourceUnavailableError(message, scheme=scheme, ref=ref)
    return SourceError(message, scheme=scheme, ref=ref)


def disk_error(exc: OSError, what: str) -> CacheError:
    """An error writing the staging directory: the cache's problem, not the source's."""
    if exc.errno in _FULL:
        return CacheError(f"no space left {what}: {exc.strerror}")
    return CacheError(f"cannot write {what}: {exc.strerror or exc}")
