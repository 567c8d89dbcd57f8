"""Serving states, events, status snapshots and the not-ready error."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from model_loader._types import FetchResult
from model_loader.errors import AllSourcesFailedError, ModelNotReadyError

__all__ = ["EventKind", "EventListener", "ModelNotReadyError", "ServingEvent", "ServingState", "ServingStatus"]

logger = logging.getLogger("model_loader.serving")

EventKind = Literal["loaded", "load_failed", "swapped", "reload_failed", "degraded", "recovered"]


class ServingState(str, enum.Enum):
    """Where a :class:`ServedModel` stands.

    - ``loading``: nothing served yet; the first load has not finished.
    - ``ready``: a model is served and the last check of the reference succeeded.
    - ``degraded``: a model is served, but the sources could not be reached: it is the
      last-known-good version from the cache, or the registry has stopped answering.
    - ``failed``: nothing served; the last load failed and is retried in the background.
    """

    LOADING = "loading"
    READY = "ready"
    DEGRADED = "degraded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ServingEvent:
    """Something that happened to a served reference.

    Attributes:
        kind: ``loaded`` (the first model is served), ``load_failed`` (nothing served and the
            load failed), ``swapped`` (a new version replaced the served one),
            ``reload_failed`` (a new version could not be fetched, loaded or warmed; the old
            one keeps serving), ``degraded`` (the sources cannot be reached),
            ``recovered`` (they can again).
        reference: The handle's name (its first source URI unless named).
        version: The version served after the event (``None`` while nothing is served).
        previous: The version served before a swap.
        result: The :class:`FetchResult` of the load behind the event, when there was one.
        error: The error behind ``load_failed``, ``reload_failed`` or ``degraded``.
    """

    kind: EventKind
    reference: str
    version: str | None = None
    previous: str | None = None
    result: FetchResult | None = None
    error: BaseException | None = None


EventListener = Callable[[ServingEvent], object]


@dataclass(frozen=True, slots=True)
class ServingStatus:
    """A point-in-time view of a :class:`ServedModel`, e.g. for a readiness endpoint.

    Attributes:
        reference: The handle's name.
        state: See :class:`ServingState`.
        ready: True while a model is served (degraded included).
        degraded: True in the ``degraded`` state.
        version: The served version, ``None`` until one is loaded.
        digest: The served content's digest.
        source: The source URI that served it.
        loaded_at: ``time.time()`` when the served version was swapped in.
        last_check: ``time.time()`` of the last finished check of the reference.
        last_error: The last failure (``"ErrorType: message"``) since the last success.
    """

    reference: str
    state: ServingState
    ready: bool
    degraded: bool
    version: str | None
    digest: str | None
    source: str | None
    loaded_at: float | None
    last_check: float | None
    last_error: str | None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (``state`` as its string value)."""
        return {
            "reference": self.reference,
            "state": self.state.value,
            "ready": self.ready,
            "degraded": self.degraded,
            "version": self.version,
            "digest": self.digest,
            "source": self.source,
            "loaded_at": self.loaded_at,
            "last_check": self.last_check,
            "last_error": self.last_error,
        }


_LEVELS: dict[EventKind, int] = {
    "loaded": logging.INFO,
    "swapped": logging.INFO,
    "recovered": logging.INFO,
    "degraded": logging.WARNING,
    "load_failed": logging.WARNING,
    "reload_failed": logging.WARNING,
}


def log_event(event: ServingEvent, *, repeat: int = 0) -> None:
    """Log one event; a failure repeated at every interval drops to INFO after the first."""
    level = _LEVELS[event.kind]
    if repeat and level == logging.WARNING:
        level = logging.INFO
    if event.kind == "swapped":
        logger.log(level, "%s: swapped version %s -> %s", event.reference, event.previous, event.version)
    elif event.error is not None:
        again = f" (again, {repeat + 1} times in a row)" if repeat else ""
        logger.log(
            level,
            "%s: %s%s: %s; serving %s",
            event.reference,
            event.kind.replace("_", " "),
            again,
            describe(event.error),
            event.version or "nothing",
        )
    else:
        logger.log(level, "%s: %s, serving version %s", event.reference, event.kind, event.version)


def describe(exc: BaseException) -> str:
    """``"ErrorType: first line"`` of an error; every source's reason for AllSourcesFailedError."""
    if isinstance(exc, AllSourcesFailedError) and exc.failures:
        return "; ".join(f"{uri}: {describe(err)}" for uri, err in exc.failures)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
