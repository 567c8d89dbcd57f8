"""A small HTTP file server for tests: a directory tree on disk, served on 127.0.0.1.

:class:`HttpStore` renders an HTML index page for every directory (links to files and
subdirectories, plus the parent and sorting links real servers add), answers ``HEAD``
and ``GET`` with a strong ``ETag`` (a hash of the content), ``Last-Modified``,
``Content-Length`` and ``Accept-Ranges``, honours ``If-Match``,
``If-Unmodified-Since`` and ``Range``, and optionally sends ``Content-MD5``.

Faults are injected per request with :meth:`HttpStore.fault`: an HTTP error status, a
connection reset (after the headers and part of the body, or before answering), a
trickle (the body a few bytes at a time), a stall (the request read and never
answered), or altered body bytes under unchanged headers. Every wait ends when the
server stops. The server binds port 0 (no free-port race) and can be stopped and
started again on the same port (the same URLs, a server that was down).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import html
import os
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

__all__ = ["Fault", "HttpStore", "Seen"]


@dataclass
class Fault:
    """One injected misbehaviour.

    Attributes:
        kind: ``"status"``, ``"reset"``, ``"trickle"``, ``"stall"`` or ``"corrupt"``.
        match: Applies to requests whose method and path it accepts.
        times: How many requests it applies to (``None``: all).
        status: For ``"status"``: the status to answer.
        after: For ``"reset"``: body bytes sent before the reset (``-1``: reset before
            answering at all).
        interval: For ``"trickle"``: seconds between two pieces of the body.
        piece: For ``"trickle"``: bytes per piece.
    """

    kind: str
    match: Callable[[str, str], bool]
    times: int | None = None
    status: int = 500
    after: int = -1
    interval: float = 0.05
    piece: int = 1
    hits: int = 0


@dataclass(frozen=True)
class Seen:
    """One request the server read."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    store: HttpStore

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        with self.store._lock:
            self.store._open.add(sock)  # kept-alive connections too: stop() cuts them all
        return sock, address

    def shutdown_request(self, request: object) -> None:
        with self.store._lock:
            self.store._open.discard(request)  # type: ignore[arg-type]
        super().shutdown_request(request)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return None

    def do_HEAD(self) -> None:
        self.server.store._answer(self, head=True)

    def do_GET(self) -> None:
        self.server.store._answer(self, head=False)


