"""ServedModel: one reference, served while the service runs, following the registry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from model_loader._types import FetchResult, LoadedModel
from model_loader.errors import AllSourcesFailedError, ModelLoaderError, SourceUnavailableError
from model_loader.serving._events import (
    EventKind,
    EventListener,
    ModelNotReadyError,
    ServingEvent,
    ServingState,
    ServingStatus,
    describe,
    log_event,
)

if TYPE_CHECKING:
    from model_loader.config import LoaderConfig
    from model_loader.loader import ResilientLoader, SourceLike
    from model_loader.metrics import ServingMetrics

__all__ = ["ServedModel", "with_warmup"]

logger = logging.getLogger("model_loader.serving")

LoaderFn = Callable[[Path], Any]
Warmup = Callable[[Any], object]
Wait = Callable[[float], object]

DEFAULT_RELOAD_INTERVAL = 30.0
DEFAULT_RETRY_INTERVAL = 10.0  # before anything is served, when reloading is off


@runtime_checkable
class _CountedLeases(Protocol):
    """Counted, in-process leases on the cache entry behind a result (asked of the loader).

    The handle holds one per snapshot, from its swap-in until no request uses it, so the
    files of a model that reads them lazily are never evicted under a running request.
    """

    def retain(self, result: FetchResult) -> None: ...

    def release(self, result: FetchResult) -> None: ...


@dataclass(eq=False, slots=True)
class _Served:
    """One served version. ``users``/``retired`` are guarded by the handle's ``_users_lock``."""

    pair: LoadedModel
    loaded_at: float
    users: int = 0
    retired: bool = False


def with_warmup(loader_fn: LoaderFn, warm: Warmup | None) -> LoaderFn:
    """``loader_fn`` followed by ``warm(model)``: a version whose warm-up raises is never served.

    The warm-up runs as part of deserialization, so a model is cached in memory, recorded
    as last-known-good and swapped in only once it has answered.
    """
    if warm is None:
        return loader_fn

    def load_and_warm(path: Path) -> Any:
        model = loader_fn(path)
        warm(model)
        return model

    return load_and_warm


