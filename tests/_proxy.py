"""A counting HTTP proxy and a TLS front, on 127.0.0.1, with real sockets and threads.

:class:`CountingProxy` is a forward proxy: absolute-form requests (``GET http://host:port/x``)
are forwarded with ``Connection: close`` and the answer piped back; ``CONNECT host:port``
opens a tunnel and pipes bytes both ways (TLS passes through untouched). Every request is
recorded (method, target, headers), so a test can say which hosts went through it and
what it was told. ``auth`` makes it answer ``407`` to requests without that
``Proxy-Authorization``.

:class:`TlsFront` terminates TLS with a self-signed certificate (:func:`self_signed`) and
pipes the plain bytes to an upstream port: an ``https://`` endpoint in front of an
``mlflow server`` or a moto server.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import socketserver
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["CountingProxy", "ProxiedRequest", "TlsFront", "self_signed"]


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    target: str  # "host:port" for CONNECT, the absolute URL otherwise
    headers: Mapping[str, str]

    @property
    def host(self) -> str:
        """``host:port`` the request was for."""
        if self.method == "CONNECT":
            return self.target
        parts = urlsplit(self.target)
        return f"{parts.hostname}:{parts.port or 80}"


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The request head (up to the blank line) and whatever came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class CountingProxy:
    """A forward HTTP proxy that records every request it carries."""

    def __init__(self, *, auth: str | None = None) -> None:
        self.requests: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._auth = auth
        outer = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._handle(self.request)

        self._server = _Server(("127.0.0.1", 0), _Handler)
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def hosts(self) -> dict[str, int]:
        """``host:port`` -> requests (or tunnels) carried for it."""
        with self._lock:
            out: dict[str, int] = {}
            for r in self.requests:
                out[r.host] = out.get(r.host, 0) + 1
            return out

    def _handle(self, client: socket.socket) -> None:
        try:
            head, rest = _read_head(client)
        except OSError:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip()] = value.strip()
        with self._lock:
            self.requests.append(ProxiedRequest(method, target, headers))
        lowered = {k.lower(): v for k, v in headers.items()}
        if self._auth is not None and lowered.get("proxy-authorization") != self._auth:
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            try:
                upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
            except OSError:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            upstream.settimeout(None)
            self._relay(client, upstream, rest)
            return
        parts = urlsplit(target)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        kept = [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("proxy-authorization", "connection")]
        request = "\r\n".join([f"{method} {path or '/'} HTTP/1.1", *kept, "Connection: close"]) + "\r\n\r\n"
        try:
            upstream = socket.create_connection((parts.hostname or "", parts.port or 80), timeout=30)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        upstream.settimeout(None)
        upstream.sendall(request.encode("latin-1"))
        length = int(lowered.get("content-length") or 0)
        body = rest
        while len(body) < length:
            chunk = client.recv(65536)
            if not chunk:
                break
            body += chunk
        upstream.sendall(body)
        _pipe(upstream, client)  # the answer, until the upstream closes (we asked it to)
        upstream.close()

    @staticmethod
    def _relay(client: socket.socket, upstream: socket.socket, early: bytes) -> None:
        if early:
            upstream.sendall(early)
        back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        back.start()
        _pipe(client, upstream)
        back.join(timeout=30)
        upstream.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def self_signed(directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[Path, Path]:
    """A self-signed certificate for ``hosts`` (DNS names and IPs): ``(cert.pem, key.pem)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    alt: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class TlsFront:
    """``https://127.0.0.1:<port>`` in front of a plain TCP ``upstream`` port."""

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.connections = 0
        lock = threading.Lock()
        outer = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    tls = context.wrap_socket(self.request, server_side=True)
                except (OSError, ssl.SSLError):
                    return  # a client that did not trust us
                with lock:
                    outer.connections += 1
                try:
                    upstream = socket.create_connection(("127.0.0.1", upstream_port), timeout=30)
                except OSError:
                    tls.close()
                    return
                upstream.settimeout(None)
                back = threading.Thread(target=_pipe, args=(upstream, tls), daemon=True)
                back.start()
                _pipe(tls, upstream)
                back.join(timeout=30)
                upstream.close()
                with contextlib.suppress(OSError):
                    tls.close()

        self._server = _Server(("127.0.0.1", 0), _Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def __enter__(self) -> TlsFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
