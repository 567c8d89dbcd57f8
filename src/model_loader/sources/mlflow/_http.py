"""A small HTTP/1.1 client for MLflow's REST API, on the standard library only.

Why not ``requests``: importing it costs ~75 ms and mlflow's session adds retries we must
not have; ``urllib3`` is not a dependency of the core package. This client keeps a few
idle keep-alive connections per host and never retries on its own: the only exception is
a pooled connection the server closed while it sat idle (the request is re-sent once on a
fresh connection, as urllib3 does), because that is not a failure of the server.

Time is one budget (a :class:`~model_loader._deadline.Deadline`, passed to every call):
the connect (TLS handshake included) takes at most ``min(connect_timeout, left)``; every
read from the socket, headers included, waits at most ``min(read_timeout, left)`` and is
re-armed before each ``recv``, so a server trickling one byte a second is cut when the
budget runs out, not only when it goes quiet. A JSON answer must also arrive whole within
``read_timeout`` and is read up to :data:`MAX_JSON_BYTES`.

Proxies (:mod:`._proxy`): a plain ``http`` request to a proxied host is sent to the proxy
with an absolute target; an ``https`` one goes through a ``CONNECT`` tunnel opened within
the connect budget, then TLS with the real host. Credentials for the tracking server
are never sent to the proxy, and the proxy's own (``Proxy-Authorization``) only to it.

Errors leave as ``OSError`` (refused, reset; ``TimeoutError`` for timeouts and the
budget), ``http.client.HTTPException``, :class:`HttpStatusError` or
:class:`MalformedResponse`; the MLflow source's ``_map_errors`` translates them.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlencode, urlsplit

from model_loader._deadline import Deadline
from model_loader.sources.mlflow._errors import HttpStatusError, MalformedResponse
from model_loader.sources.mlflow._proxy import Proxy, ProxySettings

if TYPE_CHECKING:
    import ssl

__all__ = [
    "MAX_JSON_BYTES",
    "Endpoint",
    "HttpStatusError",
    "RestTransport",
    "TlsSettings",
    "check_deadline",
    "redact_url",
]

MAX_JSON_BYTES = 16 * 1024 * 1024
"""The largest JSON answer read (a listing of 100,000 files is about 8 MiB)."""

_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_ERROR_BODY_LIMIT = 64 * 1024
_CONNECT_REPLY_LIMIT = 64 * 1024
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
_READ_BUFFER = 64 * 1024


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

    @property
    def netloc(self) -> str:
        """``host[:port]`` as a Host header or absolute URL names it (no default port)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


def redact_url(url: str) -> str:
    """``url`` without userinfo, query or fragment (safe to log and to use as an identity)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}".rstrip("/") if parts.scheme else url


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


def check_deadline(budget: Deadline, what: str) -> None:
    """Raise ``TimeoutError`` if ``budget`` has run out before ``what``."""
    if budget.expired():
        raise TimeoutError(f"{budget.what} expired before {what}")


def _left(budget: Deadline, cap: float) -> float:
    """Seconds one blocking socket call may take: ``cap`` or what is left of ``budget``."""
    left = budget.expires - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"{budget.what} expired")
    return min(cap, left)


@contextlib.contextmanager
def _timeout_names(budget: Deadline, cap: float, timeout: float, what: str) -> Iterator[None]:
    """Say which limit a socket timeout was: the budget, or ``cap`` (connect or read timeout)."""
    try:
        yield
    except TimeoutError:
        if timeout < cap:
            raise TimeoutError(f"{budget.what} expired") from None
        raise TimeoutError(f"{what} took longer than {cap:g}s") from None


class _BudgetReader(io.RawIOBase):
    """The socket as a raw stream whose every ``recv`` is capped by the connection's budget."""

    def __init__(self, conn: _Connection, owner: _BudgetSocket, sock: socket.socket) -> None:
        super().__init__()
        self._conn = conn
        self._owner = owner
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        budget, cap = self._conn.budget, self._conn.read_timeout
        timeout = _left(budget, cap)
        self._sock.settimeout(timeout)
        with _timeout_names(budget, cap, timeout, "waiting for the answer"):
            return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._owner.release()
        super().close()


