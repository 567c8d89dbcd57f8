"""Translating everything the MLflow source's backends raise into :mod:`model_loader.errors`.

The leaf of the package: it imports nothing of the package. The other modules raise the
small internal exceptions defined here (an HTTP status, a lookup that found nothing, a
malformed answer, a refused location, a listing that changed), and the sources wrap
every call in :func:`map_errors` (their one ``_map_errors``), which also translates socket
and TLS errors, ``MlflowException`` and SQLAlchemy errors from the ``MlflowClient`` path
(recognised by module and ``error_code``, so mlflow is never imported here), and the
errors of the source an artifact location was routed to, re-tagged with the
reference's scheme.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import ssl
from collections.abc import Iterator
from typing import NoReturn

from model_loader._types import ModelRef
from model_loader.errors import (
    AccessDeniedError,
    InvalidResponseError,
    MissingDependencyError,
    ModelLoaderError,
    ModelNotFoundError,
    SourceError,
    SourceTimeoutError,
    SourceUnavailableError,
    StaleResolutionError,
)

__all__ = [
    "ArtifactsMissing",
    "DatabaseUnavailable",
    "HttpStatusError",
    "LocalArtifactsRefused",
    "MalformedResponse",
    "NotFound",
    "ProxyConfigError",
    "StaleListing",
    "backend_error_class",
    "http_error_class",
    "map_errors",
]

logger = logging.getLogger("model_loader.sources.mlflow")

_BACKEND_MODULES = ("mlflow", "requests", "urllib3", "sqlalchemy", "botocore", "boto3", "google", "azure")
_UNAVAILABLE_CODES = {
    "TEMPORARILY_UNAVAILABLE",
    "INTERNAL_ERROR",
    "REQUEST_LIMIT_EXCEEDED",
    "ABORTED",
    "DEADLINE_EXCEEDED",
}
_DENIED_CODES = {"PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "UNAUTHORIZED"}
_STORE_TLS_HINT = (
    " (the store's certificate is not trusted: point AWS_CA_BUNDLE at its CA bundle, or for an s3:// store "
    "set MLFLOW_S3_IGNORE_TLS=true)"
)
_TLS_HINT = (
    " (the server's certificate is not trusted: point MLFLOW_TRACKING_SERVER_CERT_PATH at its CA bundle, "
    "or set MLFLOW_TRACKING_INSECURE_TLS=true)"
)
_NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}


class HttpStatusError(Exception):
    """The server answered with a status other than 200.

    Attributes:
        status: The HTTP status code.
        error_code: MLflow's ``error_code`` from a JSON error body (``RESOURCE_DOES_NOT_EXIST``), or ``""``.
        message: MLflow's ``message``, or the start of the body.
    """

    def __init__(self, status: int, error_code: str, message: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status} {error_code} {message}".rstrip())
        self.status = status
        self.error_code = error_code
        self.message = message


class NotFound(LookupError):
    """A lookup found nothing (no version in that stage); mapped to ModelNotFoundError."""


class ArtifactsMissing(LookupError):
    """The location holds no files (deleted artifacts) or none pass include/exclude."""


class DatabaseUnavailable(ConnectionError):
    """The registry's sqlite file is missing or unreadable; mapped to SourceUnavailableError."""


class MalformedResponse(Exception):
    """An answer that does not parse against its schema, or breaks a bound (size, count,
    depth, a listing that contains itself); mapped to InvalidResponseError."""


class LocalArtifactsRefused(PermissionError):
    """A remote registry named a local path as a version's artifacts; mapped to AccessDeniedError."""


class ProxyConfigError(Exception):
    """A proxy variable this client cannot honour (a SOCKS or https:// proxy, no host); mapped
    to SourceError (permanent: a setting to change)."""


class StaleListing(Exception):
    """The artifacts changed between resolve and fetch; mapped to StaleResolutionError."""


