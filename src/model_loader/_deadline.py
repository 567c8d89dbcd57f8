"""One time budget for a load, handed down to every blocking call.

The loader opens a :class:`Deadline` for each load (``LoaderConfig.deadline``), narrows it
per source (``retry.source_deadline``) and per step (``resolve_timeout``), and makes the
narrowest one *current* (a context variable) while it calls a source. A source reads
:meth:`Deadline.current` at the top of ``resolve``/``fetch`` and hands it on, explicitly,
to the threads it starts: every connect, read, whole body, listing crawl, lock wait and
backoff sleep is capped by :meth:`Deadline.timeout`, so nothing blocks past it.

:class:`FetchContext` travels the same way during ``fetch``: the files that an earlier,
interrupted attempt already completed and verified (a source may skip them), and a
callback to report each file as it completes, so the next attempt resumes there.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from model_loader._types import FileEntry
from model_loader.errors import SourceTimeoutError

__all__ = ["Deadline", "FetchContext"]

_CURRENT: contextvars.ContextVar[Deadline] = contextvars.ContextVar("model_loader_deadline")
_FETCH: contextvars.ContextVar[FetchContext] = contextvars.ContextVar("model_loader_fetch")


class Deadline:
    """A point in (monotonic) time after which a load gives up.

    Args:
        seconds: Budget from now; ``None`` for no limit.
        what: What the budget is for, named in timeout errors.

    Example:
        >>> budget = Deadline(10.0, what="the fetch deadline")
        >>> sock.settimeout(budget.timeout(cap=read_timeout))  # at most what is left
    """

    __slots__ = ("expires", "what")

    def __init__(self, seconds: float | None = None, *, what: str = "the deadline") -> None:
        self.expires = math.inf if seconds is None else time.monotonic() + max(0.0, seconds)
        self.what = what

    @classmethod
    def at(cls, expires: float, *, what: str = "the deadline") -> Deadline:
        """A deadline at ``expires`` on the ``time.monotonic()`` clock."""
        deadline = cls(None, what=what)
        deadline.expires = expires
        return deadline

    def __repr__(self) -> str:
        left = "unlimited" if math.isinf(self.expires) else f"{self.remaining():.3f}s left"
        return f"Deadline({self.what!r}, {left})"

    @property
    def bounded(self) -> bool:
        """False for a deadline without a limit."""
        return not math.isinf(self.expires)

    def remaining(self) -> float:
        """Seconds left (``inf`` without a limit, never negative)."""
        return max(0.0, self.expires - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.expires

    def narrow(self, seconds: float | None, *, what: str | None = None) -> Deadline:
        """A deadline ending ``seconds`` from now, or at this one, whichever is first."""
        if seconds is None:
            return Deadline.at(self.expires, what=what or self.what)
        mine = time.monotonic() + max(0.0, seconds)
        if mine < self.expires:
            return Deadline.at(mine, what=what or self.what)
        return Deadline.at(self.expires, what=self.what)

    def check(self, what: str = "", *, scheme: str = "", ref: str = "") -> None:
        """Raise :class:`SourceTimeoutError` if the deadline has passed."""
        if self.expired():
            raise self.error(what, scheme=scheme, ref=ref)

    def error(self, what: str = "", *, scheme: str = "", ref: str = "") -> SourceTimeoutError:
        """The error for running out of this budget while doing ``what``."""
        doing = f"{what}: " if what else ""
        return SourceTimeoutError(f"{doing}{self.what} expired", scheme=scheme, ref=ref)

    def timeout(self, cap: float | None = None, *, what: str = "", scheme: str = "", ref: str = "") -> float:
        """The timeout for one blocking call: ``cap`` or what is left, whichever is less.

        Raises:
            SourceTimeoutError: Nothing is left.
        """
        left = self.expires - time.monotonic()
        if left <= 0:
            raise self.error(what, scheme=scheme, ref=ref)
        return left if cap is None else min(cap, left)

    def sleep(self, seconds: float, sleep: Callable[[float], None] = time.sleep) -> None:
        """Sleep ``seconds``, or until the deadline, whichever is first."""
        sleep(max(0.0, min(seconds, self.expires - time.monotonic())))

    @staticmethod
    def current() -> Deadline:
        """The deadline of the load running in this thread (unlimited outside a load)."""
        return _CURRENT.get(_UNLIMITED)

    @contextlib.contextmanager
    def applied(self) -> Iterator[Deadline]:
        """Make this the :meth:`current` deadline inside the ``with`` block."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


_UNLIMITED = Deadline(None, what="no deadline")


def _ignore(entry: FileEntry) -> None:
    return None


def _ignore_bytes(n: int) -> None:
    return None


def _ignore_prefix(path: str, n: int) -> None:
    return None


@dataclass(frozen=True)
class FetchContext:
    """What a source's ``fetch`` may know about the attempt it is running in.

    Attributes:
        completed: Files an earlier attempt already wrote into ``dest`` and that were
            verified again since; a source declaring ``SourceCapabilities.resumable`` may
            leave them as they are and need not return them. Others never see any.
        file_done: Call with each file as soon as it is complete and checked (size,
            SHA-256 and ``verified``), from any thread: the cache journals it, so a retry
            or the next process resumes after it.
        progress: Call with the number of bytes just written, from any thread, as they
            arrive (progress bars and metrics; cheap).
        partial: Files of which an earlier attempt wrote the first N bytes into ``dest``
            (``path -> N``; the file may be longer): a resumable source may continue such a
            file at byte N, but must still check the whole file (hash it from byte 0).
        file_progress: Call with ``(path, n)`` when the first ``n`` bytes of a large file
            are written contiguously (every few MiB, not per chunk): the cache journals it,
            so a retry or the next process continues the file there.
    """

    completed: Mapping[str, FileEntry] = field(default_factory=lambda: MappingProxyType({}))
    file_done: Callable[[FileEntry], None] = _ignore
    progress: Callable[[int], None] = _ignore_bytes
    partial: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    file_progress: Callable[[str, int], None] = _ignore_prefix

    @staticmethod
    def current() -> FetchContext:
        """The context of the fetch running in this thread (an empty one outside a fetch)."""
        return _FETCH.get(_EMPTY)

    @contextlib.contextmanager
    def applied(self) -> Iterator[FetchContext]:
        token = _FETCH.set(self)
        try:
            yield self
        finally:
            _FETCH.reset(token)


_EMPTY = FetchContext()