class _BudgetSocket:
    """What ``http.client`` sees as ``conn.sock``: sends and reads capped by the budget.

    Like a socket, it stays open while a reader made by :meth:`makefile` is (``http.client``
    closes the connection of a close-delimited answer before its body is read).
    """

    def __init__(self, conn: _Connection, sock: socket.socket) -> None:
        self._conn = conn
        self._sock = sock
        self._readers = 0
        self._closing = False
        self._lock = threading.Lock()

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        with self._lock:
            self._readers += 1
        return io.BufferedReader(_BudgetReader(self._conn, self, self._sock), _READ_BUFFER)

    def release(self) -> None:
        with self._lock:
            self._readers -= 1
            last = self._closing and self._readers <= 0
        if last:
            self._sock.close()

    def sendall(self, data: Any) -> None:
        budget, cap = self._conn.budget, self._conn.read_timeout
        timeout = _left(budget, cap)
        self._sock.settimeout(timeout)
        with _timeout_names(budget, cap, timeout, "sending the request"):
            self._sock.sendall(data)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            now = self._readers <= 0
        if now:
            self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Connection(http.client.HTTPConnection):
    """An HTTP(S) connection that opens and reads within :attr:`budget`, set per request,
    directly or through ``proxy``."""

    def __init__(
        self,
        ep: Endpoint,
        *,
        connect_timeout: float,
        read_timeout: float,
        context: ssl.SSLContext | None,
        proxy: Proxy | None = None,
    ) -> None:
        super().__init__(ep.host, ep.port, timeout=connect_timeout)
        if context is not None:
            self.default_port = 443  # so the Host header has no ":443" (presigned URLs sign it)
        self.budget = Deadline(None)
        self.read_timeout = read_timeout
        self.proxy = proxy
        self._connect_timeout = connect_timeout
        self._context = context

    @property
    def absolute_target(self) -> bool:
        """Plain HTTP through a proxy: the request line names the whole URL."""
        return self.proxy is not None and self._context is None

    def connect(self) -> None:
        timeout = _left(self.budget, self._connect_timeout)
        where = (self.proxy.host, self.proxy.port) if self.proxy is not None else (self.host, self.port)
        with _timeout_names(self.budget, self._connect_timeout, timeout, "connecting"):
            try:
                sock = socket.create_connection(where, timeout)
            except TimeoutError:
                raise
            except OSError as exc:
                if self.proxy is None:
                    raise
                raise ConnectionError(f"the proxy {self.proxy} for {self.host}:{self.port}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                if self.proxy is not None:
                    self._tunnel_through(sock, self.proxy)
                sock = self._handshake(sock, self._context)
        except BaseException:
            sock.close()
            raise
        self.sock = cast(socket.socket, _BudgetSocket(self, sock))

    def _tunnel_through(self, sock: socket.socket, proxy: Proxy) -> None:
        """``CONNECT host:port`` through ``proxy``, answered 200 within the connect budget."""
        budget = self.budget.narrow(self._connect_timeout, what="the connect timeout")
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [f"CONNECT {host}:{self.port} HTTP/1.1", f"Host: {host}:{self.port}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        what = f"opening a tunnel to {host}:{self.port} through the proxy {proxy}"
        reply = b""
        with _timeout_names(budget, self._connect_timeout, budget.remaining(), what):
            sock.settimeout(_left(budget, self._connect_timeout))
            sock.sendall(request)
            while b"\r\n\r\n" not in reply:
                sock.settimeout(_left(budget, self._connect_timeout))
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"{what}: the proxy closed the connection")
                reply += chunk
                if len(reply) > _CONNECT_REPLY_LIMIT:
                    raise MalformedResponse(f"{what}: an answer longer than {_CONNECT_REPLY_LIMIT} bytes")
        head, _, extra = reply.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise MalformedResponse(f"{what}: not an HTTP answer")
        status = int(parts[1])
        if status != 200:
            raise HttpStatusError(status, "", parts[2][:200] if len(parts) > 2 else "", what)
        if extra:
            raise MalformedResponse(f"{what}: the proxy sent bytes before the TLS handshake")

    def _handshake(self, raw: socket.socket, context: ssl.SSLContext) -> socket.socket:
        """TLS on ``raw``, cut as a whole at ``min(connect_timeout, budget)`` (a trickling
        handshake would re-arm a per-read timeout forever)."""
        budget = self.budget.narrow(self._connect_timeout, what="the connect timeout")
        raw.settimeout(_left(budget, self._connect_timeout))
        watchdog = threading.Timer(budget.remaining(), _shutdown, (raw,))
        watchdog.daemon = True
        watchdog.start()
        try:
            return context.wrap_socket(raw, server_hostname=self.host)
        except OSError:
            if budget.expired():
                raise TimeoutError(f"{budget.what} expired during the TLS handshake") from None
            raise
        finally:
            watchdog.cancel()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@dataclass(slots=True)
class _Pool:
    idle: list[_Connection] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RestTransport:
    """GET/POST JSON and streamed downloads within a time budget, with keep-alive.

    Args:
        authorization: The ``Authorization`` header value, sent only to ``auth_origins``.
        auth_origins: ``(scheme, host, port)`` of the tracking and registry servers.
        connect_timeout: Seconds to open a connection (TLS handshake included).
        read_timeout: Seconds to wait for bytes once connected; also the longest a whole
            JSON answer may take.
        max_idle: Idle connections kept per host.
        tls: TLS settings for https endpoints.
        proxies: Which hosts to reach through which proxy (default: none).
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
        proxies: ProxySettings | None = None,
    ) -> None:
        self.__authorization = authorization  # name-mangled: kept out of reprs and tracebacks' locals
        self._proxies = proxies or ProxySettings()
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

    def _connect(self, ep: Endpoint, budget: Deadline) -> _Connection:
        context = self._context(ep) if ep.scheme == "https" else None
        proxy = self._proxies.for_target(ep.scheme, ep.host, ep.port)
        conn = _Connection(
            ep, connect_timeout=self._connect_timeout, read_timeout=self._read_timeout, context=context, proxy=proxy
        )
        conn.budget = budget
        try:
            conn.connect()
        except BaseException:
            conn.close()
            raise
        return conn

    def _pool(self, ep: Endpoint) -> _Pool:
        with self._lock:
            if self._closed:
                raise ConnectionAbortedError("the MLflow source is closed")
            return self._pools.setdefault(ep.origin, _Pool())

    def _acquire(self, ep: Endpoint, budget: Deadline) -> tuple[_Connection, bool]:
        pool = self._pool(ep)
        with pool.lock:
            if pool.idle:
                conn = pool.idle.pop()
                conn.budget = budget
                return conn, True
        return self._connect(ep, budget), False

    def _release(self, ep: Endpoint, conn: _Connection, resp: http.client.HTTPResponse) -> None:
        if resp.isclosed() and not resp.will_close and not self._closed:
            pool = self._pool(ep)
            with pool.lock:
                if len(pool.idle) < self._max_idle:
                    pool.idle.append(conn)
                    return
        _discard(conn, resp)

    def _headers(self, ep: Endpoint, conn: _Connection, extra: Mapping[str, str]) -> dict[str, str]:
        headers = {"User-Agent": "model-loader", "Accept-Encoding": "identity", **extra}
        if self.__authorization and ep.origin in self._auth_origins:
            headers["Authorization"] = self.__authorization
        if conn.absolute_target and conn.proxy is not None and conn.proxy.authorization:
            headers["Proxy-Authorization"] = conn.proxy.authorization
        return headers

    def _send(
        self,
        ep: Endpoint,
        method: str,
        target: str,
        body: bytes | None,
        headers: Mapping[str, str],
        budget: Deadline,
    ) -> tuple[_Connection, http.client.HTTPResponse]:
        conn, reused = self._acquire(ep, budget)
        while True:
            path = ep.prefix + target
            if conn.absolute_target:
                path = f"http://{ep.netloc}{path}"
            try:
                conn.request(method, path, body=body, headers=self._headers(ep, conn, headers))
                _quickack(conn)
                return conn, conn.getresponse()
            except _STALE:
                conn.close()
                if not reused:
                    raise
                conn, reused = self._connect(ep, budget), False  # the server closed an idle keep-alive connection
            except BaseException:
                conn.close()
                raise

    # -- requests -----------------------------------------------------------------------

    def get_json(
        self, ep: Endpoint, path: str, params: Mapping[str, str | list[str]] | None = None, *, deadline: Deadline
    ) -> bytes:
        """GET ``path?params``: the raw JSON body of a 200 answer (parse it with a schema)."""
        target = path + ("?" + urlencode(params, doseq=True, quote_via=quote) if params else "")
        return self._json(ep, "GET", target, None, path, deadline)

    def post_json(self, ep: Endpoint, path: str, payload: Mapping[str, Any], *, deadline: Deadline) -> bytes:
        """POST a JSON body to ``path``: the raw JSON body of a 200 answer."""
        return self._json(ep, "POST", path, json.dumps(payload).encode(), path, deadline)

    def _json(self, ep: Endpoint, method: str, target: str, body: bytes | None, what: str, deadline: Deadline) -> bytes:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        budget = deadline.narrow(self._read_timeout, what=f"the read timeout for one answer ({self._read_timeout:g}s)")
        conn, resp = self._send(ep, method, target, body, headers, budget)
        try:
            if resp.status != 200:
                error = _status_error(resp.status, resp.read(_ERROR_BODY_LIMIT), what)
                self._release(ep, conn, resp)
                raise error
            declared = resp.length
            if declared is not None and declared > MAX_JSON_BYTES:
                raise MalformedResponse(f"{what}: a {declared}-byte answer (at most {MAX_JSON_BYTES} are read)")
            data = resp.read(MAX_JSON_BYTES + 1)
            if len(data) > MAX_JSON_BYTES:
                raise MalformedResponse(f"{what}: an answer longer than {MAX_JSON_BYTES} bytes")
        except HttpStatusError:
            raise
        except BaseException:
            _discard(conn, resp)
            raise
        self._release(ep, conn, resp)
        return data

    @contextlib.contextmanager
    def stream(
        self,
        ep: Endpoint,
        path: str,
        *,
        deadline: Deadline,
        headers: Mapping[str, str] | None = None,
        what: str | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """GET ``path`` and yield the open response (status 200) to read from, within ``deadline``.

        ``what`` names the request in errors instead of ``path`` (a presigned URL's query
        is a credential).
        """
        conn, resp = self._send(ep, "GET", path, None, headers or {}, deadline)
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
                _discard(conn, resp)

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


def _discard(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
    """Close an answer not read to its end, and its connection (the socket closes with both)."""
    resp.close()
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
    except (ValueError, RecursionError):
        decoded = None
        message = body[:200].decode("utf-8", "replace").strip()
    if isinstance(decoded, dict):
        code = str(decoded.get("error_code", ""))[:200]
        message = str(decoded.get("message", ""))[:1000]
    return HttpStatusError(status, code, message, what)