@contextlib.contextmanager
def map_errors(identity: str, ref: ModelRef, what: str) -> Iterator[None]:
    """Translate every backend error into :mod:`model_loader.errors` (the only place)."""
    scheme = ref.scheme

    def fail(cls: type[SourceError], message: str, exc: BaseException) -> NoReturn:
        raise cls(f"{what} {ref.uri} ({identity}): {message}", scheme=scheme, ref=ref.uri) from exc

    try:
        yield
    except SourceError as exc:
        if exc.scheme == scheme and exc.ref == ref.uri:
            raise
        hint = _STORE_TLS_HINT if "certificate verify failed" in str(exc).lower() else ""
        fail(type(exc), f"artifact store: {exc}{hint}", exc)  # from a routed store: keep the kind, tag it as ours
    except ModelLoaderError:
        raise  # IntegrityError, CacheError, MissingDependencyError: already ours
    except ImportError as exc:  # mlflow-skinny without sqlalchemy for a sqlite store, a missing SDK
        missing = f"the module {exc.name!r}" if exc.name else "a package"
        raise MissingDependencyError(
            f"{what} {ref.uri} ({identity}) needs {missing}, which is not installed ({exc}); "
            "pip install 'model-loader[mlflow]' (a sqlite or file store needs the full 'mlflow' package)",
            extra="mlflow",
        ) from exc
    except StaleListing as exc:
        fail(StaleResolutionError, str(exc), exc)
    except ProxyConfigError as exc:
        fail(SourceError, str(exc), exc)
    except HttpStatusError as exc:
        fail(http_error_class(exc), str(exc), exc)
    except (NotFound, ArtifactsMissing) as exc:
        fail(ModelNotFoundError, str(exc), exc)
    except MalformedResponse as exc:
        fail(InvalidResponseError, f"malformed answer: {exc}", exc)
    except LocalArtifactsRefused as exc:
        fail(AccessDeniedError, str(exc), exc)
    except TimeoutError as exc:
        fail(SourceTimeoutError, f"timed out: {exc or type(exc).__name__}", exc)
    except ssl.SSLCertVerificationError as exc:
        fail(SourceUnavailableError, f"TLS: {exc.verify_message or exc}{_TLS_HINT}", exc)
    except (ConnectionError, http.client.HTTPException) as exc:
        fail(SourceUnavailableError, f"{type(exc).__name__}: {exc}", exc)
    except PermissionError as exc:
        fail(AccessDeniedError, f"permission denied: {exc}", exc)
    except FileNotFoundError as exc:
        fail(ModelNotFoundError, f"artifacts missing: {exc}", exc)
    except OSError as exc:  # unreachable host or network, TLS failures, DNS
        fail(SourceUnavailableError, f"{type(exc).__name__}: {exc}", exc)
    except (LookupError, ValueError, TypeError, RecursionError) as exc:
        # Every REST answer is parsed against a schema first, so these mean a shape nothing
        # checked (an MlflowClient entity, an odd location) or a bug: typed and degradable
        # rather than bare, and logged with its traceback so a bug still shows.
        logger.warning("unexpected %s in %s %s (%s)", type(exc).__name__, what, ref.uri, identity, exc_info=True)
        fail(InvalidResponseError, f"unexpected answer or a bug ({type(exc).__name__}: {exc})", exc)
    except Exception as exc:
        if not type(exc).__module__.startswith(_BACKEND_MODULES):
            raise  # a bug of ours: let it show
        fail(backend_error_class(exc), f"{type(exc).__name__}: {exc}", exc)


def http_error_class(exc: HttpStatusError) -> type[SourceError]:
    status, code = exc.status, exc.error_code
    if status in (401, 403, 407) or code in _DENIED_CODES:
        return AccessDeniedError
    if code in _NOT_FOUND_CODES or (status == 400 and "not found" in exc.message.lower()):
        return ModelNotFoundError
    if status == 504 or code == "DEADLINE_EXCEEDED":
        return SourceTimeoutError
    if status in (408, 429) or status >= 500 or code in _UNAVAILABLE_CODES:
        return SourceUnavailableError
    return SourceError  # 3xx (not followed), other 4xx: permanent


def backend_error_class(exc: Exception) -> type[SourceError]:
    code = str(getattr(exc, "error_code", "") or "")
    name = type(exc).__name__
    if code in _DENIED_CODES:
        return AccessDeniedError
    if code in _NOT_FOUND_CODES or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc).lower()):
        return ModelNotFoundError
    if "Timeout" in name or code == "DEADLINE_EXCEEDED":
        return SourceTimeoutError
    if code in _UNAVAILABLE_CODES or "Connection" in name or name in ("OperationalError", "DisconnectionError"):
        return SourceUnavailableError
    return SourceError
