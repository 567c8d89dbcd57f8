"""A small HTTP/1.1 client for MLflow's REST API, on the standard library only.

Why not ``requests``: importing it costs ~75 ms and mlflow's session adds retries we must
not have; ``urllib3`` is not a dependency of the core package. This client keeps a few
idle keep-alive connections per host, applies a connect timeout and a separate read
timeout, and never retries on its own: the only exception is a pooled connection the
server closed while it sat idle (the request is re-sent once on a fresh connection, as
urllib3 does), because that is not a failure of the server.

Errors leave as ``OSError`` (refused, reset, timeouts), ``http.client.HTTPException`` or
:class:`HttpStatusError`; the MLflow source's ``_map_errors`` translates them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

if TYPE_CHECKING:
    import ssl

__all__ = ["Endpoint", "HttpStatusError", "RestTransport", "TlsSettings"]

_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_ERROR_BODY_LIMIT = 64 * 1024
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a REST API lives: scheme, host, port and an optional path prefix."""

    scheme: str
    host: str
    port: int
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Parse ``http(s)://[user:pass@]host[:port][/prefix]``; credentials are dropped."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {redact_url(url)!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        return cls(scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    def with_netloc(self, netloc: str) -> Endpoint:
        """The same scheme and prefix on another ``host[:port]``."""
        parts = urlsplit(f"{self.scheme}://{netloc}")
        if not parts.hostname:
            raise ValueError(f"no host in {netloc!r}")
        return Endpoint(self.scheme, parts.hostname, parts.port or self.port, self.prefix)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


def redact_url(url: str) -> str:
    """``url`` without userinfo, query or fragment (safe to log and to use as an identity)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}".rstrip("/") if parts.scheme else url


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


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS options, as MLflow's ``MLFLOW_TRACKING_INSECURE_TLS`` / ``..._SERVER_CERT_PATH`` /
    ``..._CLIENT_CERT_PATH`` define them."""

    verify: bool = True
    ca_path: str | None = None
    client_cert_path: str | None = None

    def context(self) -> ssl.SSLContext:
        import ssl

        if self.ca_path and os.path.isdir(self.ca_path):
            ctx = ssl.create_default_context(capath=self.ca_path)
        else:
            ctx = ssl.create_default_context(cafile=self.ca_path or None)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.client_cert_path:
            ctx.load_cert_chain(self.client_cert_path)
        return ctx


