"""ResilientLoader behaviour, on the in-memory fake and the local source (unit level)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from helpers import Sleeps, fast_config, read_tree, write_tree
from model_loader import (
    AccessDeniedError,
    AllSourcesFailedError,
    DeserializationError,
    IntegrityError,
    LoaderConfig,
    ModelNotFoundError,
    ResilientLoader,
    RetryPolicy,
    SourceUnavailableError,
    StaleResolutionError,
)
from model_loader.testing import InMemorySource

FILES = {"MLmodel_not": b"x", "w.bin": b"w" * 100}


def make(tmp_path: Path, sources: list[Any], sleep: Any = None, **cfg: Any) -> ResilientLoader:
    return ResilientLoader(
        sources, config=fast_config(tmp_path / "cache", **cfg), sleep=sleep if sleep is not None else Sleeps()
    )


def test_cold_then_warm(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")
    loader = make(tmp_path, [(store, ref)])
    cold = loader.fetch()
    warm = loader.fetch()
    assert (cold.from_cache, warm.from_cache) == (False, True)
    assert cold.path == warm.path
    assert cold.version == warm.version == "m/1"
    assert cold.digest == warm.digest
    assert cold.source == "mem://m?alias=prod"
    assert read_tree(warm.path) == FILES
    assert [c for c in store.calls if c.startswith("fetch")] == ["fetch m/1"]


def test_alias_move_serves_the_new_version_and_keeps_the_old_one(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"w": b"1"}, alias="prod")
    loader = make(tmp_path, [(store, ref)])
    old = loader.fetch()
    store.publish("m", {"w": b"2"}, alias="prod")
    new = loader.fetch()
    assert (old.version, new.version) == ("m/1", "m/2")
    assert read_tree(new.path) == {"w": b"2"}
    assert read_tree(old.path) == {"w": b"1"}


def test_transient_failures_are_retried_with_backoff(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")
    store.fail_next(2)
    sleeps = Sleeps()
    result = make(tmp_path, [(store, ref)], sleep=sleeps).fetch()
    assert result.version == "m/1"
    assert len(sleeps) == 2
    assert sleeps[1] >= sleeps[0]


def test_retries_are_bounded_by_attempts(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")
    store.set_available(False)
    sleeps = Sleeps()
    with pytest.raises(AllSourcesFailedError):
        make(tmp_path, [(store, ref)], sleep=sleeps).fetch()
    assert len([c for c in store.calls if c.startswith("resolve")]) == 3
    assert len(sleeps) == 2


def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")
    store.fail_next(1, AccessDeniedError("denied", scheme="mem"))
    sleeps = Sleeps()
    with pytest.raises(AllSourcesFailedError) as info:
        make(tmp_path, [(store, ref)], sleep=sleeps).fetch()
    assert sleeps == []
    assert isinstance(info.value.failures[0][1], AccessDeniedError)


def test_source_deadline_stops_retrying(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")
    store.set_available(False)
    import time as _time

    def real_sleep(s: float) -> None:
        _time.sleep(s)

    cfg = fast_config(tmp_path / "c")
    cfg = LoaderConfig(  # the subject is the source deadline: attempts is set out of its way on purpose
        cache=cfg.cache,
        retry=RetryPolicy(attempts=100, initial_backoff=0.05, max_backoff=0.05, jitter=0.0, source_deadline=0.3),
    )
    loader = ResilientLoader([(store, ref)], config=cfg, sleep=real_sleep)
    with pytest.raises(AllSourcesFailedError):
        loader.fetch()
    attempts = len([c for c in store.calls if c.startswith("resolve")])
    assert 2 <= attempts < 100


def test_fallback_to_the_next_source_in_order(tmp_path: Path) -> None:
    down, up = InMemorySource("down"), InMemorySource("up")
    r1 = down.publish("m", {"w": b"a"}, alias="prod")
    r2 = up.publish("m", {"w": b"b"}, alias="prod")
    down.set_available(False)
    result = make(tmp_path, [(down, r1), (up, r2)]).fetch()
    assert result.source == "mem://m?alias=prod"
    assert read_tree(result.path) == {"w": b"b"}
    assert result.degraded is False
    assert len(result.failures) == 1
    assert "SourceUnavailableError" in result.failures[0][1]


def test_all_sources_failing_with_nothing_cached_lists_each_failure_in_order(tmp_path: Path) -> None:
    a, b = InMemorySource("a"), InMemorySource("b")
    ra = a.publish("m", FILES)
    rb = b.ref("mem://missing")
    a.set_available(False)
    with pytest.raises(AllSourcesFailedError) as info:
        make(tmp_path, [(a, ra), (b, rb)]).fetch()
    kinds = [type(e).__name__ for _, e in info.value.failures]
    assert kinds[:2] == ["SourceUnavailableError", "ModelNotFoundError"]
    assert "mem://m" in str(info.value)


def test_last_known_good_is_served_degraded_when_every_source_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")
    first = make(tmp_path, [(store, ref)]).fetch()
    store.publish("m", {"w": b"newer"}, alias="prod")  # the registry moved on, then went down
    store.set_available(False)
    result = make(tmp_path, [(store, ref)]).fetch()
    assert result.degraded is True
    assert result.from_cache is True
    assert result.version == first.version == "m/1"
    assert result.path == first.path
    assert "degraded" in caplog.text


def test_a_missing_model_is_not_papered_over_with_the_cache(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")
    make(tmp_path, [(store, ref)]).fetch()
    store.fail_next(1, ModelNotFoundError("alias deleted", scheme="mem"))
    with pytest.raises(AllSourcesFailedError):
        make(tmp_path, [(store, ref)]).fetch()


def test_offline_serves_from_cache_without_touching_sources(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")
    make(tmp_path, [(store, ref)]).fetch()
    store.calls.clear()
    result = make(tmp_path, [(store, ref)], offline=True).fetch()
    assert store.calls == []
    assert (result.offline, result.from_cache, result.degraded) == (True, True, False)


def test_offline_with_an_empty_cache_fails_clearly(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")
    with pytest.raises(AllSourcesFailedError, match="offline"):
        make(tmp_path, [(store, ref)], offline=True).fetch()
    assert store.calls == []


def test_stale_resolution_is_resolved_again_once(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")

    class StaleOnce(InMemorySource):
        pass

    calls = {"n": 0}
    real_fetch = store.fetch

    def fetch(resolved: Any, dest: Path) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StaleResolutionError("changed", scheme="mem")
        return real_fetch(resolved, dest)

    store.fetch = fetch  # type: ignore[method-assign]
    result = make(tmp_path, [(store, ref)]).fetch()
    assert calls["n"] == 2
    assert result.version == "m/1"
    assert len([c for c in store.calls if c.startswith("resolve")]) == 2


def test_a_fetch_that_lies_about_its_files_never_reaches_the_cache(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"a": b"1"})
    real_fetch = store.fetch

    def lying_fetch(resolved: Any, dest: Path) -> Any:
        manifest = real_fetch(resolved, dest)
        (dest / "a").write_bytes(b"truncated-or-extra")
        return manifest

    store.fetch = lying_fetch  # type: ignore[method-assign]
    with pytest.raises(AllSourcesFailedError) as info:
        make(tmp_path, [(store, ref)]).fetch()
    assert isinstance(info.value.failures[0][1], IntegrityError)
    assert list((tmp_path / "cache" / "entries").iterdir()) == []
    assert list((tmp_path / "cache" / ".staging").iterdir()) == []


def test_an_unexpected_exception_from_a_source_propagates(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES)
    backup = InMemorySource("backup")
    backup_ref = backup.publish("m", FILES)

    def broken(ref: Any) -> Any:
        raise KeyError("a bug in a third-party source")

    store.resolve = broken  # type: ignore[method-assign]
    with pytest.raises(KeyError, match="third-party"):
        make(tmp_path, [(store, ref), (backup, backup_ref)]).fetch()
    assert backup.calls == []


def test_previous_versions_policy_serves_the_newest_working_version(tmp_path: Path) -> None:
    store = InMemorySource()
    store.publish("m", {"w": b"1"}, alias="prod")
    store.publish("m", {"w": b"2"}, alias="prod")
    ref = store.publish("m", {"w": b"3"}, alias="prod")
    store.delete_version("m", 3)
    with pytest.raises(AllSourcesFailedError):
        make(tmp_path, [(store, ref)]).fetch()
    result = make(tmp_path, [(store, ref)], fallback_versions=2).fetch()
    assert result.version == "m/2"
    assert read_tree(result.path) == {"w": b"2"}


def test_previous_versions_policy_covers_a_deserializer_that_raises(tmp_path: Path) -> None:
    store = InMemorySource()
    store.publish("m", {"w": b"good"}, alias="prod")
    ref = store.publish("m", {"w": b"bad"}, alias="prod")

    def load(path: Path) -> bytes:
        data = (path / "w").read_bytes()
        if data == b"bad":
            raise ValueError("cannot unpickle")
        return data

    loader = make(tmp_path, [(store, ref)], fallback_versions=1)
    assert loader.load(load) == b"good"
    assert loader.last_result is not None
    assert loader.last_result.version == "m/1"
    with pytest.raises(AllSourcesFailedError) as info:
        make(tmp_path, [(store, ref)]).load(load)
    assert isinstance(info.value.failures[0][1], DeserializationError)


def test_load_caches_the_object_in_memory_per_version(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"w": b"1"}, alias="prod")
    built: list[Path] = []

    def load(path: Path) -> bytes:
        built.append(path)
        return (path / "w").read_bytes()

    loader = make(tmp_path, [(store, ref)])
    assert loader.load(load) == b"1"
    assert loader.last_result is not None
    assert loader.last_result.from_cache is False
    assert loader.load(load) == b"1"
    assert len(built) == 1
    assert loader.last_result.from_cache is True  # served from memory: nothing downloaded
    store.publish("m", {"w": b"2"}, alias="prod")
    assert loader.load(load) == b"2"
    assert len(built) == 2


def test_concurrent_loads_deserialize_once(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"w": b"1"})
    built: list[int] = []
    gate = threading.Event()

    def load(path: Path) -> int:
        built.append(1)
        gate.wait(10)
        return 42

    loader = make(tmp_path, [(store, ref)])
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(loader.load(load))) for _ in range(6)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert results == [42] * 6
    assert built == [1]


def test_default_loader_needs_mlmodel_or_a_loader_fn(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"w": b"1"})
    with pytest.raises(AllSourcesFailedError) as info:
        make(tmp_path, [(store, ref)]).load()
    err = info.value.failures[0][1]
    assert isinstance(err, DeserializationError)
    assert "loader_fn" in str(err)


def test_afetch_and_aload_do_not_block_the_event_loop(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"w": b"1"})
    loader = make(tmp_path, [(store, ref)])

    async def main() -> tuple[Any, Any, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        res = await loader.afetch()
        obj = await loader.aload(lambda p: (p / "w").read_bytes())
        task.cancel()
        return res, obj, ticks

    res, obj, ticks = asyncio.run(main())
    assert res.version == "m/1"
    assert obj == b"1"
    assert ticks > 0


def test_sources_from_config_and_uris(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tree(model, {"a": b"1"})
    cfg = fast_config(tmp_path / "cache", sources=(str(model),))
    with ResilientLoader(config=cfg) as loader:
        assert loader.sources == (f"file://{model}",)
        assert read_tree(loader.fetch().path) == {"a": b"1"}


def test_no_source_at_all_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one source"):
        ResilientLoader([], config=fast_config(tmp_path / "cache"))


def test_close_closes_only_sources_it_built(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES)
    loader = make(tmp_path, [(store, ref)])
    loader.close()
    loader.close()
    assert store.closed is False


def test_unavailable_error_type_is_retried_even_for_subclasses(tmp_path: Path) -> None:
    from model_loader import SourceTimeoutError

    store = InMemorySource()
    ref = store.publish("m", FILES)
    store.fail_next(1, SourceTimeoutError("read timed out", scheme="mem"))
    assert make(tmp_path, [(store, ref)]).fetch().version == "m/1"
    assert issubclass(SourceTimeoutError, SourceUnavailableError)


def _read_w(path: Path) -> bytes:
    return (path / "w").read_bytes()


def test_resolve_ttl_reuses_a_fresh_result_without_touching_the_source(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"w": b"1"}, alias="prod")
    loader = make(tmp_path, [(store, ref)], resolve_ttl=3600)
    assert loader.load(_read_w) == b"1"
    before = list(store.calls)
    store.publish("m", {"w": b"2"}, alias="prod")
    assert loader.load(_read_w) == b"1"  # within the TTL the alias move is not looked up
    assert store.calls == before
    assert make(tmp_path, [(store, ref)]).load(_read_w) == b"2"  # TTL 0: resolves on every call
