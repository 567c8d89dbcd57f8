"""One S3 request, bounded by the deadline, mapped to a typed error, re-issued after a fast failure.

The loader's ``RetryPolicy`` retries whole steps. Inside a step, a listing crawl or a
fetch of many objects would otherwise start over for one failed request, so a request
that fails *fast* with a transient error (5xx, SlowDown, a reset, a body cut short, a
malformed answer) is re-issued up to ``attempts`` times, with jittered backoff taken from
the deadline. A :class:`RetryQuota` per source (AWS SDKs' "standard" retry quota) stops
those re-issues when the store fails more than it succeeds, so attempts do not multiply
against a store that is down. Timeouts are never re-issued here.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from model_loader._deadline import Deadline
from model_loader.errors import (
    InvalidResponseError,
    ModelLoaderError,
    SourceError,
    SourceTimeoutError,
    SourceUnavailableError,
)
from model_loader.sources._s3_deadline import RequestGuard
from model_loader.sources._s3_errors import translate

__all__ = ["RetryQuota", "Runner", "backoff", "error_for", "reissuable"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

_QUOTA = 20  # re-issues allowed before successes must pay for more
_MAX_BACKOFF = 2.0


class RetryQuota:
    """Tokens for re-issued requests: each costs one, each success earns one back (up to the start)."""

    def __init__(self, tokens: int = _QUOTA) -> None:
        self._lock = threading.Lock()
        self._cap = tokens
        self._tokens = tokens

    def take(self) -> bool:
        with self._lock:
            if self._tokens <= 0:
                return False
            self._tokens -= 1
            return True

    def earn(self) -> None:
        with self._lock:
            if self._tokens < self._cap:
                self._tokens += 1


def error_for(exc: BaseException, what: str, uri: str, deadline: Deadline) -> ModelLoaderError:
    """The typed error for ``exc``, raised by a request (or a body read) for ``what``.

    A response botocore could not parse is :class:`InvalidResponseError`; a transient
    failure once the deadline has passed is the deadline's :class:`SourceTimeoutError`
    (the watchdog cut the connection).
    """
    mapped = translate(exc, what, uri)
    if mapped is None:
        if isinstance(exc, (ValueError, TypeError, KeyError, IndexError, AttributeError)) or (
            type(exc).__name__ == "ResponseParserError"
        ):
            mapped = InvalidResponseError(
                f"{what}: malformed response: {type(exc).__name__}: {exc}", scheme="s3", ref=uri
            )
        else:
            mapped = SourceError(f"{what}: {type(exc).__name__}: {exc}", scheme="s3", ref=uri)
    if deadline.expired() and isinstance(mapped, SourceUnavailableError) and not isinstance(mapped, SourceTimeoutError):
        mapped = deadline.error(what, scheme="s3", ref=uri)
    if mapped is not exc and mapped.__cause__ is None:
        mapped.__cause__ = exc
    return mapped


def reissuable(err: BaseException) -> bool:
    """A fast transient failure worth re-issuing inside the step.

    Not a timeout (the deadline and the loader own time), and not a refused connection
    (nothing listens: the store is down, not flaky; the loader falls back sooner).
    """
    if not isinstance(err, SourceUnavailableError) or isinstance(err, SourceTimeoutError):
        return False
    return type(err.__cause__).__name__ not in _NOT_LISTENING


_NOT_LISTENING = frozenset({"EndpointConnectionError", "NewConnectionError", "ConnectionRefusedError"})


def backoff(base: float, attempt: int) -> float:
    """Full-jitter exponential backoff before re-issue number ``attempt`` (1-based)."""
    return random.uniform(0, min(_MAX_BACKOFF, base * 2 ** (attempt - 1)))


class Runner:
    """Runs one source's blocking requests (LIST pages, HEADs) under the guard and the quota.

    Args:
        guard: Bounds each request by the deadline.
        attempts: Tries per request, the first included.
        backoff: Seconds before the first re-issue (doubling, full jitter, at most 2 s).
    """

    def __init__(self, guard: RequestGuard, attempts: int, backoff: float) -> None:
        self.guard = guard
        self.attempts = attempts
        self.backoff = backoff
        self.quota = RetryQuota()
        self.sleep: Callable[[float], None] = time.sleep

    def call(self, deadline: Deadline, what: str, uri: str, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """``fn(**kwargs)`` (a client method), re-issued after fast transient failures."""
        attempt = 1
        while True:
            deadline.check(what, scheme="s3", ref=uri)
            try:
                with self.guard.scope(deadline):
                    result = fn(**kwargs)
            except Exception as exc:
                err = error_for(exc, what, uri, deadline)
                delay = backoff(self.backoff, attempt)
                if (
                    not reissuable(err)
                    or attempt >= self.attempts
                    or delay >= deadline.remaining()
                    or not self.quota.take()
                ):
                    if err is exc:
                        raise
                    raise err from exc
                logger.warning(
                    "%s failed (attempt %d/%d): %s; again in %.2fs", what, attempt, self.attempts, err, delay
                )
                deadline.sleep(delay, self.sleep)
                attempt += 1
                continue
            self.quota.earn()
            return result
