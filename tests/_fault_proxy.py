"""A fault-injecting HTTP proxy for tests: boto3 -> proxy -> moto server, over real sockets.

Point a client's ``endpoint_url`` at :attr:`FaultProxy.url`. Each request is forwarded
unchanged (the Host header too, so SigV4 signatures still verify) unless a fault is
chosen for it, either scripted with :meth:`FaultProxy.inject` or drawn at random with
probability ``rate`` from ``kinds``:

- ``"500"``: HTTP 500 InternalError.
- ``"503"``: HTTP 503 SlowDown.
- ``"403"``: HTTP 403 InvalidAccessKeyId.
- ``"reset"``: the connection is reset (RST) before any response.
- ``"stall"``: nothing is sent until the client gives up (read timeout) or the proxy stops.
- ``"stall_body"``: headers and half the body, then nothing (read timeout mid-body).
- ``"truncate"``: headers with the full Content-Length, half the body, then the
  connection closes (a body cut short).
- ``"corrupt"``: the full body with its first byte flipped.
- ``"substitute"``: the body replaced by the same range of ``payload`` (another object's
  bytes of the same length): sizes, headers and ETag unchanged.
- ``"rewrite"``: the body passed through ``payload(body) -> body`` (a malformed listing).
- ``"trickle"``: the whole response, status line and headers included, one byte every
  ``trickle_interval`` seconds; ``"trickle_body"``: headers at once, then the body so.

:class:`BlackHole` is a listener that accepts connections and never reads or answers.

It can also shape traffic like a wide-area link: ``latency`` seconds before each request
is forwarded and at most ``bandwidth`` bytes/s per response body (per connection, as on
S3 where one connection streams at tens of MB/s and parallel ones add up).

Threads only, 127.0.0.1, a free port; every stall ends when the proxy stops.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

ALL_KINDS = ("500", "503", "reset", "stall", "stall_body", "truncate")
SCRIPTED_KINDS = (*ALL_KINDS, "403", "corrupt", "substitute", "rewrite", "trickle", "trickle_body")
_BUFFERED = ("substitute", "rewrite", "trickle", "trickle_body")  # need the whole upstream body first
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
}


@dataclass(frozen=True)
class Seen:
    """One request the proxy received."""

    method: str
    path: str  # URL path, unquoted, without the query
    query: str
    range: str | None
    fault: str | None


Match = Callable[[Seen], bool]


Payload = bytes | Callable[[bytes], bytes] | None


@dataclass
class _Script:
    kind: str
    count: int
    match: Match | None
    payload: Payload = None


@dataclass
class FaultProxy:
    """A reverse proxy in front of ``upstream`` that injects faults.

    Attributes:
        upstream: ``http://host:port`` of the real server.
        rate: Probability that a request (matching ``only``) gets a random fault.
        kinds: The fault kinds drawn at random.
        seed: Seed of the random draws.
        only: Restrict random faults to requests this predicate accepts.
        stall_seconds: Longest a stall lasts if the client does not give up first.
        trickle_interval: Seconds between two bytes of a trickle.
    """

    upstream: str
    rate: float = 0.0
    kinds: tuple[str, ...] = ALL_KINDS
    seed: int = 0
    only: Match | None = None
    stall_seconds: float = 10.0
    trickle_interval: float = 1.0
    latency: float = 0.0
    bandwidth: float | None = None
    seen: list[Seen] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    body_bytes: int = 0  # response body bytes really sent to clients (what an origin would bill)
    before_forward: Callable[[Seen], None] | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        self._up_host, self._up_port = parts.hostname or "127.0.0.1", parts.port or 80
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._scripts: list[_Script] = []
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control --------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        handler = type("_BoundHandler", (_Handler,), {"proxy": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fault-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, kind: str, count: int = 1, match: Match | None = None, payload: Payload = None) -> None:
        """Give the next ``count`` requests accepted by ``match`` the fault ``kind``.

        ``payload``: the substitute bytes (``"substitute"``) or the body rewriter (``"rewrite"``).
        """
        if kind not in SCRIPTED_KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        if (kind == "substitute") != isinstance(payload, bytes) or (kind == "rewrite") != callable(payload):
            raise ValueError(f"fault {kind!r}: wrong payload {type(payload).__name__}")
        with self._lock:
            self._scripts.append(_Script(kind, count, match, payload))

    def clear(self) -> None:
        """Stop injecting: drop scripted faults and set the random rate to 0."""
        with self._lock:
            self._scripts.clear()
            self.rate = 0.0

    def randomize(self, rate: float, *, seed: int = 0, kinds: tuple[str, ...] | None = None) -> None:
        """Give each request a random fault from ``kinds`` with probability ``rate``."""
        with self._lock:
            self.rate = rate
            self._rng = random.Random(seed)
            if kinds is not None:
                self.kinds = kinds

    def requests(self, method: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if method is None or s.method == method]

    # -- used by the handler -----------------------------------------------------------

    def _choose(self, probe: Seen) -> tuple[str | None, Payload]:
        with self._lock:
            fault, payload = None, None
            for script in self._scripts:
                if script.count > 0 and (script.match is None or script.match(probe)):
                    script.count -= 1
                    fault, payload = script.kind, script.payload
                    break
            eligible = fault is None and self.rate > 0 and (self.only is None or self.only(probe))
            if eligible and self._rng.random() < self.rate:
                fault = self._rng.choice(self.kinds)
            self.seen.append(Seen(probe.method, probe.path, probe.query, probe.range, fault))
            if fault is not None:
                self.faults[fault] += 1
            return fault, payload


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up are expected here
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        probe = Seen(self.command, unquote(parts.path), parts.query, self.headers.get("Range"), None)
        fault, payload = self.proxy._choose(probe)
        if fault == "reset":
            self._reset()
            return
        if fault == "stall":
            self.proxy._stop.wait(self.proxy.stall_seconds)
            self.close_connection = True
            return
        if fault in _ERRORS:
            self._error(*_ERRORS[fault])
            return
        if self.proxy.before_forward is not None:
            self.proxy.before_forward(probe)
        if self.proxy.latency:
            self.proxy._stop.wait(self.proxy.latency)
        self._forward(body, fault, payload)

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _error(self, status: int, code: str, message: str) -> None:
        payload = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _forward(self, body: bytes, fault: str | None, payload: Payload = None) -> None:
        proxy = self.proxy
        conn = http.client.HTTPConnection(proxy._up_host, proxy._up_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            if fault in _BUFFERED:
                self._send_altered(resp, out_headers, fault, payload)
                return
            if self.command == "HEAD":
                self.send_response(resp.status)
                for k, v in out_headers:
                    self.send_header(k, v)
                self.end_headers()
                return
            data_len = int(resp.getheader("Content-Length") or 0)
            if resp.getheader("Content-Length") is None:  # not expected from moto; buffer it
                data = resp.read()
                data_len = len(data)
                out_headers.append(("Content-Length", str(data_len)))
                chunks: list[bytes] | None = [data]
            else:
                chunks = None
            self.send_response(resp.status)
            for k, v in out_headers:
                self.send_header(k, v)
            self.end_headers()
            cut = data_len // 2 if fault in ("truncate", "stall_body") and data_len > 0 else None
            flip = 0 if fault == "corrupt" and data_len > 0 else None
            sent = 0
            started = time.monotonic()
            for chunk in chunks if chunks is not None else iter(lambda: resp.read(64 * 1024), b""):
                if proxy.bandwidth:  # pace the body: never ahead of bandwidth * elapsed
                    ahead = started + (sent + len(chunk)) / proxy.bandwidth - time.monotonic()
                    if ahead > 0 and proxy._stop.wait(ahead):
                        break
                if cut is not None and sent + len(chunk) >= cut:
                    chunk = chunk[: cut - sent]
                if flip is not None and sent <= flip < sent + len(chunk):
                    i = flip - sent
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                self.wfile.write(chunk)
                sent += len(chunk)
                with proxy._lock:
                    proxy.body_bytes += len(chunk)
                if cut is not None and sent >= cut:
                    break
            if cut is not None:
                self.wfile.flush()
                if fault == "stall_body":
                    proxy._stop.wait(proxy.stall_seconds)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            self.close_connection = True  # the client went away (it timed out, or stopped reading)
        finally:
            conn.close()

    def _send_altered(
        self, resp: http.client.HTTPResponse, headers: list[tuple[str, str]], fault: str | None, payload: Payload
    ) -> None:
        """Send a response whose body was read whole first: substituted, rewritten or trickled."""
        data = b"" if self.command == "HEAD" else resp.read()
        if fault == "substitute" and isinstance(payload, bytes):
            start = 0
            content_range = resp.getheader("Content-Range")  # "bytes a-b/total"
            if content_range:
                start = int(content_range.split()[1].split("-")[0])
            data = payload[start : start + len(data)]
        elif fault == "rewrite" and callable(payload):
            data = payload(data)
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        if self.command != "HEAD" or fault == "rewrite":
            headers.append(("Content-Length", str(len(data))))
        else:
            headers.append(("Content-Length", resp.getheader("Content-Length") or "0"))
        head = f"HTTP/1.1 {resp.status} {resp.reason}\r\n".encode("latin-1")
        head += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers) + b"\r\n"
        if fault == "trickle":
            self._trickle(head + data)
        elif fault == "trickle_body":
            self.wfile.write(head)
            self.wfile.flush()
            self._trickle(data)
        else:
            self.wfile.write(head + data)
        self.close_connection = True

    def _trickle(self, data: bytes) -> None:
        """One byte every ``trickle_interval`` seconds, until done, the client leaves or the proxy stops."""
        for i in range(len(data)):
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            if self.proxy._stop.wait(self.proxy.trickle_interval):
                return


class BlackHole:
    """A TCP listener on 127.0.0.1 that accepts connections and never reads or answers.

    Connections stay open until :meth:`stop`; the kernel completes the handshake, so a
    client's connect succeeds and it waits for an answer that never comes.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="black-hole", daemon=True)
        self.accepted = 0

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> BlackHole:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for conn in self._held:
            conn.close()
        self._listener.close()

    def __enter__(self) -> BlackHole:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self._held.append(conn)
            self.accepted += 1