class HttpStore:
    """Serve ``root`` over HTTP on 127.0.0.1 (see the module docstring).

    Args:
        root: The directory served.
        checksums: Send ``Content-MD5`` with files.
        etags: Send ``ETag`` (off: only ``Last-Modified``).
    """

    def __init__(self, root: Path, *, checksums: bool = False, etags: bool = True) -> None:
        self.root = root
        self.checksums = checksums
        self.etags = etags
        self.requests: list[Seen] = []
        self.in_flight = 0
        self.peak_in_flight = 0  # most requests answered at once
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._open: set[socket.socket] = set()
        self._hashes: dict[tuple[str, int, int], tuple[str, str]] = {}

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> HttpStore:
        self._stopping.clear()
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.store = self
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: the port is closed, every stalled or trickling answer ends."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> HttpStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/"

    # -- content ----------------------------------------------------------------------

    def publish(self, prefix: str, files: Mapping[str, bytes]) -> str:
        """Replace the tree under ``prefix`` with ``files``; return its URL (ends in ``/``)."""
        target = self.root / prefix
        shutil.rmtree(target, ignore_errors=True)
        for rel, data in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return self.url + quote(prefix.strip("/")) + "/"

    # -- faults -----------------------------------------------------------------------

    def fault(self, kind: str, path: str | None = None, *, method: str | None = None, **options: object) -> Fault:
        """Inject a fault for requests whose path contains ``path`` (and of ``method``)."""

        def match(m: str, p: str) -> bool:
            return (path is None or path in p) and (method is None or method == m)

        fault = Fault(kind, match, **options)  # type: ignore[arg-type]
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.match(method, path) and (fault.times is None or fault.hits < fault.times):
                    fault.hits += 1
                    return fault
        return None

    # -- answering --------------------------------------------------------------------

    def _answer(self, handler: _Handler, *, head: bool) -> None:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            self._serve(handler, head)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            handler.close_connection = True
        finally:
            with self._lock:
                self.in_flight -= 1

    def _serve(self, handler: _Handler, head: bool) -> None:
        method = "HEAD" if head else "GET"
        path = unquote(urlsplit(handler.path).path)
        with self._lock:
            self.requests.append(Seen(method, path, dict(handler.headers.items())))
        fault = self._take_fault(method, path)
        if fault is not None and fault.kind == "stall":
            self._stopping.wait()
            handler.close_connection = True
            return
        if fault is not None and fault.kind == "reset" and fault.after < 0:
            _reset(handler)
            return
        if fault is not None and fault.kind == "status":
            self._send(handler, fault.status, b"injected fault\n", {"Content-Type": "text/plain"}, head)
            return
        local = (self.root / path.lstrip("/")).resolve()
        if not local.is_relative_to(self.root.resolve()) or not local.exists():
            self._send(handler, 404, b"not found\n", {"Content-Type": "text/plain"}, head)
            return
        if local.is_dir():
            if not path.endswith("/"):
                self._send(handler, 301, b"", {"Location": quote(path) + "/"}, head)
                return
            self._send(handler, 200, self._index(local, path), {"Content-Type": "text/html; charset=utf-8"}, head)
            return
        data = local.read_bytes()
        st = local.stat()
        etag, md5 = self._validators(local, st, data)
        modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        headers = {"Content-Type": "application/octet-stream", "Last-Modified": modified, "Accept-Ranges": "bytes"}
        if self.etags:
            headers["ETag"] = etag
        if self.checksums:
            headers["Content-MD5"] = md5
        if_match = handler.headers.get("If-Match")
        if if_match is not None and if_match != "*" and etag not in [t.strip() for t in if_match.split(",")]:
            self._send(handler, 412, b"precondition failed\n", {"Content-Type": "text/plain"}, head)
            return
        since = handler.headers.get("If-Unmodified-Since")
        if since is not None:
            limit = email.utils.parsedate_to_datetime(since).timestamp()
            if int(st.st_mtime) > limit:
                self._send(handler, 412, b"precondition failed\n", {"Content-Type": "text/plain"}, head)
                return
        status, body = 200, data
        ranged = handler.headers.get("Range")
        if ranged and ranged.startswith("bytes="):
            first, _, last = ranged[len("bytes=") :].partition("-")
            start = int(first) if first else max(0, len(data) - int(last))
            end = min(len(data) - 1, int(last)) if (first and last) else len(data) - 1
            if start >= len(data):
                self._send(handler, 416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
                return
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if fault is not None and fault.kind == "corrupt" and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self._send(handler, status, body, headers, head, fault)

    def _validators(self, local: Path, st: os.stat_result, data: bytes) -> tuple[str, str]:
        key = (str(local), st.st_size, st.st_mtime_ns)
        found = self._hashes.get(key)
        if found is None:
            etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
            md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
            found = self._hashes[key] = (etag, md5)
        return found

    def _index(self, directory: Path, path: str) -> bytes:
        links = ['<a href="../">../</a>', '<a href="?C=N;O=D">Name</a>', '<a href="./">.</a>']
        for child in sorted(directory.iterdir()):
            name = quote(child.name) + ("/" if child.is_dir() else "")
            links.append(f'<a href="{html.escape(name)}">{html.escape(child.name)}</a>')
        title = html.escape(path)
        body = f"<html><head><title>Index of {title}</title></head><body><h1>Index of {title}</h1>\n"
        return (body + "<br>\n".join(links) + "\n</body></html>\n").encode()

    def _send(
        self,
        handler: _Handler,
        status: int,
        body: bytes,
        headers: Mapping[str, str],
        head: bool,
        fault: Fault | None = None,
    ) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if head:
            return
        if fault is not None and fault.kind == "reset":
            handler.wfile.write(body[: fault.after])
            handler.wfile.flush()
            _reset(handler)
            return
        if fault is not None and fault.kind == "trickle":
            for piece in _pieces(body, fault.piece):
                if self._stopping.wait(fault.interval):
                    handler.close_connection = True
                    return
                handler.wfile.write(piece)
                handler.wfile.flush()
            return
        handler.wfile.write(body)


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), max(1, size)):
        yield data[i : i + size]


def _reset(handler: _Handler) -> None:
    """Close the connection with a TCP RST (SO_LINGER 0), as a crashed peer would."""
    handler.close_connection = True
    with contextlib.suppress(OSError):
        handler.wfile.flush()
    with contextlib.suppress(OSError):
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()