@dataclass(slots=True)
class _Pool:
    idle: list[http.client.HTTPConnection] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RestTransport:
    """GET/POST JSON and streamed downloads with connect/read timeouts and keep-alive.

    Args:
        authorization: The ``Authorization`` header value, sent only to ``auth_origins``.
        auth_origins: ``(scheme, host, port)`` of the tracking and registry servers.
        connect_timeout: Seconds to open a connection (TLS handshake included).
        read_timeout: Seconds to wait for bytes once connected.
        max_idle: Idle connections kept per host.
        tls: TLS settings for https endpoints.
    """

    def __init__(
        self,
        *,
        authorization: str | None,
        auth_origins: frozenset[tuple[str, str, int]],
        connect_timeout: float,
        read_timeout: float,
        max_idle: int,
        tls: TlsSettings,
    ) -> None:
        self.__authorization = authorization  # name-mangled: kept out of reprs and tracebacks' locals
        self._auth_origins = auth_origins
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max(1, max_idle)
        self._tls = tls
        self._ssl_context: ssl.SSLContext | None = None
        self._default_ssl_context: ssl.SSLContext | None = None
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RestTransport(connect_timeout={self._connect_timeout}, read_timeout={self._read_timeout})"

    # -- connections --------------------------------------------------------------------

    def _context(self, ep: Endpoint) -> ssl.SSLContext:
        """The tracking server's TLS settings for its origins; system defaults elsewhere
        (presigned storage URLs), as MLflow does."""
        ours = ep.origin in self._auth_origins
        with self._lock:
            if ours and self._ssl_context is None:
                self._ssl_context = self._tls.context()
            if not ours and self._default_ssl_context is None:
                self._default_ssl_context = TlsSettings().context()
            context = self._ssl_context if ours else self._default_ssl_context
            assert context is not None
            return context

    def _connect(self, ep: Endpoint) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if ep.scheme == "https":
            context = self._context(ep)
            conn = http.client.HTTPSConnection(ep.host, ep.port, timeout=self._connect_timeout, context=context)
        else:
            conn = http.client.HTTPConnection(ep.host, ep.port, timeout=self._connect_timeout)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self._read_timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def _pool(self, ep: Endpoint) -> _Pool:
        with self._lock:
            if self._closed:
                raise ConnectionAbortedError("the MLflow source is closed")
            return self._pools.setdefault(ep.origin, _Pool())

    def _acquire(self, ep: Endpoint) -> tuple[http.client.HTTPConnection, bool]:
        pool = self._pool(ep)
        with pool.lock:
            if pool.idle:
                return pool.idle.pop(), True
        return self._connect(ep), False

    def _release(self, ep: Endpoint, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        if resp.isclosed() and not resp.will_close and not self._closed:
            pool = self._pool(ep)
            with pool.lock:
                if len(pool.idle) < self._max_idle:
                    pool.idle.append(conn)
                    return
        conn.close()

    def _headers(self, ep: Endpoint, extra: Mapping[str, str]) -> dict[str, str]:
        headers = {"User-Agent": "model-loader", "Accept-Encoding": "identity", **extra}
        if self.__authorization and ep.origin in self._auth_origins:
            headers["Authorization"] = self.__authorization
        return headers

    def _send(
        self, ep: Endpoint, method: str, target: str, body: bytes | None, headers: Mapping[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn, reused = self._acquire(ep)
        while True:
            try:
                conn.request(method, ep.prefix + target, body=body, headers=self._headers(ep, headers))
                _quickack(conn)
                return conn, conn.getresponse()
            except _STALE:
                conn.close()
                if not reused:
                    raise
                conn, reused = self._connect(ep), False  # the server closed an idle keep-alive connection
            except BaseException:
                conn.close()
                raise

    # -- requests -----------------------------------------------------------------------

    def get_json(self, ep: Endpoint, path: str, params: Mapping[str, str | list[str]] | None = None) -> dict[str, Any]:
        """GET ``path?params`` and decode the JSON answer."""
        target = path + ("?" + urlencode(params, doseq=True, quote_via=quote) if params else "")
        return self._json(ep, "GET", target, None, path)

    def post_json(self, ep: Endpoint, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """POST a JSON body to ``path`` and decode the JSON answer."""
        return self._json(ep, "POST", path, json.dumps(payload).encode(), path)

    def _json(self, ep: Endpoint, method: str, target: str, body: bytes | None, what: str) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn, resp = self._send(ep, method, target, body, headers)
        try:
            data = resp.read()
        except BaseException:
            conn.close()
            raise
        self._release(ep, conn, resp)
        if resp.status != 200:
            raise _status_error(resp.status, data, what)
        try:
            decoded = json.loads(data or b"{}")
        except ValueError:
            raise HttpStatusError(200, "BAD_RESPONSE", "the answer is not JSON", what) from None
        if not isinstance(decoded, dict):
            raise HttpStatusError(200, "BAD_RESPONSE", "the answer is not a JSON object", what)
        return decoded

    @contextlib.contextmanager
    def stream(
        self, ep: Endpoint, path: str, *, headers: Mapping[str, str] | None = None, what: str | None = None
    ) -> Iterator[http.client.HTTPResponse]:
        """GET ``path`` and yield the open response (status 200) to read from.

        ``what`` names the request in errors instead of ``path`` (a presigned URL's query
        is a credential).
        """
        conn, resp = self._send(ep, "GET", path, None, headers or {})
        done = False
        try:
            if resp.status != 200:
                raise _status_error(resp.status, resp.read(_ERROR_BODY_LIMIT), what or path)
            yield resp
            done = resp.isclosed()
        finally:
            if done:
                self._release(ep, conn, resp)
            else:
                conn.close()

    def close(self) -> None:
        """Close every idle connection; later requests fail. Idempotent."""
        with self._lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            with pool.lock:
                idle, pool.idle = pool.idle, []
            for conn in idle:
                conn.close()


def _quickack(conn: http.client.HTTPConnection) -> None:
    """Acknowledge the answer at once (Linux ``TCP_QUICKACK``).

    A server that writes headers and body separately without ``TCP_NODELAY`` (uvicorn
    with several workers, as ``mlflow server --workers N`` runs it) waits for our ACK of
    the headers before sending the body, and on a reused connection Linux delays that ACK
    by 40 ms: every registry call took ~48 ms instead of ~5 ms.
    """
    if _TCP_QUICKACK is not None and conn.sock is not None:
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def _status_error(status: int, body: bytes, what: str) -> HttpStatusError:
    code, message = "", ""
    try:
        decoded = json.loads(body)
        if isinstance(decoded, dict):
            code = str(decoded.get("error_code", ""))
            message = str(decoded.get("message", ""))
    except ValueError:
        message = body[:200].decode("utf-8", "replace").strip()
    return HttpStatusError(status, code, message, what)
