"""A forward HTTP proxy that caches GET bodies, like a P2P daemon (Dragonfly's dfdaemon) in
front of an origin: the first node's request goes to the origin, later ones are served from
what the proxy already holds. It counts the body bytes it pulled from the origin.

Clients reach it through ``HTTP_PROXY`` (absolute-URI requests). Only plain HTTP: enough to
show that every path of the sources goes through the proxy the environment names.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


def _cache_key(url: str) -> str:
    """The URL without signing parameters, as Dragonfly's ``filteredQueryParams`` does, so one
    object presigned for several nodes is one cache entry."""
    from urllib.parse import parse_qsl, urlencode

    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.lower().startswith("x-amz-")]
    return parts._replace(query=urlencode(kept)).geturl()


def _is_blob(url: str) -> bool:
    """Which URLs go through the cache, as a P2P daemon's rules say: object bodies, never
    registry calls or listings (they change when a model is promoted)."""
    from urllib.parse import parse_qsl

    parts = urlsplit(url)
    listing = {"list-type", "prefix", "delimiter", "continuation-token", "path", "versions", "uploads"}
    query = {k.lower() for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if "/api/2.0/" in parts.path and "/api/2.0/mlflow-artifacts/artifacts/" not in parts.path:
        return False  # the registry, presigning: answers that change
    return not (query & listing)


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class CachingProxy:
    """Start with :meth:`start`; point clients at :attr:`url` with ``HTTP_PROXY``."""

    origin_bytes: int = 0
    requests: int = 0
    served_from_cache: int = 0
    _cache: dict[tuple[str, str], tuple[int, list[tuple[str, str]], bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> CachingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def _relay(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                key = (_cache_key(self.path), self.headers.get("Range") or "")
                with proxy._lock:
                    proxy.requests += 1
                    hit = proxy._cache.get(key) if method == "GET" else None
                    if hit is not None:
                        proxy.served_from_cache += 1
                if hit is None:
                    parts = urlsplit(self.path)
                    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
                    target = parts.path + (f"?{parts.query}" if parts.query else "")
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(method, target, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    conn.close()
                    hit = (resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP], data)
                    blob = not (resp.getheader("Content-Type") or "").startswith(
                        ("application/json", "application/xml", "text/")
                    )
                    with proxy._lock:
                        proxy.origin_bytes += len(data)
                        if method == "GET" and resp.status in (200, 206) and blob:
                            proxy._cache[key] = hit  # blobs only, as a P2P daemon's rules say: never listings
                status, headers_out, data = hit
                self.send_response(status)
                for k, v in headers_out:
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._relay("GET")

            def do_HEAD(self) -> None:
                self._relay("HEAD")

            def do_POST(self) -> None:
                self._relay("POST")

            def do_PUT(self) -> None:
                self._relay("PUT")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
