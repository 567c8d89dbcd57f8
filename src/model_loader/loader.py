"""ResilientLoader: the policy of a load. Sources in order, retries with backoff, one
deadline, fallback to earlier versions, the next source, then the last-known-good copy.

The cache owns the transaction of getting a verified entry (see :mod:`._cache`); this
module decides what to ask of whom, for how long, and what to serve when they fail.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from model_loader._cache import CachedEntry, CacheHit, DiskCache
from model_loader._deadline import Deadline
from model_loader._memory import MemoryCache
from model_loader._staging import Staging
from model_loader._tiers import Promote, TieredCache
from model_loader._types import FetchResult, LoadedModel, ModelRef, ResolvedModel, Timings
from model_loader._uri import parse_ref
from model_loader.errors import (
    AllSourcesFailedError,
    DeserializationError,
    IntegrityError,
    ModelLoaderError,
    SourceError,
    SourceUnavailableError,
    StaleResolutionError,
)
from model_loader.lockfile import LockedModel
from model_loader.protocol import FetchObserver, ModelSource, SourceSettings, SupportsVersionHistory
from model_loader.registry import create_source

if TYPE_CHECKING:
    from model_loader._settings import Settings
    from model_loader.config import LoaderConfig

__all__ = ["ResilientLoader", "SourceSpec", "default_model_loader"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
SourceLike = str | os.PathLike[str] | ModelRef | tuple[ModelSource, "str | ModelRef"]
LoaderFn = Callable[[Path], Any]

# Failures after which serving the last-known-good version is right: the authority did not
# say "this does not exist" or "you may not", it just could not deliver.
_DEGRADABLE = (SourceUnavailableError, StaleResolutionError, IntegrityError)


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
        MissingDependencyError: There is an MLmodel file but a module it needs is missing
            (mlflow itself, pandas, the flavor's library): the message names that module.
        DeserializationError: There is no MLmodel file: pass ``loader_fn``.
    """
    if not (path / "MLmodel").is_file():
        raise DeserializationError(
            f"{path} has no MLmodel file, so there is no default way to load it: "
            "pass loader_fn=... (a callable taking the model directory)"
        )
    from model_loader.sources.mlflow._pyfunc import load_pyfunc

    return load_pyfunc(path)


class _Load:
    """The per-call state of one load: its deadline, failures and retries so far."""

    def __init__(self, config: LoaderConfig | Settings) -> None:
        self.start = time.monotonic()
        self.deadline = Deadline(config.deadline, what=f"the load's {config.deadline:g}s deadline")
        self.failures: list[tuple[str, BaseException]] = []
        self.retries: dict[str, int] = {}

    def failed(self, uri: str, exc: BaseException) -> None:
        self.failures.append((uri, exc))

    def described(self) -> tuple[tuple[str, str], ...]:
        return tuple((uri, f"{type(exc).__name__}: {exc}") for uri, exc in self.failures)


