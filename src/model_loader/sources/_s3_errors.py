"""Translation of botocore/urllib3 errors into :mod:`model_loader.errors`: the one place it happens.

botocore is imported inside :func:`translate` (it is loaded by then: a client exists),
never at module import.
"""

from __future__ import annotations

import errno
import http.client
import re
from collections.abc import Iterator
from contextlib import contextmanager

from model_loader.errors import (
    AccessDeniedError,
    CacheError,
    IntegrityError,
    InvalidReferenceError,
    InvalidResponseError,
    ModelLoaderError,
    ModelNotFoundError,
    SourceError,
    SourceTimeoutError,
    SourceUnavailableError,
    StaleResolutionError,
)

__all__ = ["disk_error", "map_errors", "scrub", "translate"]

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_SIGNED = re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+")


def scrub(text: str) -> str:
    """``text`` without URL credentials or request signatures (SDK messages quote endpoint URLs)."""
    return _SIGNED.sub(r"\1***", _USERINFO.sub("***@", text))


_NOT_FOUND = frozenset({"NoSuchBucket", "NoSuchKey", "NoSuchVersion", "NotFound", "404"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "ExpiredToken",
        "Forbidden",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "401",
        "403",
    }
)
_STALE = frozenset({"PreconditionFailed", "InvalidRange", "412", "416"})
_TIMEOUT = frozenset({"RequestTimeout"})
_TRANSIENT = frozenset(
    {
        "InternalError",
        "OperationAborted",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
    }
)


def translate(exc: BaseException, what: str, uri: str) -> ModelLoaderError | None:
    """The model_loader error for an SDK, network or disk error; ``None`` if it is none of those.

    Args:
        exc: The exception raised by boto3, botocore, urllib3 or the OS.
        what: The operation and object, for the message (``"GET s3://b/k"``); never a URL
            with a signature.
        uri: The model reference, stored on the error.
    """
    if isinstance(exc, ModelLoaderError):
        return exc
    from botocore import exceptions as bce

    kw = {"scheme": "s3", "ref": uri}
    if isinstance(exc, bce.ClientError):
        return _client_error(exc, what, kw)
    text = scrub(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, (bce.ConnectTimeoutError, bce.ReadTimeoutError)):
        return SourceTimeoutError(text, **kw)
    if isinstance(exc, (bce.FlexibleChecksumError, bce.ChecksumError)):
        return IntegrityError(f"{what}: the S3 checksum does not match the bytes received: {exc}")
    if isinstance(
        exc,
        (
            bce.NoCredentialsError,
            bce.PartialCredentialsError,
            bce.CredentialRetrievalError,
            bce.ProfileNotFound,
            bce.TokenRetrievalError,
            bce.NoAuthTokenError,
        ),
    ):
        return AccessDeniedError(f"{what}: no usable AWS credentials: {exc}", **kw)
    if isinstance(exc, bce.ParamValidationError):
        return InvalidReferenceError(f"{what}: {exc}")
    if type(exc).__name__ == "ResponseParserError":  # botocore.parsers: XML that does not parse
        return InvalidResponseError(f"{what}: malformed response: {exc}", **kw)
    if isinstance(exc, (bce.HTTPClientError, bce.ConnectionError, bce.IncompleteReadError)):
        return SourceUnavailableError(text, **kw)
    if isinstance(exc, bce.BotoCoreError):
        return SourceError(text, **kw)
    return _transport_error(exc, text, kw)


def _client_error(exc: BaseException, what: str, kw: dict[str, str]) -> ModelLoaderError:
    response = getattr(exc, "response", {}) or {}
    error = response.get("Error", {}) or {}
    code = str(error.get("Code") or "")
    status = int((response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
    detail = str(error.get("Message") or "")[:500]
    text = scrub(f"{what}: {code or status}" + (f" ({detail})" if detail else ""))
    if code in _NOT_FOUND or status == 404:
        return ModelNotFoundError(text, **kw)
    if code in _DENIED or status in (401, 403):
        return AccessDeniedError(text, **kw)
    if code in _STALE or status in (412, 416):
        return StaleResolutionError(f"{text}: the object changed since it was resolved", **kw)
    if code in _TIMEOUT or status == 408:
        return SourceTimeoutError(text, **kw)
    if code in _TRANSIENT or status >= 500 or status == 429:
        return SourceUnavailableError(text, **kw)
    return SourceError(text, **kw)


def _transport_error(exc: BaseException, text: str, kw: dict[str, str]) -> ModelLoaderError | None:
    from urllib3.exceptions import HTTPError as Urllib3Error  # botocore depends on urllib3
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    if isinstance(exc, (TimeoutError, Urllib3Timeout)):
        return SourceTimeoutError(text, **kw)
    if isinstance(exc, (ConnectionError, Urllib3Error, http.client.HTTPException)):
        return SourceUnavailableError(text, **kw)
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return CacheError(f"no space left while writing the model: {exc.strerror}")
    return None


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_error(exc: OSError, what: str) -> CacheError:
    """The error for a failed write (or read-back) in the staging directory: the cache's, never the source's."""
    if exc.errno in _NO_SPACE:
        return CacheError(f"no space left while {what}: {exc.strerror}")
    return CacheError(f"cannot write the model while {what}: {exc.strerror or exc}")


@contextmanager
def map_errors(what: str, uri: str) -> Iterator[None]:
    """Re-raise SDK, network and disk-full errors as model_loader errors (``raise X from exc``).

    Example:
        >>> with map_errors("LIST s3://bucket/prefix/", "s3://bucket/prefix/"):
        ...     pass
    """
    try:
        yield
    except ModelLoaderError:
        raise
    except Exception as exc:
        mapped = translate(exc, what, uri)
        if mapped is None:
            raise
        raise mapped from exc
