"""MLflow's environment variables, read once when a source is built (never at import).

Each function reads one concern from the mapping the source was given (``os.environ``
by default) and checks it, so a value MLflow would misread is refused at once with a
message that shows the fix: a scheme-less tracking URI (``127.0.0.1:5000``), a boolean
that is not ``true``/``false``/``1``/``0``, a timeout that is not a positive number.
:data:`VARIABLES` lists every MLflow variable the source honours and those it does not
(docs/mlflow.md renders the same table; a test keeps the two in step).
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from model_loader.errors import SourceError
from model_loader.sources.mlflow._http import TlsSettings
from model_loader.sources.mlflow._proxy import ProxySettings

__all__ = [
    "VARIABLES",
    "authorization",
    "check_uri",
    "flag",
    "plugin_auth",
    "proxies",
    "request_timeout",
    "s3_options",
    "tls",
]

VARIABLES: dict[str, bool] = {
    # honoured
    "MLFLOW_TRACKING_URI": True,
    "MLFLOW_REGISTRY_URI": True,
    "MLFLOW_TRACKING_USERNAME": True,
    "MLFLOW_TRACKING_PASSWORD": True,
    "MLFLOW_TRACKING_TOKEN": True,
    "MLFLOW_TRACKING_INSECURE_TLS": True,
    "MLFLOW_TRACKING_SERVER_CERT_PATH": True,
    "MLFLOW_TRACKING_CLIENT_CERT_PATH": True,
    "MLFLOW_HTTP_REQUEST_TIMEOUT": True,
    "MLFLOW_S3_ENDPOINT_URL": True,
    "MLFLOW_S3_IGNORE_TLS": True,
    "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE": True,
    "MLFLOW_TRACKING_AUTH": True,
    "MLFLOW_TRACKING_AWS_SIGV4": True,
    "HTTP_PROXY": True,
    "HTTPS_PROXY": True,
    "ALL_PROXY": True,
    "NO_PROXY": True,
    # not honoured (docs/mlflow.md says why)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": False,
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": False,
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": False,
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": False,
    "MLFLOW_HTTP_POOL_CONNECTIONS": False,
    "MLFLOW_HTTP_POOL_MAXSIZE": False,
    "MLFLOW_DOWNLOAD_CHUNK_TIMEOUT": False,
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": False,
    "MLFLOW_MULTIPART_DOWNLOAD_CHUNK_SIZE": False,
    "MLFLOW_S3_EXPECTED_BUCKET_OWNER": False,
    "MLFLOW_WORKSPACE": False,
    "MLFLOW_TRACKING_DIR": False,
}
"""Every MLflow variable the REST path considers: ``True`` if honoured."""

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]{2,}):(\d{1,5})(/.*)?$")
_SCHEME = "models"


def _fail(message: str) -> SourceError:
    return SourceError(message, scheme=_SCHEME)


def flag(env: Mapping[str, str], name: str) -> bool:
    """An MLflow boolean variable: ``true``/``1`` or ``false``/``0`` (any case), unset is false.

    Raises:
        SourceError: Any other value (MLflow refuses it too).
    """
    value = (env.get(name) or "").strip().lower()
    if value in ("", "false", "0"):
        return False
    if value in ("true", "1"):
        return True
    raise _fail(f"{name}={env.get(name)!r} is not a boolean: set it to true, false, 1 or 0")


def check_uri(name: str, uri: str) -> str:
    """``uri`` stripped, or a refusal of a ``host:port`` without a scheme.

    MLflow reads ``127.0.0.1:5000`` as a local directory and ``localhost:5000`` as a store
    of scheme ``localhost``: neither is the server meant.

    Raises:
        SourceError: The URI is ``host:port`` without ``http://``; the message shows the fix.
    """
    text = uri.strip()
    match = _HOST_PORT.match(text)
    if match is not None and not text.lower().startswith(("sqlite:", "file:", "databricks")):
        raise _fail(
            f"{name}={text!r} has no scheme, so MLflow would not read it as a server: "
            f"write {name}=http://{text} (or https://{text})"
        )
    return text


def plugin_auth(env: Mapping[str, str]) -> bool:
    """MLflow's plug-in authentication is configured (the source then uses ``MlflowClient``)."""
    return bool((env.get("MLFLOW_TRACKING_AUTH") or "").strip()) or flag(env, "MLFLOW_TRACKING_AWS_SIGV4")


def authorization(env: Mapping[str, str], url: str) -> str | None:
    """The ``Authorization`` header MLflow itself would send (Basic before Bearer)."""
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if not (user and password):
        file_user, file_password = _credentials_file()
        user, password = user or file_user, password or file_password
    if user and password:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    if token := env.get("MLFLOW_TRACKING_TOKEN"):
        return f"Bearer {token}"
    parts = urlsplit(url)
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        return "Basic " + base64.b64encode(pair.encode()).decode()
    return None


def _credentials_file() -> tuple[str | None, str | None]:
    path = os.path.expanduser("~/.mlflow/credentials")
    if not os.path.isfile(path):
        return None, None
    import configparser

    config = configparser.ConfigParser()
    config.read(path)
    if "mlflow" not in config:
        return None, None
    section = config["mlflow"]
    return section.get("mlflow_tracking_username"), section.get("mlflow_tracking_password")


def tls(env: Mapping[str, str]) -> TlsSettings:
    """TLS for the tracking and registry servers."""
    return TlsSettings(
        verify=not flag(env, "MLFLOW_TRACKING_INSECURE_TLS"),
        ca_path=env.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None,
        client_cert_path=env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None,
    )


def proxies(env: Mapping[str, str]) -> ProxySettings:
    """``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY`` (lower case first)."""
    return ProxySettings.from_env(env)


def request_timeout(env: Mapping[str, str]) -> float | None:
    """``MLFLOW_HTTP_REQUEST_TIMEOUT`` in seconds, or ``None`` when unset.

    Raises:
        SourceError: Not a positive number.
    """
    raw = (env.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise _fail(f"MLFLOW_HTTP_REQUEST_TIMEOUT={raw!r} is not a positive number of seconds")
    return value


def s3_options(env: Mapping[str, str], endpoint_url: str | None) -> dict[str, Any]:
    """Keyword arguments for the S3 source of ``s3://`` artifact locations, as MLflow's
    S3 repository reads its variables (``MLFLOW_S3_ENDPOINT_URL``, ``MLFLOW_S3_IGNORE_TLS``,
    ``MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE``)."""
    options: dict[str, Any] = {}
    endpoint = endpoint_url or (env.get("MLFLOW_S3_ENDPOINT_URL") or "").strip() or None
    if endpoint:
        options["endpoint_url"] = endpoint
    if flag(env, "MLFLOW_S3_IGNORE_TLS"):
        options["verify"] = False
    style = (env.get("MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE") or "").strip().lower()
    if style in ("path", "virtual"):
        options["addressing_style"] = style
    elif style and style != "auto":
        raise _fail(f"MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE={style!r} is not path, virtual or auto")
    return options
