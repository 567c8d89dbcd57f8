"""ResilientLoader: resolve -> memory -> disk cache -> fetch -> verify -> publish, with
retries, deadlines, fallback across sources and last-known-good serving."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from model_loader._cache import CachedEntry, DiskCache, MemoryCache
from model_loader._types import FetchResult, LoadedModel, ModelRef, ResolvedModel, Timings
from model_loader._uri import parse_ref
from model_loader.config import LoaderConfig
from model_loader.errors import (
    AllSourcesFailedError,
    DeserializationError,
    IntegrityError,
    MissingDependencyError,
    ModelLoaderError,
    ModelNotFoundError,
    SourceError,
    SourceTimeoutError,
    SourceUnavailableError,
    StaleResolutionError,
)
from model_loader.protocol import FetchObserver, ModelSource, SourceSettings, SupportsVersionHistory
from model_loader.registry import create_source

__all__ = ["ResilientLoader", "SourceSpec", "default_model_loader"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
SourceLike = str | ModelRef | tuple[ModelSource, "str | ModelRef"]
LoaderFn = Callable[[Path], Any]

# Failures after which serving the last-known-good version is right: the authority did not
# say "this does not exist" or "you may not", it just could not deliver.
_DEGRADABLE = (SourceUnavailableError, StaleResolutionError, IntegrityError)


class _NoObserver:
    def fetch_started(self, source: str, staging: Path, expected_bytes: int | None) -> None:
        return None

    def fetch_finished(self, source: str) -> None:
        return None


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One entry of the loader's ordered source list."""

    source: ModelSource
    ref: ModelRef
    owned: bool  # built by the loader from a URI, so closed by it

    @property
    def uri(self) -> str:
        return self.ref.uri


def default_model_loader(path: Path) -> Any:
    """Deserialize with MLflow's pyfunc loader when ``path`` holds an ``MLmodel`` file.

    Raises:
        MissingDependencyError: There is an MLmodel file but mlflow is not installed.
        DeserializationError: There is no MLmodel file: pass ``loader_fn``.
    """
    if not (path / "MLmodel").is_file():
        raise DeserializationError(
            f"{path} has no MLmodel file, so there is no default way to load it: "
            "pass loader_fn=... (a callable taking the model directory)"
        )
    try:
        import mlflow.pyfunc
    except ImportError as exc:
        raise MissingDependencyError(
            "loading an MLflow model needs mlflow: pip install 'model-loader[mlflow]', or pass loader_fn=...",
            extra="mlflow",
        ) from exc
    return mlflow.pyfunc.load_model(str(path))