class ResilientLoader:
    """Load one model from ordered sources with caching, retries and fallback.

    Args:
        sources: One URI (``"models:/iris@champion"``), or several URIs, parsed refs or
            ``(source, uri)`` pairs, tried in order. Default: ``config.sources``.
        config: Settings; default :meth:`LoaderConfig.from_env` (read now, not at import).
        loader_fn: Turns a model directory into an object for :meth:`load`.
        sleep: Used between retries (tests inject a fake).
        observer: Download hooks (progress reporting).
        memory: A memory cache of loaded objects to share with other loaders (an
            identical version is then deserialized once); default: this loader's own.

    Example:
        >>> loader = ResilientLoader(["models:/iris@champion", "s3://models/iris/"])
        >>> result = loader.fetch()
        >>> result.source, result.version, result.degraded
        ('models:/iris@champion', 'iris/3', False)
    """

    def __init__(
        self,
        sources: SourceLike | Sequence[SourceLike] | None = None,
        *,
        config: LoaderConfig | Settings | None = None,
        loader_fn: LoaderFn | None = None,
        sleep: Callable[[float], None] = time.sleep,
        observer: FetchObserver | None = None,
        memory: MemoryCache | None = None,
    ) -> None:
        if config is None:
            from model_loader._settings import settings_from_env

            config = settings_from_env()  # plain values when they are plain: no pydantic on a warm start
        self.config = config
        c = self.config
        tiers = [
            DiskCache(
                root,
                max_size=c.cache.max_size if i == 0 else None,
                verify=c.cache.verify,
                lock_timeout=c.cache.lock_timeout,
                min_free=c.cache.min_free,
                shared=c.cache.shared,
            )
            for i, root in enumerate((c.cache.dir, *c.cache.tiers))
        ]
        self.cache: DiskCache | TieredCache = (
            tiers[0] if len(tiers) == 1 else TieredCache(tiers, promote=cast("Promote", c.cache.promote))
        )
        self.memory = memory if memory is not None else MemoryCache(c.cache.memory_items)
        self._loader_fn = loader_fn
        self._sleep = sleep
        self._observer = observer
        self._settings = SourceSettings(
            connect_timeout=c.connect_timeout,
            read_timeout=c.read_timeout,
            max_concurrency=c.max_concurrency,
            include=c.include,
            exclude=c.exclude,
            state_dir=None if self.cache.read_only else Path(self.cache.state_dir),
            allow_local_artifacts=c.allow_local_artifacts,
        )
        items = _as_list(sources) if sources is not None else list(c.sources)
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
        self.locked: LockedModel | None = None
        self._lock = threading.Lock()
        self._recent: OrderedDict[LoaderFn | None, tuple[float, LoadedModel]] = OrderedDict()
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

    @classmethod
    def from_lock(cls, locked: LockedModel, **kwargs: Any) -> ResilientLoader:
        """A loader that serves exactly the version recorded in a lock file, or fails.

        Served from the cache when it holds that version (no network), else from the
        sources, asking for the recorded version itself where the reference can name it;
        checked against the recorded digest either way. Keyword arguments as for the
        constructor (``config``, ``loader_fn``...).

        Raises (from fetch/load):
            IntegrityError: The sources no longer have that version, or different bytes.
        """
        loader = cls(list(locked.sources), **kwargs)
        loader.locked = locked
        return loader

    @property
    def sources(self) -> tuple[str, ...]:
        """The source URIs, in the order they are tried."""
        return tuple(s.uri for s in self._specs)

    # -- public API ---------------------------------------------------------------------

    def fetch(self) -> FetchResult:
        """Serve the model's files: from the first source that works, else last-known-good.

        Raises:
            AllSourcesFailedError: No source delivered and nothing usable is cached.
            CacheError: The cache disk is full, or a read-only cache has no copy.
        """
        return self._run(None).result

    def load(self, loader_fn: LoaderFn | None = None) -> Any:
        """Fetch, then deserialize (cached in memory per version); see :attr:`last_result`.

        Args:
            loader_fn: Overrides the loader's ``loader_fn``; default: MLflow pyfunc for
                directories with an ``MLmodel`` file.

        Raises:
            DeserializationError: The loader function raised (and no earlier version served).
        """
        return self.load_with_result(loader_fn).model

    def load_with_result(self, loader_fn: LoaderFn | None = None) -> LoadedModel:
        """:meth:`load`, returning the object and the :class:`FetchResult` that served it together.

        Concurrent callers each get their own pair (``last_result`` is whichever finished last).

        Example:
            >>> model, result = loader.load_with_result()
            >>> result.version, result.timings.deserialize
        """
        return self._run(loader_fn or self._loader_fn or default_model_loader)

    async def aload_with_result(self, loader_fn: LoaderFn | None = None) -> LoadedModel:
        """:meth:`load_with_result` in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.load_with_result, loader_fn)

    async def afetch(self) -> FetchResult:
        """:meth:`fetch` in a worker thread; the event loop keeps running."""
        import asyncio

        return await asyncio.to_thread(self.fetch)

    async def aload(self, loader_fn: LoaderFn | None = None) -> Any:
        """:meth:`load` in a worker thread; the event loop keeps running."""
        import asyncio

        return await asyncio.to_thread(self.load, loader_fn)

    def retain(self, result: FetchResult) -> None:
        """Keep ``result``'s cache entry protected from eviction until :meth:`release`,
        even after this loader serves another version (requests may still use it)."""
        self.cache.retain(result.path.parent.name)

    def release(self, result: FetchResult) -> None:
        """Undo one :meth:`retain`; the entry's lease goes once nothing uses it."""
        key = result.path.parent.name
        self.cache.release(key)
        if key not in self._serving.values():
            self.cache.release_lease(key)

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

    def _run(self, fn: LoaderFn | None) -> LoadedModel:
        ttl = self.config.resolve_ttl
        keep = ttl > 0 and (fn is None or self.memory.maxsize > 0)
        if keep:
            with self._lock:
                recent = self._recent.get(fn)
            if recent is not None and time.monotonic() - recent[0] < ttl:
                return recent[1]  # the hot path: no resolve, no disk
        out = self._run_once(fn)
        with self._lock:
            self.last_result = out.result
            if keep:
                self._recent[fn] = (time.monotonic(), out)
                self._recent.move_to_end(fn)
                while len(self._recent) > max(1, self.memory.maxsize):
                    self._recent.popitem(last=False)
        return out

    def _run_once(self, fn: LoaderFn | None) -> LoadedModel:
        load = _Load(self.config)
        if self.locked is not None:
            return self._serve_locked(self.locked, fn, load)
        if self.config.offline:
            served = self._serve_cached(fn, load, offline=True)
            if isinstance(served, LoadedModel):
                return served
            raise AllSourcesFailedError(f"offline mode: nothing usable in the cache ({served})", load.failures)
        has_cached = any(self._lkg_key(spec) is not None for spec in self._specs)
        for i, spec in enumerate(self._specs):
            if load.deadline.expired():
                load.failed(spec.uri, load.deadline.error("not tried"))
                continue
            fallback = has_cached or i + 1 < len(self._specs)
            try:
                return self._from_source(spec, fn, load, fallback)
            except (SourceError, IntegrityError, DeserializationError) as exc:
                load.failed(spec.uri, exc)
                logger.warning("source %s failed: %s: %s", spec.uri, type(exc).__name__, exc)
        note = "no source was degradable"
        if any(isinstance(exc, _DEGRADABLE) for _, exc in load.failures):
            served = self._serve_cached(fn, load, offline=False)
            if isinstance(served, LoadedModel):
                return served
            note = served
        logger.error("every source failed: %s", "; ".join(f"{u}: {type(e).__name__}" for u, e in load.failures))
        raise AllSourcesFailedError(f"every source failed and nothing cached could be served ({note})", load.failures)

    def _from_source(
        self, spec: SourceSpec, fn: LoaderFn | None, load: _Load, fallback: bool, expect: LockedModel | None = None
    ) -> LoadedModel:
        budget = load.deadline.narrow(self.config.retry.source_deadline, what=f"the source deadline of {spec.uri}")
        resolve_budget = (
            budget.narrow(self.config.resolve_timeout, what=f"the {self.config.resolve_timeout:g}s resolve budget")
            if fallback
            else budget
        )
        t0 = time.monotonic()
        resolved = self._retry(lambda: spec.source.resolve(spec.ref), resolve_budget, spec, "resolve", load)
        t_resolve = time.monotonic() - t0
        if expect is not None:
            if resolved.version != expect.version:
                raise IntegrityError(
                    f"{spec.uri} resolves to {resolved.version}, the lock file says {expect.version}, which this "
                    "reference cannot name (pin it, or lock again)"
                )
            return self._serve(spec, resolved, fn, load, t_resolve, budget, expect)
        candidates: list[ResolvedModel] = [resolved]
        errors: list[BaseException] = []
        history_checked = False
        i = 0
        while i < len(candidates):
            candidate = candidates[i]
            try:
                return self._serve(spec, candidate, fn, load, t_resolve, budget)
            except (SourceError, IntegrityError, DeserializationError) as exc:
                if isinstance(exc, SourceUnavailableError) or not self.config.fallback_versions:
                    raise
                errors.append(exc)
                logger.warning(
                    "version %s from %s is broken (%s); trying an earlier one", candidate.version, spec.uri, exc
                )
                if not history_checked:
                    history_checked = True
                    candidates.extend(self._history(spec, candidate, budget, load))
            i += 1
        raise errors[0]

    def _history(self, spec: SourceSpec, resolved: ResolvedModel, budget: Deadline, load: _Load) -> list[ResolvedModel]:
        source = spec.source
        if not (type(source).capabilities.version_history and isinstance(source, SupportsVersionHistory)):
            return []
        n = self.config.fallback_versions
        return self._retry(lambda: source.previous_versions(resolved, n), budget, spec, "list versions", load)

    def _serve(
        self,
        spec: SourceSpec,
        resolved: ResolvedModel,
        fn: LoaderFn | None,
        load: _Load,
        t_resolve: float,
        budget: Deadline,
        expect: LockedModel | None = None,
    ) -> LoadedModel:
        memo = self.memory.get((resolved.cache_key, fn)) if fn is not None and expect is None else None
        if memo is not None:  # loaded before: no disk, no deserialization
            result = dataclasses.replace(
                memo.result,
                source=spec.uri,
                ref=spec.ref,
                from_cache=True,
                degraded=False,
                offline=False,
                downloaded=0,
                timings=Timings(resolve=t_resolve, total=time.monotonic() - load.start),
                failures=load.described(),
                retries=tuple(load.retries.items()),
            )
            self._record(spec, memo.entry, resolved.version)
            return LoadedModel(memo.model, result)
        t0 = time.monotonic()
        try:
            hit = self._materialize(spec, resolved, budget, load, expect)
        except StaleResolutionError:
            if expect is not None:
                raise
            logger.warning("%s changed while fetching %s; resolving again", spec.uri, resolved.version)
            resolved = self._retry(lambda: spec.source.resolve(spec.ref), budget, spec, "resolve", load)
            hit = self._materialize(spec, resolved, budget, load)
        entry = hit.entry
        if expect is not None and entry.digest != expect.digest:
            raise IntegrityError(
                f"{spec.uri} version {entry.version} has digest {entry.digest}, locked {expect.digest}"
            )
        if self.config.require_verified and not entry.verified:
            unverified = [f.path for f in entry.manifest.files if not f.verified][:3]
            raise IntegrityError(
                f"{spec.uri} version {entry.version} cannot be verified end to end (only sizes for {unverified}); "
                "require_verified is set"
            )
        timings = Timings(
            resolve=t_resolve, fetch=time.monotonic() - t0 - hit.verify_seconds, verify=hit.verify_seconds
        )
        result = self._result(spec, entry, load, timings, from_cache=not hit.fetched)
        out = self._deserialize(fn, result, entry, load) if fn is not None else LoadedModel(None, result)
        self._record(spec, entry, entry.version)
        if hit.fetched and self.cache.max_size is not None:
            self.cache.prune()
        return out

    def _result(
        self,
        spec: SourceSpec,
        entry: CachedEntry,
        load: _Load,
        timings: Timings,
        *,
        from_cache: bool,
        degraded: bool = False,
        offline: bool = False,
    ) -> FetchResult:
        return FetchResult(
            path=entry.path,
            source=spec.uri,
            ref=spec.ref,
            version=entry.version,
            digest=entry.digest,
            from_cache=from_cache,
            degraded=degraded,
            offline=offline,
            timings=dataclasses.replace(timings, total=time.monotonic() - load.start),
            failures=load.described(),
            verified=entry.verified,
            size=entry.size,
            downloaded=0 if from_cache else entry.size,
            retries=tuple(load.retries.items()),
        )

    def _record(self, spec: SourceSpec, entry: CachedEntry, version: str) -> None:
        """Every successful load records last-known-good, memory hits included."""
        self.cache.record_ref(spec.source.identity, spec.ref.uri, entry, spec.uri)
        previous = self._serving.get(spec.uri)
        self._serving[spec.uri] = entry.key
        if previous is not None and previous != entry.key and previous not in self._serving.values():
            self.cache.release_lease(previous)

    def _deserialize(self, fn: LoaderFn, result: FetchResult, entry: CachedEntry, load: _Load) -> LoadedModel:
        def build() -> _Memo:
            t0 = time.monotonic()
            try:
                obj = fn(result.path)
            except ModelLoaderError:
                raise
            except Exception as exc:
                raise DeserializationError(f"loading {result.source} version {result.version} failed: {exc}") from exc
            timed = dataclasses.replace(
                result, timings=dataclasses.replace(result.timings, deserialize=time.monotonic() - t0)
            )
            return _Memo(obj, timed, entry)

        memo, loaded_now = self.memory.get_or_load((entry.key, fn), build)
        if loaded_now:
            result = memo.result
        timings = dataclasses.replace(result.timings, total=time.monotonic() - load.start)
        return LoadedModel(memo.model, dataclasses.replace(result, timings=timings))

    def _materialize(
        self,
        spec: SourceSpec,
        resolved: ResolvedModel,
        budget: Deadline,
        load: _Load,
        expect: LockedModel | None = None,
    ) -> CacheHit:
        """The verified cache entry for ``resolved``, fetched (resumably) if needed."""
        observer = self._observer
        progress_fn = getattr(observer, "fetch_progress", None)

        def progress(n: int) -> None:
            if progress_fn is not None:
                progress_fn(spec.uri, n)

        def fill(staging: Staging) -> Any:
            expected = sum(f.size for f in resolved.files) if resolved.files is not None else None
            if observer is not None:
                observer.fetch_started(spec.uri, staging.files_dir, expected)
            try:
                manifest = self._retry(
                    lambda: staging.attempt(spec.source, resolved), budget, spec, "fetch", load, staging=staging
                )
            finally:
                if observer is not None:
                    observer.fetch_finished(spec.uri)
            if expect is not None and manifest.digest != expect.digest:
                raise IntegrityError(  # before publishing: these bytes never reach the cache
                    f"{spec.uri} version {resolved.version} has digest {manifest.digest}, locked {expect.digest}"
                )
            return manifest

        return self.cache.fill(resolved, fill, deadline=budget, source=spec.uri, progress=progress)

    def _serve_locked(self, locked: LockedModel, fn: LoaderFn | None, load: _Load) -> LoadedModel:
        """The version a lock file records: from the cache, else from a source that can
        deliver exactly it; the digest checked either way."""
        spec = next((s for s in self._specs if s.uri == locked.source), self._specs[0])
        entry, problem = self.cache.get(locked.cache_key, deadline=load.deadline)
        if entry is not None and entry.digest == locked.digest:
            result = self._result(spec, entry, load, Timings(), from_cache=True, offline=self.config.offline)
            return self._deserialize(fn, result, entry, load) if fn is not None else LoadedModel(None, result)
        if entry is not None:
            raise IntegrityError(
                f"the cache holds {locked.version} with digest {entry.digest}, the lock file says {locked.digest}"
            )
        if self.config.offline:
            raise AllSourcesFailedError(
                f"offline mode: the locked version {locked.version} is not in the cache ({problem or 'absent'})", []
            )
        for spec in self._specs:
            if spec.source.identity != locked.identity:
                continue
            target = spec
            if locked.pinned:
                target = SourceSpec(spec.source, parse_ref(locked.pinned, check_scheme=False), owned=False)
            try:
                out = self._from_source(target, fn, load, fallback=False, expect=locked)
            except (SourceError, IntegrityError, DeserializationError) as exc:
                load.failed(spec.uri, exc)
                logger.warning("source %s cannot serve locked %s: %s", spec.uri, locked.version, exc)
                continue
            return LoadedModel(out.model, dataclasses.replace(out.result, source=spec.uri, ref=spec.ref))
        raise AllSourcesFailedError(f"no source served the locked version {locked.version}", load.failures)

    def _lkg_key(self, spec: SourceSpec) -> str | None:
        record = self.cache.read_ref(spec.source.identity, spec.ref.uri)
        return record.key if record is not None else None

    def _serve_cached(self, fn: LoaderFn | None, load: _Load, *, offline: bool) -> LoadedModel | str:
        """Serve the last-known-good entry of the first source that has a usable one.

        Returns what was served, or a sentence saying why nothing could be.
        """
        notes = []
        for spec in self._specs:
            record = self.cache.read_ref(spec.source.identity, spec.ref.uri)
            if record is None:
                from model_loader._identity import describe_cached

                roots = [t.root for t in self.cache.tiers] if isinstance(self.cache, TieredCache) else [self.cache.root]
                held = describe_cached(roots, spec.ref, spec.source.identity)
                notes.append(f"no last-known-good version of {spec.uri} (source {spec.source.identity}); {held}")
                continue
            entry, problem = self.cache.get(record.key, deadline=load.deadline)
            if entry is None:
                why = f"is damaged: {problem}" if problem else "was evicted"
                notes.append(f"the cached version {record.version} of {spec.uri} {why}")
                continue
            if self.config.require_verified and not entry.verified:
                notes.append(f"the cached version {record.version} of {spec.uri} is not verified end to end")
                continue
            result = self._result(spec, entry, load, Timings(), from_cache=True, degraded=not offline, offline=offline)
            if not offline:
                logger.warning(
                    "every source failed; serving last-known-good %s version %s from the cache (degraded)",
                    spec.uri,
                    entry.version,
                )
            try:
                out = self._deserialize(fn, result, entry, load) if fn is not None else LoadedModel(None, result)
            except DeserializationError as exc:
                notes.append(f"the cached version {record.version} of {spec.uri} failed to load: {exc}")
                continue
            self._record(spec, entry, entry.version)
            return out
        return "; ".join(notes)

    # -- retries ------------------------------------------------------------------------

    def _retry(
        self,
        fn: Callable[[], T],
        budget: Deadline,
        spec: SourceSpec,
        what: str,
        load: _Load,
        *,
        staging: Staging | None = None,
    ) -> T:
        """Run ``fn`` under ``budget`` (the current deadline of the source call), retrying
        ``SourceUnavailableError`` with exponential backoff and jitter.

        ``attempts`` counts consecutive failures; a fetch attempt that completed files
        (``staging.progressed``) starts the count again, so a retry that makes progress is
        never the one that gives up.
        """
        policy = self.config.retry
        streak = [0]  # failures in a row, reset by progress
        tries = [0]

        def attempt() -> T:
            tries[0] += 1
            budget.check(f"{what} of {spec.uri}", scheme=spec.ref.scheme, ref=spec.uri)
            with budget.applied():
                return fn()

        def give_up() -> bool:
            streak[0] = 0 if staging is not None and staging.progressed else streak[0] + 1
            worst = min(policy.max_backoff, policy.initial_backoff * 2 ** (streak[0] - 1)) + policy.jitter
            return streak[0] >= policy.attempts or budget.remaining() <= worst

        def backoff() -> float:
            import random

            delay: float = min(policy.max_backoff, policy.initial_backoff * 2 ** (max(1, streak[0]) - 1))
            return delay + random.uniform(0, policy.jitter)

        def log_retry(exc: BaseException | None, wait: float) -> None:
            load.retries[spec.uri] = load.retries.get(spec.uri, 0) + 1
            logger.warning(
                "%s of %s failed (attempt %d, %d in a row of %d allowed): %s; retrying in %.2fs",
                what,
                spec.uri,
                tries[0],
                streak[0],
                policy.attempts,
                exc,
                wait,
            )

        try:
            return attempt()  # the usual case: the retry machinery is not even imported
        except SourceUnavailableError as exc:
            if give_up():
                raise
            wait = backoff()
            log_retry(exc, wait)
            budget.sleep(wait, self._sleep)

        import tenacity

        class _Stop(tenacity.stop.stop_base):
            def __call__(self, state: tenacity.RetryCallState) -> bool:
                return give_up()

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log_retry(exc, state.next_action.sleep if state.next_action else 0.0)

        retrying = tenacity.Retrying(
            stop=_Stop(),
            wait=lambda state: backoff(),
            retry=tenacity.retry_if_exception_type(SourceUnavailableError),
            reraise=True,
            sleep=lambda seconds: budget.sleep(seconds, self._sleep),
            before_sleep=before_sleep,
        )
        return retrying(attempt)


@dataclass(frozen=True, slots=True)
class _Memo:
    """What the memory cache keeps per (version, loader_fn)."""

    model: Any
    result: FetchResult
    entry: CachedEntry


def _as_list(sources: Any) -> list[SourceLike]:
    """One source or many: a lone string, path, ref or ``(source, uri)`` pair is one source."""
    if isinstance(sources, (str, os.PathLike, ModelRef)):
        return [sources]
    if isinstance(sources, tuple) and len(sources) == 2 and isinstance(sources[0], ModelSource):
        return [sources]
    return list(sources)
