"""Small hostile HTTP servers for resilience tests: threads, real sockets, 127.0.0.1 only.

:class:`HostileServer` answers each request with what its ``behaviour`` returns:

- ``None``: a black hole; the request is read and never answered (until the server closes).
- an :class:`Answer`: status, headers and body, optionally lying about its
  ``Content-Length``, sent one byte every ``trickle`` seconds (headers too), or followed
  by an ``endless`` stream of filler.

:func:`black_hole`, :func:`trickle` and :func:`json_answer` build the common ones, and
:class:`FakeMlflow` scripts an MLflow tracking server (one registered model, artifacts
proxied through ``mlflow-artifacts``) whose routes can be overridden one by one with
malformed answers. ``behaviour`` may be swapped while the server runs, and a new server
may take over the port of a closed one (the same tracking URI, a different server).
Every wait ends when the server closes.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import BinaryIO
from urllib.parse import parse_qs, quote, urlsplit

__all__ = ["Answer", "Behaviour", "FakeMlflow", "HostileServer", "Request", "black_hole", "json_answer", "trickle"]

ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
PRESIGNED_API = "/api/2.0/mlflow-artifacts/presigned"
_FILLER = b"\0" * 65536


@dataclass(frozen=True)
class Request:
    """One request the server read."""

    method: str
    target: str  # path and query, as sent
    headers: Mapping[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.target).query).items()}


@dataclass(frozen=True)
class Answer:
    """What to send back.

    Attributes:
        status: The HTTP status.
        body: The body.
        headers: Extra headers (``Content-Type`` defaults to JSON).
        content_length: The ``Content-Length`` to claim; ``None``: the body's length;
            ``-1``: none at all (the body ends when the connection closes).
        trickle: Seconds between bytes of the whole answer, status line included.
        endless: After the body, send filler until the client goes away (no length).
    """

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_length: int | None = None
    trickle: float | None = None
    endless: bool = False

    def head(self) -> bytes:
        headers = {"Content-Type": "application/json", **self.headers}
        if self.endless or self.content_length == -1:
            headers["Connection"] = "close"
        else:
            headers["Content-Length"] = str(len(self.body) if self.content_length is None else self.content_length)
        lines = [f"HTTP/1.1 {self.status} X"] + [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    @property
    def closes(self) -> bool:
        return self.endless or self.content_length == -1


Behaviour = Callable[[Request], "Answer | None"]


def json_answer(payload: object, status: int = 200, **kwargs: object) -> Answer:
    """``payload`` as a JSON answer (``bytes`` are sent as they are)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Answer(status, body, **kwargs)  # type: ignore[arg-type]


def black_hole(request: Request) -> Answer | None:
    """Never answer."""
    return None


def trickle(answer: Answer, seconds_per_byte: float = 1.0) -> Behaviour:
    """Send ``answer`` to every request, one byte every ``seconds_per_byte``."""
    slow = replace(answer, trickle=seconds_per_byte)
    return lambda request: slow


class HostileServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 answering as ``behaviour`` says.

    Args:
        behaviour: Called with each request; see the module docstring.
        port: A port to listen on (0: a free one), e.g. the port of a server just closed.
    """

    def __init__(self, behaviour: Behaviour, *, port: int = 0) -> None:
        self.behaviour = behaviour
        self.requests: list[Request] = []
        self.stopped = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        outer = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._serve(self.request)

        class _Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._server = _Server(("127.0.0.1", port), _Handler)
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        serve = self._server.serve_forever
        self._thread = threading.Thread(target=serve, args=(0.05,), name="hostile-http", daemon=True)
        self._thread.start()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def paths(self, prefix: str = "") -> list[str]:
        """Paths of the requests received so far, optionally only those starting with ``prefix``."""
        with self._lock:
            return [r.path for r in self.requests if r.path.startswith(prefix)]

    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            if self.stopped.is_set():
                return
            self._sockets.add(sock)
        try:
            reader = sock.makefile("rb")
            while not self.stopped.is_set():
                request = _read_request(reader)
                if request is None:
                    return
                with self._lock:
                    self.requests.append(request)
                answer = self.behaviour(request)
                if answer is None:
                    self.stopped.wait()  # a black hole: hold the connection, say nothing
                    return
                if not self._send(sock, answer) or answer.closes:
                    return
        except OSError:
            return  # the client went away
        finally:
            with self._lock:
                self._sockets.discard(sock)

    def _send(self, sock: socket.socket, answer: Answer) -> bool:
        data = answer.head() + answer.body
        if answer.trickle is not None:
            for i in range(len(data)):
                sock.sendall(data[i : i + 1])
                if self.stopped.wait(answer.trickle):
                    return False
            while answer.endless:  # and then more, as slowly
                sock.sendall(b"\0")
                if self.stopped.wait(answer.trickle):
                    return False
            return True
        sock.sendall(data)
        while answer.endless and not self.stopped.is_set():
            sock.sendall(_FILLER)  # raises once the client has closed
        return True

    def close(self) -> None:
        """Stop: every black hole and trickle ends, every connection closes. Idempotent."""
        self.stopped.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)


def _read_request(reader: BinaryIO) -> Request | None:
    readline = reader.readline
    line = readline(65537)
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        raw = readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            break
        key, _, value = raw.decode("latin-1").partition(":")
        headers[key.strip()] = value.strip()
    length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
    body = reader.read(length) if length else b""
    return Request(method, target, headers, body)


# -- a scripted MLflow tracking server ----------------------------------------------------


@dataclass
class FakeMlflow:
    """The answers of an MLflow tracking server holding one registered model version whose
    artifacts are proxied (``mlflow-artifacts:/...``); use it as a server's ``behaviour``.

    Attributes:
        files: The model's files (relative path -> bytes).
        name: The registered model's name.
        version: Its (only) version; ``@<any alias>`` and ``/latest`` resolve to it.
        location: The version's download URI.
        presigned_url: Where ``/presigned/`` points (``{path}`` is replaced); ``None``:
            the server cannot presign (HTTP 501).
        overrides: ``path suffix -> Answer`` (or a behaviour) replacing the normal answer
            of every route ending so, e.g. ``{"/get-download-uri": json_answer({})}``.
    """

    files: dict[str, bytes]
    name: str = "m"
    version: int = 1
    location: str = "mlflow-artifacts:/0/run1/artifacts/model"
    presigned_url: str | None = None
    overrides: dict[str, Answer | Behaviour] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return urlsplit(self.location).path.strip("/")

    def model_version(self) -> dict[str, object]:
        return {"name": self.name, "version": str(self.version), "status": "READY", "source": self.location}

    def __call__(self, request: Request) -> Answer | None:
        path = request.path
        for suffix, override in self.overrides.items():
            if path.endswith(suffix) or (suffix.startswith("?") and request.target.endswith(suffix)):
                return override if isinstance(override, Answer) else override(request)
        if path.endswith(("/registered-models/alias", "/model-versions/get")):
            return json_answer({"model_version": self.model_version()})
        if path.endswith("/get-download-uri"):
            return json_answer({"artifact_uri": self.location})
        if path.endswith("/get-latest-versions") or path.endswith("/model-versions/search"):
            return json_answer({"model_versions": [self.model_version()]})
        if path == ARTIFACTS_API:
            return self.listing(request.query.get("path", ""))
        if path.startswith(PRESIGNED_API + "/"):
            if self.presigned_url is None:
                return json_answer({"error_code": "NOT_IMPLEMENTED", "message": "cannot presign"}, 501)
            rel = path[len(PRESIGNED_API) + 1 :]
            return json_answer({"url": self.presigned_url.replace("{path}", rel), "headers": {}})
        if path.startswith(ARTIFACTS_API + "/"):
            rel = path[len(ARTIFACTS_API) + 1 + len(self.root) + 1 :]
            data = self.files.get(rel)
            if data is None:
                return json_answer({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": rel}, 404)
            return Answer(200, data, {"Content-Type": "application/octet-stream"})
        return json_answer({"error_code": "ENDPOINT_NOT_FOUND", "message": path}, 404)

    def listing(self, path: str) -> Answer:
        """The listing of ``path`` (a directory under :attr:`root`): basenames, as MLflow answers."""
        prefix = path[len(self.root) :].strip("/")
        prefix = f"{prefix}/" if prefix else ""
        entries: dict[str, dict[str, object]] = {}
        for rel, data in sorted(self.files.items()):
            if not rel.startswith(prefix):
                continue
            head, _, rest = rel[len(prefix) :].partition("/")
            if rest:
                entries[head] = {"path": head, "is_dir": True}
            else:
                entries[head] = {"path": head, "is_dir": False, "file_size": len(data)}
        return json_answer({"files": list(entries.values())})

    def file_path(self, rel: str) -> str:
        """The request path of one artifact's download."""
        return f"{ARTIFACTS_API}/{quote(self.root)}/{quote(rel)}"