class ServedModel:
    """A model served from one reference, reloaded in the background when the reference moves.

    Requests call :meth:`get` (or ``with served.use()``), which never blocks and never touches
    the network: it returns the current ``(model, FetchResult)`` pair, an immutable snapshot
    replaced atomically when a new version has been fetched, deserialized and warmed by the
    watcher thread. A version that fails leaves the old one serving and is retried at the next
    interval; a registry outage only flags the handle ``degraded``.

    Args:
        sources: One URI, or URIs or ``(source, uri)`` pairs tried in order (default:
            ``config.sources``).
        name: The name in events, logs and metric labels (default: the first source URI).
        config: Loader settings (default: :meth:`LoaderConfig.from_env`).
        loader_fn: Turns a model directory into an object (default: MLflow pyfunc).
        warm: Called with each newly loaded model before it is served (e.g. one prediction);
            if it raises, that version is not served.
        reload_interval: Seconds between checks of the reference; ``0`` turns reloading off.
        jitter: Each wait is ``interval * (1 ± jitter)``, so replicas do not check in step.
        retry_interval: Seconds between attempts while nothing is served (default: the
            reload interval, or 10 s when reloading is off).
        metrics: A :class:`~model_loader.metrics.ServingMetrics` to update.
        on_event: Called with every :class:`ServingEvent` (in the watcher thread).
        loader: A :class:`ResilientLoader` to use instead of building one from ``sources`` and
            ``config`` (it is not closed by :meth:`close`).
        wait: ``wait(seconds)`` between checks, returning true to stop (tests inject a clock).

    Example:
        >>> served = ServedModel(["models:/fraud@champion"], reload_interval=30).start()
        >>> served.ready
        False
        >>> model, result = served.get()   # once ready; raises ModelNotReadyError before
    """

    def __init__(
        self,
        sources: SourceLike | Sequence[SourceLike] | None = None,
        *,
        name: str | None = None,
        config: LoaderConfig | None = None,
        loader_fn: LoaderFn | None = None,
        warm: Warmup | None = None,
        reload_interval: float = DEFAULT_RELOAD_INTERVAL,
        jitter: float = 0.1,
        retry_interval: float | None = None,
        metrics: ServingMetrics | None = None,
        on_event: EventListener | None = None,
        loader: ResilientLoader | None = None,
        wait: Wait | None = None,
    ) -> None:
        if reload_interval < 0 or jitter < 0 or jitter >= 1 or (retry_interval is not None and retry_interval <= 0):
            raise ValueError("reload_interval must be >= 0, 0 <= jitter < 1 and retry_interval > 0")
        from model_loader.loader import default_model_loader

        if loader is None:
            from model_loader._cache import MemoryCache
            from model_loader.config import LoaderConfig
            from model_loader.loader import ResilientLoader

            config = config if config is not None else LoaderConfig.from_env()
            # Room for the served object and the next version: an unchanged reference must
            # always be a memory hit, however small the configured budget is.
            memory = MemoryCache(max(2, config.cache.memory_items))
            loader = ResilientLoader(sources, config=config, memory=memory)
            self._owns_loader = True
        else:
            if sources is not None or config is not None:
                raise TypeError("pass either loader= or sources/config, not both")
            self._owns_loader = False
        self._loader = loader
        self.name = name or loader.sources[0]
        self._fn = with_warmup(loader_fn or default_model_loader, warm)
        self.reload_interval = float(reload_interval)
        self.retry_interval = float(retry_interval or reload_interval or DEFAULT_RETRY_INTERVAL)
        self._jitter = jitter
        self._rng = random.Random()
        self._metrics = metrics
        self._listeners: list[EventListener] = [on_event] if on_event is not None else []
        self._stop = threading.Event()
        self._wait: Wait = wait or self._stop.wait
        self._thread: threading.Thread | None = None
        self._check_lock = threading.Lock()  # one check at a time (watcher, refresh(), load())
        self._users_lock = threading.Lock()
        self._ready = threading.Event()
        self._current: _Served | None = None  # swapped atomically; read without a lock
        self._attempted = False
        self._degraded = False
        self._last_check: float | None = None
        self._last_error: str | None = None
        self._streak: tuple[EventKind, int] | None = None  # repeated failures log once at WARNING
        self._closed = False
        if metrics is not None:
            metrics.register(self.name)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> ServedModel:
        """Build from ``MODEL_LOADER_*`` variables (``SOURCES``, ``CACHE_DIR``, ...), plus
        ``MODEL_LOADER_RELOAD_INTERVAL`` (seconds, default 30; ``0`` turns reloading off).

        Keyword arguments win over the environment.

        Raises:
            ValueError: ``MODEL_LOADER_RELOAD_INTERVAL`` is not a number >= 0.
            pydantic.ValidationError: Another variable is invalid.
        """
        from model_loader.config import LoaderConfig

        env = os.environ if environ is None else environ
        if "reload_interval" not in kwargs:
            raw = env.get("MODEL_LOADER_RELOAD_INTERVAL", "").strip()
            try:
                interval = float(raw) if raw else DEFAULT_RELOAD_INTERVAL
            except ValueError:
                interval = -1.0
            if not interval >= 0:  # also rejects nan
                raise ValueError(f"MODEL_LOADER_RELOAD_INTERVAL={raw!r}: expected seconds >= 0 (0 turns reloading off)")
            kwargs["reload_interval"] = interval
        if "config" not in kwargs and "loader" not in kwargs:
            kwargs["config"] = LoaderConfig.from_env(environ)
        return cls(**kwargs)

    # -- the hot path ----------------------------------------------------------------------

    def get(self) -> LoadedModel:
        """The served ``(model, result)`` pair: no lock, no I/O.

        Raises:
            ModelNotReadyError: Nothing is served yet.
        """
        served = self._current
        if served is None:
            raise ModelNotReadyError(f"{self.name}: no model is served yet ({self.state.value})")
        return served.pair

    @contextlib.contextmanager
    def use(self) -> Iterator[LoadedModel]:
        """``with served.use() as (model, result):`` the pair, kept alive for the block.

        A version swapped out while blocks still use it is released (its cache lease
        dropped) when the last of them exits.

        Raises:
            ModelNotReadyError: Nothing is served yet.
        """
        with self._users_lock:
            served = self._current
            if served is not None:
                served.users += 1
        if served is None:
            raise ModelNotReadyError(f"{self.name}: no model is served yet ({self.state.value})")
        try:
            yield served.pair
        finally:
            with self._users_lock:
                served.users -= 1
                drained = served.retired and served.users == 0
            if drained:
                self._release(served)

    @property
    def ready(self) -> bool:
        """True while a model is served (degraded included): the readiness probe."""
        return self._current is not None

    @property
    def state(self) -> ServingState:
        if self._current is None:
            return ServingState.FAILED if self._attempted else ServingState.LOADING
        return ServingState.DEGRADED if self._degraded else ServingState.READY

    def status(self) -> ServingStatus:
        """A consistent snapshot of the state and the served version."""
        served = self._current  # one read: state and version agree
        result = served.pair.result if served is not None else None
        if served is None:
            state = ServingState.FAILED if self._attempted else ServingState.LOADING
        else:
            state = ServingState.DEGRADED if self._degraded else ServingState.READY
        return ServingStatus(
            reference=self.name,
            state=state,
            ready=served is not None,
            degraded=state is ServingState.DEGRADED,
            version=result.version if result else None,
            digest=result.digest if result else None,
            source=result.source if result else None,
            loaded_at=served.loaded_at if served else None,
            last_check=self._last_check,
            last_error=self._last_error,
        )

    def add_listener(self, listener: EventListener) -> None:
        """Also call ``listener`` with every event (in the thread that caused it)."""
        self._listeners.append(listener)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ServedModel:
        """Start the watcher thread: it loads first if nothing is served, then checks the
        reference every ``reload_interval`` seconds. Returns at once; idempotent."""
        if self._closed:
            raise RuntimeError(f"{self.name}: start() after close()")
        if self._thread is not None and self._thread.is_alive():
            return self
        if self._current is not None and self.reload_interval == 0:
            return self  # loaded, and nothing to follow
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name=f"model-loader-watch[{self.name}]", daemon=True)
        self._thread.start()
        return self

    def load(self) -> LoadedModel:
        """Load now in this thread if nothing is served yet; return what is served.

        Raises:
            AllSourcesFailedError: Nothing could be served (the failure is also reported).
        """
        if self._current is None:
            self._check(raise_errors=True)
        return self.get()

    async def aload(self) -> LoadedModel:
        """:meth:`load` in a worker thread."""
        return await asyncio.to_thread(self.load)

    def refresh(self) -> ServingStatus:
        """Check the reference once now, in this thread, as the watcher does; never raises
        for a failed load (it is reported). Returns the status after the check."""
        self._check(raise_errors=False)
        return self.status()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a model is served or ``timeout`` seconds passed; returns :attr:`ready`."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the watcher. A check already running finishes first (up to ``timeout``).

        Returns:
            True when the thread has ended.
        """
        self._stop.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("%s: the watcher is still loading after %.1fs; leaving it to finish", self.name, timeout)
            return False
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Stop the watcher and close the loader this handle built. Idempotent.

        The served model stays available to :meth:`get`.
        """
        if self._closed:
            return
        self._closed = True
        self.stop(timeout)
        if self._owns_loader:
            self._loader.close()

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the watcher -----------------------------------------------------------------------

    def _watch(self) -> None:
        if self._current is None:
            self._check(raise_errors=False)
        while not self._stop.is_set():
            if self._current is not None and self.reload_interval == 0:
                return
            interval = self.reload_interval if self._current is not None else self.retry_interval
            delay = interval * (1 + self._rng.uniform(-self._jitter, self._jitter))
            if self._wait(delay) or self._stop.is_set():
                return
            self._check(raise_errors=False)

    def _check(self, *, raise_errors: bool) -> None:
        with self._check_lock:
            try:
                loaded = self._loader.load_with_result(self._fn)
            except Exception as exc:
                self._last_check = time.time()
                if self._stop.is_set() and self._closed:
                    return  # the loader was closed under a running check
                self._failed(exc)
                if raise_errors:
                    raise
                return
            self._last_check = time.time()
            self._loaded(loaded)

    def _loaded(self, loaded: LoadedModel) -> None:
        result = loaded.result
        if self._metrics is not None:
            self._metrics.observe_load(self.name, result)
        current = self._current
        if current is None:
            self._degraded = result.degraded  # before the snapshot is visible: never "ready" for a moment
            self._last_error = None
            self._streak = None
            self._install(loaded, None)
            self._emit("loaded", result=result)
            if result.degraded:
                self._emit("degraded", result=result, error=_outage(result))
            return
        if result.degraded:
            # An outage never changes what is served, whatever the cache's last-known-good says.
            self._set_degraded(result, _outage(result))
            return
        self._last_error = None
        self._streak = None
        served = current.pair.result
        if (result.source, result.version) != (served.source, served.version):
            self._install(loaded, current)
            self._emit("swapped", result=result, previous=served.version)
        if self._degraded:
            self._degraded = False
            self._emit("recovered", result=result)

    def _failed(self, exc: BaseException) -> None:
        self._last_error = describe(exc)
        if not isinstance(exc, ModelLoaderError):  # a bug in a source or the loader, not a verdict
            logger.error("%s: unexpected error while loading", self.name, exc_info=exc)
        if self._current is None:
            self._attempted = True
            self._emit("load_failed", error=exc)
        elif _is_outage(exc):
            self._set_degraded(None, exc)
        else:
            if self._degraded:  # a source answered, with a broken version: the outage is over
                self._degraded = False
                self._emit("recovered")
            self._emit("reload_failed", error=exc)

    def _set_degraded(self, result: FetchResult | None, error: BaseException) -> None:
        if not self._degraded:
            self._degraded = True
            self._last_error = describe(error)
            self._emit("degraded", result=result, error=error)

    def _install(self, loaded: LoadedModel, old: _Served | None) -> None:
        new = _Served(loaded, time.time())
        self._lease("retain", new)
        with self._users_lock:
            self._current = new
            drained = False
            if old is not None:
                old.retired = True
                drained = old.users == 0
        self._ready.set()
        if drained and old is not None:
            self._release(old)

    def _release(self, old: _Served) -> None:
        """A retired version nobody uses any more: drop its lease (the new one holds its own)."""
        self._lease("release", old)

    def _lease(self, action: str, served: _Served) -> None:
        loader = self._loader
        if not isinstance(loader, _CountedLeases):
            return  # the loader keeps the served version's lease on its own
        try:
            (loader.retain if action == "retain" else loader.release)(served.pair.result)
        except Exception:  # leases are housekeeping: never let them break serving
            logger.warning("%s: could not %s version %s", self.name, action, served.pair.result.version, exc_info=True)

    def _emit(
        self,
        kind: EventKind,
        *,
        result: FetchResult | None = None,
        previous: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        served = self._current
        version = served.pair.result.version if served is not None else None
        event = ServingEvent(kind, self.name, version, previous, result, error)
        repeat = 0
        if kind in ("load_failed", "reload_failed"):
            repeat = self._streak[1] + 1 if self._streak is not None and self._streak[0] == kind else 0
            self._streak = (kind, repeat)
        log_event(event, repeat=repeat)
        if self._metrics is not None:
            self._metrics.observe_event(event, served.pair.result if served is not None else None)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("%s: event listener %r raised", self.name, listener)


def _is_outage(exc: BaseException) -> bool:
    """Every source failed because it could not be reached (not a broken version)."""
    if not isinstance(exc, AllSourcesFailedError) or not exc.failures:
        return isinstance(exc, SourceUnavailableError)
    return all(isinstance(err, SourceUnavailableError) for _, err in exc.failures)


def _outage(result: FetchResult) -> BaseException:
    reasons = "; ".join(f"{uri}: {err}" for uri, err in result.failures) or "every source failed"
    return SourceUnavailableError(f"serving version {result.version} from the cache: {reasons}")