class ResilientLoader:
    """Load one model from ordered sources with caching, retries and fallback.

    Args:
        sources: URIs (``"models:/iris@champion"``), parsed refs, or ``(source, uri)`` pairs,
            tried in order. Default: ``config.sources``.
        config: Settings; default :meth:`LoaderConfig.from_env` (read now, not at import).
        loader_fn: Turns a model directory into an object for :meth:`load`.
        sleep: Used between retries (tests inject a fake).
        observer: Download hooks (progress reporting).

    Example:
        >>> loader = ResilientLoader(["models:/iris@champion", "s3://models/iris/"])
        >>> result = loader.fetch()
        >>> result.source, result.version, result.degraded
        ('models:/iris@champion', 'iris/3', False)
    """

    def __init__(
        self,
        sources: Sequence[SourceLike] | None = None,
        *,
        config: LoaderConfig | None = None,
        loader_fn: LoaderFn | None = None,
        sleep: Callable[[float], None] = time.sleep,
        observer: FetchObserver | None = None,
    ) -> None:
        self.config = config if config is not None else LoaderConfig.from_env()
        c = self.config
        self.cache = DiskCache(
            c.cache.dir,
            max_size=c.cache.max_size,
            verify=c.cache.verify,
            lock_timeout=c.cache.lock_timeout,
            min_free=c.cache.min_free,
        )
        self.memory = MemoryCache(c.cache.memory_items)
        self._loader_fn = loader_fn
        self._sleep = sleep
        self._observer: FetchObserver = observer or _NoObserver()
        self._settings = SourceSettings(
            connect_timeout=c.connect_timeout,
            read_timeout=c.read_timeout,
            max_concurrency=c.max_concurrency,
            include=c.include,
            exclude=c.exclude,
            state_dir=self.cache.state_dir,
        )
        items = list(sources) if sources is not None else list(c.sources)
        if not items:
            raise ValueError("ResilientLoader needs at least one source (argument or MODEL_LOADER_SOURCES)")
        self._specs: list[SourceSpec] = []
        try:
            for item in items:
                self._specs.append(self._spec(item))
        except BaseException:
            self.close()
            raise
        self.last_result: FetchResult | None = None
        self._recent: dict[LoaderFn | None, tuple[float, FetchResult, Any]] = {}
        self._serving: dict[str, str] = {}  # source uri -> cache key it serves now

    def _spec(self, item: SourceLike) -> SourceSpec:
        if isinstance(item, tuple):
            source, ref = item
            if not isinstance(source, ModelSource):
                raise TypeError(f"{source!r} does not implement the ModelSource protocol")
            parsed = ref if isinstance(ref, ModelRef) else parse_ref(ref, check_scheme=False)
            return SourceSpec(source, parsed, owned=False)
        parsed = item if isinstance(item, ModelRef) else parse_ref(item)
        return SourceSpec(create_source(parsed, self._settings), parsed, owned=True)

    @property
    def sources(self) -> tuple[str, ...]:
        """The source URIs, in the order they are tried."""
        return tuple(s.uri for s in self._specs)

    # -- public API ---------------------------------------------------------------------

    def fetch(self) -> FetchResult:
        """Serve the model's files: from the first source that works, else last-known-good.

        Raises:
            AllSourcesFailedError: No source delivered and nothing usable is cached.
            CacheError: The cache disk is full or locked too long.
        """
        result = self._run(None)
        return result[0]

    def load(self, loader_fn: LoaderFn | None = None) -> Any:
        """Fetch, then deserialize (cached in memory per version); see :attr:`last_result`.

        Args:
            loader_fn: Overrides the loader's ``loader_fn``; default: MLflow pyfunc for
                directories with an ``MLmodel`` file.

        Raises:
            DeserializationError: The loader function raised (and no earlier version served).
        """
        fn = loader_fn or self._loader_fn or default_model_loader
        return self._run(fn)[1]

    def load_with_result(self, loader_fn: LoaderFn | None = None) -> LoadedModel:
        """:meth:`load`, returning the object and the :class:`FetchResult` that served it together.

        Concurrent callers each get their own pair (``last_result`` is whichever finished last).

        Example:
            >>> model, result = loader.load_with_result()
            >>> result.version, result.timings.deserialize
        """
        fn = loader_fn or self._loader_fn or default_model_loader
        result, obj = self._run(fn)
        return LoadedModel(obj, result)

    async def aload_with_result(self, loader_fn: LoaderFn | None = None) -> LoadedModel:
        """:meth:`load_with_result` in a worker thread."""
        return await asyncio.to_thread(self.load_with_result, loader_fn)

    async def afetch(self) -> FetchResult:
        """:meth:`fetch` in a worker thread; the event loop keeps running."""
        return await asyncio.to_thread(self.fetch)

    async def aload(self, loader_fn: LoaderFn | None = None) -> Any:
        """:meth:`load` in a worker thread; the event loop keeps running."""
        return await asyncio.to_thread(self.load, loader_fn)

    def close(self) -> None:
        """Close the sources this loader built and release cache leases. Idempotent."""
        for spec in self._specs:
            if spec.owned:
                spec.source.close()
        self.cache.release_all()

    def __enter__(self) -> ResilientLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the path of one load -----------------------------------------------------------

    def _run(self, fn: LoaderFn | None) -> tuple[FetchResult, Any]:
        ttl = self.config.resolve_ttl
        if ttl > 0:
            recent = self._recent.get(fn)
            if recent is not None and time.monotonic() - recent[0] < ttl:
                return recent[1], recent[2]  # the hot path: no resolve, no disk
            out = self._run_once(fn)
            self._recent[fn] = (time.monotonic(), *out)
            return out
        return self._run_once(fn)

    def _run_once(self, fn: LoaderFn | None) -> tuple[FetchResult, Any]:
        start = time.monotonic()
        deadline = start + self.config.deadline
        failures: list[tuple[str, BaseException]] = []
        if self.config.offline:
            cached = self._serve_cached(fn, start, failures, offline=True)
            if cached is None:
                raise AllSourcesFailedError("offline mode: nothing usable in the cache", failures)
            return cached
        for spec in self._specs:
            if time.monotonic() >= deadline:
                failures.append((spec.uri, SourceTimeoutError("the loader's deadline expired before this source")))
                continue
            try:
                out = self._from_source(spec, fn, start, deadline, failures)
            except (SourceError, IntegrityError, DeserializationError) as exc:
                failures.append((spec.uri, exc))
                logger.warning("source %s failed: %s: %s", spec.uri, type(exc).__name__, exc)
                continue
            self.last_result = out[0]
            return out
        if any(isinstance(exc, _DEGRADABLE) for _, exc in failures):
            cached = self._serve_cached(fn, start, failures, offline=False)
            if cached is not None:
                return cached
        logger.error("every source failed: %s", "; ".join(f"{u}: {type(e).__name__}" for u, e in failures))
        raise AllSourcesFailedError("every source failed and no cached version could be served", failures)

    def _from_source(
        self,
        spec: SourceSpec,
        fn: LoaderFn | None,
        start: float,
        deadline: float,
        failures: list[tuple[str, BaseException]],
    ) -> tuple[FetchResult, Any]:
        source_deadline = min(deadline, time.monotonic() + self.config.retry.source_deadline)
        t0 = time.monotonic()
        resolved = self._retry(lambda: spec.source.resolve(spec.ref), source_deadline, spec, "resolve")
        t_resolve = time.monotonic() - t0
        if fn is not None:
            hit = self.memory.get((resolved.cache_key, fn))
            if hit is not None:
                result, obj = hit
                timings = Timings(resolve=t_resolve, total=time.monotonic() - start)
                return _replace(result, from_cache=True, timings=timings, failures=_describe(failures)), obj
        candidates: list[ResolvedModel] = [resolved]
        errors: list[BaseException] = []
        history_checked = False
        i = 0
        while i < len(candidates):
            candidate = candidates[i]
            try:
                return self._serve(spec, candidate, fn, start, t_resolve, source_deadline, failures)
            except (SourceError, IntegrityError, DeserializationError) as exc:
                if isinstance(exc, SourceUnavailableError) or not self.config.fallback_versions:
                    raise
                errors.append(exc)
                logger.warning(
                    "version %s from %s is broken (%s); trying an earlier one", candidate.version, spec.uri, exc
                )
                if not history_checked:
                    history_checked = True
                    candidates.extend(self._history(spec, candidate, source_deadline))
            i += 1
        raise errors[0]

    def _history(self, spec: SourceSpec, resolved: ResolvedModel, deadline: float) -> list[ResolvedModel]:
        source = spec.source
        if not (type(source).capabilities.version_history and isinstance(source, SupportsVersionHistory)):
            return []
        n = self.config.fallback_versions
        return self._retry(lambda: source.previous_versions(resolved, n), deadline, spec, "list versions")

    def _serve(
        self,
        spec: SourceSpec,
        resolved: ResolvedModel,
        fn: LoaderFn | None,
        start: float,
        t_resolve: float,
        deadline: float,
        failures: list[tuple[str, BaseException]],
    ) -> tuple[FetchResult, Any]:
        t0 = time.monotonic()
        try:
            entry, fetched, t_verify = self._materialize(spec, resolved, deadline)
        except StaleResolutionError:
            logger.warning("%s changed while fetching %s; resolving again", spec.uri, resolved.version)
            resolved = self._retry(lambda: spec.source.resolve(spec.ref), deadline, spec, "resolve")
            entry, fetched, t_verify = self._materialize(spec, resolved, deadline)
        t_fetch = time.monotonic() - t0 - t_verify
        result = FetchResult(
            path=entry.path,
            source=spec.uri,
            ref=spec.ref,
            version=entry.version,
            digest=entry.digest,
            from_cache=not fetched,
            timings=Timings(resolve=t_resolve, fetch=t_fetch, verify=t_verify, total=time.monotonic() - start),
            failures=_describe(failures),
        )
        obj = self._deserialize(fn, result, entry.key) if fn is not None else None
        self.cache.record_ref(spec.source.identity, spec.ref.uri, entry, spec.uri)
        self._now_serving(spec.uri, entry.key)
        if fetched and self.cache.max_size is not None:
            self.cache.prune()
        return result, obj

    def _now_serving(self, uri: str, key: str) -> None:
        """Release the lease on the version this source served before, once nothing serves it."""
        previous = self._serving.get(uri)
        self._serving[uri] = key
        if previous is not None and previous != key and previous not in self._serving.values():
            self.cache.release_lease(previous)

    def _deserialize(self, fn: LoaderFn, result: FetchResult, key: str) -> Any:
        def build() -> tuple[FetchResult, Any]:
            try:
                return result, fn(result.path)
            except ModelLoaderError:
                raise
            except Exception as exc:
                raise DeserializationError(f"loading {result.source} version {result.version} failed: {exc}") from exc

        return self.memory.get_or_load((key, fn), build)[1]

    def _materialize(
        self, spec: SourceSpec, resolved: ResolvedModel, deadline: float
    ) -> tuple[CachedEntry, bool, float]:
        """The verified cache entry for ``resolved``, fetching it if needed.

        Returns:
            ``(entry, fetched, seconds spent verifying)``.
        """
        key = resolved.cache_key
        t0 = time.monotonic()
        try:
            hit = self.cache.lookup(key)
        except IntegrityError:
            hit = None  # corrupt: re-checked and quarantined under the lock below
        if hit is not None:
            return hit, False, time.monotonic() - t0
        with self.cache.lock(key):
            try:
                hit = self.cache.lookup(key)
            except IntegrityError as exc:
                self.cache.quarantine(key, str(exc))
                hit = None
            if hit is not None:
                return hit, False, 0.0  # another process fetched it while we waited
            self.cache.clean_stale_staging(key)
            expected = sum(f.size for f in resolved.files) if resolved.files is not None else None
            with self.cache.staging(key, expected) as stage:
                files_dir = stage / "files"

                def attempt() -> Any:
                    if any(files_dir.iterdir()):
                        shutil.rmtree(files_dir)
                        files_dir.mkdir()
                    return spec.source.fetch(resolved, files_dir)

                self._observer.fetch_started(spec.uri, files_dir, expected)
                try:
                    manifest = self._retry(attempt, deadline, spec, "fetch")
                finally:
                    self._observer.fetch_finished(spec.uri)
                t0 = time.monotonic()
                entry = self.cache.publish(stage, resolved, manifest, spec.uri)
                return entry, True, time.monotonic() - t0

    def _serve_cached(
        self, fn: LoaderFn | None, start: float, failures: list[tuple[str, BaseException]], *, offline: bool
    ) -> tuple[FetchResult, Any] | None:
        """Serve the last-known-good entry of the first source that has one.

        Returns ``None`` (with each source's reason appended to ``failures``) when none has.
        """
        reasons = list(failures)
        for spec in self._specs:
            record = self.cache.read_ref(spec.source.identity, spec.ref.uri)
            if record is None:
                failures.append((spec.uri, ModelNotFoundError("no last-known-good version in the cache")))
                continue
            try:
                entry = self.cache.lookup(record.key)
            except IntegrityError as exc:
                with self.cache.lock(record.key):
                    self.cache.quarantine(record.key, str(exc))
                failures.append((spec.uri, exc))
                continue
            if entry is None:
                failures.append((spec.uri, ModelNotFoundError(f"cached version {record.version} was evicted")))
                continue
            result = FetchResult(
                path=entry.path,
                source=spec.uri,
                ref=spec.ref,
                version=entry.version,
                digest=entry.digest,
                from_cache=True,
                degraded=not offline,
                offline=offline,
                timings=Timings(total=time.monotonic() - start),
                failures=_describe(reasons),
            )
            if not offline:
                logger.warning(
                    "every source failed; serving last-known-good %s version %s from the cache (degraded)",
                    spec.uri,
                    entry.version,
                )
            obj = self._deserialize(fn, result, entry.key) if fn is not None else None
            self.last_result = result
            return result, obj
        return None

    # -- retries ------------------------------------------------------------------------

    def _retry(self, fn: Callable[[], T], deadline: float, spec: SourceSpec, what: str) -> T:
        import tenacity

        policy = self.config.retry

        class _PastDeadline(tenacity.stop.stop_base):
            # stop when the next backoff would end past the deadline, not after it
            def __call__(self, state: tenacity.RetryCallState) -> bool:
                return time.monotonic() + (state.upcoming_sleep or 0.0) >= deadline

        def log_retry(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            logger.warning(
                "%s of %s failed (attempt %d/%d): %s; retrying in %.2fs",
                what,
                spec.uri,
                state.attempt_number,
                policy.attempts,
                exc,
                wait,
            )

        if time.monotonic() >= deadline:
            raise SourceTimeoutError(f"{what} of {spec.uri}: deadline expired", scheme=spec.ref.scheme, ref=spec.uri)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_any(tenacity.stop_after_attempt(policy.attempts), _PastDeadline()),
            # exponential backoff with additive jitter (stable tenacity API since 4.x)
            wait=tenacity.wait_exponential(multiplier=policy.initial_backoff, max=policy.max_backoff)
            + tenacity.wait_random(0, policy.jitter),
            retry=tenacity.retry_if_exception_type(SourceUnavailableError),
            reraise=True,
            sleep=self._sleep,
            before_sleep=log_retry,
        )
        return retrying(fn)


def _describe(failures: list[tuple[str, BaseException]]) -> tuple[tuple[str, str], ...]:
    return tuple((uri, f"{type(exc).__name__}: {exc}") for uri, exc in failures)


def _replace(result: FetchResult, **changes: Any) -> FetchResult:
    import dataclasses

    return dataclasses.replace(result, **changes)
