"""Small helpers shared by the core tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from model_loader import CacheConfig, LoaderConfig, RetryPolicy
from model_loader.testing.conformance import read_tree

__all__ = ["Sleeps", "fast_config", "read_tree", "wait_for", "write_tree"]


def write_tree(root: Path, files: Mapping[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def fast_config(cache_dir: Path, **changes: object) -> LoaderConfig:
    """A config whose retries never wait long (tests inject sleep anyway)."""
    retry = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02, jitter=0.0)
    cache = changes.pop("cache", None) or CacheConfig(dir=cache_dir)
    return LoaderConfig(cache=cache, retry=retry, **changes)  # type: ignore[arg-type]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Sleeps(list[float]):
    """An injected sleep that records what it was asked to wait and returns at once."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
