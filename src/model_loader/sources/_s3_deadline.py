"""Every request of an S3 client bounded by the load's deadline: connect, headers and body.

botocore's ``read_timeout`` bounds each socket read, so a server that trickles one byte
per second (in the headers or in the body) keeps a request alive forever. A
:class:`RequestGuard` fixes that per client, without touching botocore or urllib3
globally: it replaces the connection-pool classes in *this client's* pool manager with
subclasses whose connections

- cap the connect timeout and the wait for headers at what is left of the deadline of
  the thread's current :meth:`RequestGuard.scope` (a connection that never answers is
  cut at ``min(read_timeout, remaining)``), and
- register their socket with that scope; a watchdog thread shuts down (``SHUT_RDWR``)
  the sockets of every scope whose deadline passes, which wakes any thread blocked on
  them: a trickle ends with the budget, and no thread outlives it for long.

Outside a scope, or with an unlimited deadline, the connections behave exactly like
botocore's. The watchdog runs only while a bounded scope is open.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from model_loader._deadline import Deadline

__all__ = ["RequestGuard"]

logger = logging.getLogger(__name__)

_local = threading.local()  # .scope: the _Scope of the request running in this thread


class _Scope:
    """The requests one thread makes under one deadline."""

    __slots__ = ("deadline", "fired", "guard", "socks")

    def __init__(self, guard: RequestGuard, deadline: Deadline) -> None:
        self.guard = guard
        self.deadline = deadline
        self.socks: set[socket.socket] = set()
        self.fired = False

    def cap(self, timeout: Any) -> Any:
        """``timeout`` lowered to what is left; ``socket.timeout`` when nothing is."""
        if not self.deadline.bounded:
            return timeout
        left = self.deadline.expires - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{self.deadline.what} expired")  # socket.timeout: urllib3 maps it
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            return min(float(timeout), left)
        return left  # None (block forever) or urllib3's default sentinel

    def attach(self, sock: Any) -> None:
        if isinstance(sock, socket.socket):
            self.guard._attach(self, sock)


def _current() -> _Scope | None:
    return getattr(_local, "scope", None)


def _shutdown(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for an SSLSocket (whose override would drop its
    # SSL state under the thread reading it); a closed socket has fd -1 and just refuses
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


@functools.cache
def _bounded_connection(base: Any) -> Any:
    if getattr(base, "_model_loader_bounded", False):
        return base

    class BoundedConnection(base):  # type: ignore[misc]
        _model_loader_bounded = True

        def _new_conn(self) -> Any:
            conn: Any = self
            scope = _current()
            if scope is not None:
                conn.timeout = scope.cap(conn.timeout)
            sock = super()._new_conn()
            if scope is not None:
                scope.attach(sock)  # covers a TLS handshake that trickles
            return sock

        def connect(self) -> None:
            super().connect()
            scope = _current()
            if scope is not None:
                scope.attach(getattr(self, "sock", None))  # the TLS socket, when wrapped

        def getresponse(self, *args: Any, **kwargs: Any) -> Any:
            conn: Any = self
            scope = _current()
            if scope is not None and conn.sock is not None:
                scope.attach(conn.sock)
                # urllib3 2 applies conn.timeout to the socket in getresponse; 1.26 has set it already
                conn.timeout = scope.cap(conn.timeout)
                conn.sock.settimeout(scope.cap(conn.sock.gettimeout()))
            return super().getresponse(*args, **kwargs)

    BoundedConnection.__name__ = BoundedConnection.__qualname__ = f"Bounded{base.__name__}"
    return BoundedConnection


@functools.cache
def _bounded_pool(base: Any) -> Any:
    if getattr(base, "_model_loader_bounded", False):
        return base  # installed already (a client shared by two sources)
    attrs = {"ConnectionCls": _bounded_connection(base.ConnectionCls), "_model_loader_bounded": True}
    return type(f"Bounded{base.__name__}", (base,), attrs)


class RequestGuard:
    """Bounds the requests of one client by the deadline of the calling thread's scope.

    Example:
        >>> guard = RequestGuard()
        >>> guard.install(client)
        >>> with guard.scope(Deadline.current()):
        ...     client.list_objects_v2(Bucket="models", Prefix="iris/")
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._scopes: set[_Scope] = set()  # open bounded scopes
        self._owner: dict[socket.socket, _Scope] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self.installed = False

    def install(self, client: Any) -> bool:
        """Give ``client``'s connection pools bounded connections; False if its HTTP stack is unknown."""
        try:
            session = client._endpoint.http_session
            classes = session._pool_classes_by_scheme
            manager = session._manager
            for scheme in ("http", "https"):
                classes[scheme] = _bounded_pool(classes[scheme])
            if manager.pool_classes_by_scheme is not classes:
                manager.pool_classes_by_scheme = classes
            for key in list(manager.pools.keys()):  # pools opened before (an injected client)
                pool = manager.pools.get(key)
                if pool is not None:
                    pool.ConnectionCls = _bounded_connection(pool.ConnectionCls)
        except (AttributeError, KeyError, TypeError) as exc:
            logger.debug(
                "cannot bound this client's requests by the deadline (%s); bodies are checked between reads", exc
            )
            return False
        self.installed = True
        return True

    @contextlib.contextmanager
    def scope(self, deadline: Deadline) -> Iterator[_Scope]:
        """Bound the requests this thread makes inside the block by ``deadline``."""
        previous = _current()
        if previous is not None and previous.guard is self and previous.deadline is deadline:
            yield previous  # nested (a worker's HEAD): one scope, cut together
            return
        scope = _Scope(self, deadline)
        _local.scope = scope
        if deadline.bounded:
            self._enter(scope)
        try:
            yield scope
        finally:
            _local.scope = previous
            self._leave(scope)

    def cancel(self, scope: _Scope) -> None:
        """Cut ``scope``'s requests now, as if its deadline had passed (another transfer failed)."""
        with self._cond:
            scope.fired = True
            for sock in scope.socks:
                _shutdown(sock)

    def close(self) -> None:
        """Stop the watchdog (it also stops by itself when no bounded scope is open)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- bookkeeping ------------------------------------------------------------------

    def _enter(self, scope: _Scope) -> None:
        with self._cond:
            self._scopes.add(scope)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._watch, name="model-loader-s3-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _leave(self, scope: _Scope) -> None:
        with self._cond:
            self._scopes.discard(scope)
            for sock in scope.socks:
                if self._owner.get(sock) is scope:
                    del self._owner[sock]
            scope.socks.clear()
            self._cond.notify_all()  # the watchdog stops when no bounded scope is left

    def _attach(self, scope: _Scope, sock: socket.socket) -> None:
        with self._cond:
            previous = self._owner.get(sock)
            if previous is scope:
                return
            if previous is not None:  # a pooled socket now used by another scope
                previous.socks.discard(sock)
            self._owner[sock] = scope
            scope.socks.add(sock)
            if scope.fired:
                _shutdown(sock)

    def _watch(self) -> None:
        with self._cond:
            while True:
                live = [s for s in self._scopes if not s.fired]
                if not live or self._closed:
                    self._thread = None
                    return
                now = time.monotonic()
                first = min(s.deadline.expires for s in live)
                if first > now:
                    self._cond.wait(first - now)
                    continue
                for s in live:
                    if s.deadline.expires <= now:
                        s.fired = True
                        for sock in s.socks:
                            _shutdown(sock)
