"""ServedModel and ModelGroup with the in-memory source: states, hot reload, atomic swaps,
failure retry at the next interval, outages, events, metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _mlflow_server import IRIS, MlflowServer
from helpers import fast_config, wait_for
from model_loader import AllSourcesFailedError, FetchResult, ModelRef, ResilientLoader
from model_loader._cache import MemoryCache
from model_loader.serving import (
    ModelGroup,
    ModelNotReadyError,
    ServedModel,
    ServingEvent,
    ServingState,
)
from model_loader.testing.fake import InMemorySource


@dataclass(frozen=True)
class Toy:
    text: str


class CountingLoader:
    """A loader_fn that counts deserializations; a model whose text starts with "broken" raises."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate: threading.Event | None = None

    def __call__(self, path: Path) -> Toy:
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        text = (path / "model.txt").read_text()
        self.calls.append(text)
        if text.startswith("broken"):
            raise ValueError(f"cannot load {text}")
        return Toy(text)


class Ticker:
    """An injected wait: records each delay and blocks until the test ticks (or closes)."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._sem = threading.Semaphore(0)
        self.closed = False

    def __call__(self, seconds: float) -> bool:
        self.delays.append(seconds)
        self._sem.acquire()
        return self.closed

    def tick(self) -> None:
        """Let the watcher run one check, and wait until it is waiting again."""
        n = len(self.delays)
        self._sem.release()
        wait_for(lambda: len(self.delays) > n, what="the watcher's next wait")

    def close(self) -> None:
        self.closed = True
        self._sem.release()


class Events(list[ServingEvent]):
    def __call__(self, event: ServingEvent) -> None:
        self.append(event)

    @property
    def kinds(self) -> list[str]:
        return [e.kind for e in self]


@pytest.fixture
def src() -> InMemorySource:
    return InMemorySource()


@pytest.fixture
def ref(src: InMemorySource) -> ModelRef:
    return src.publish("m", {"model.txt": b"v1"}, alias="prod")


@pytest.fixture
def fn() -> CountingLoader:
    return CountingLoader()


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def make(src: InMemorySource, ref: ModelRef, fn: CountingLoader, events: Events, tmp_path: Path) -> Iterator[Any]:
    handles: list[ServedModel] = []

    def build(cache: Path | None = None, **kwargs: Any) -> ServedModel:
        config = kwargs.pop("config", None) or fast_config(cache or tmp_path / "cache")
        kwargs.setdefault("loader_fn", fn)
        kwargs.setdefault("on_event", events)
        handle = ServedModel([(src, ref.uri)], config=config, **kwargs)
        handles.append(handle)
        return handle

    yield build
    for handle in handles:
        handle.close()


def test_states_from_loading_to_ready(make: Any, events: Events) -> None:
    served = make()
    assert (served.state, served.ready) == (ServingState.LOADING, False)
    with pytest.raises(ModelNotReadyError):
        served.get()
    status = served.status()
    assert (status.version, status.digest, status.source, status.degraded) == (None, None, None, False)

    model, result = served.load()
    assert (model, result.version) == (Toy("v1"), "m/1")
    assert (served.state, served.ready) == (ServingState.READY, True)
    assert served.get() == (model, result)
    assert served.status().to_dict()["state"] == "ready"
    assert events.kinds == ["loaded"]


def test_start_serves_requests_only_once_the_background_load_finished(make: Any, fn: CountingLoader) -> None:
    fn.gate = threading.Event()
    served = make().start()
    wait_for(lambda: served._check_lock.locked(), what="the background load to begin")
    assert (served.state, served.ready, served.wait_ready(0)) == (ServingState.LOADING, False, False)
    with pytest.raises(ModelNotReadyError):
        served.get()
    fn.gate.set()
    assert served.wait_ready(30)
    assert served.get().model == Toy("v1")


def test_first_load_failure_is_failed_then_recovers(make: Any, src: InMemorySource, events: Events) -> None:
    served = make()
    src.set_available(False)
    with pytest.raises(AllSourcesFailedError):
        served.load()
    assert (served.state, served.ready) == (ServingState.FAILED, False)
    assert served.status().last_error is not None
    src.set_available(True)
    assert served.refresh().state is ServingState.READY
    assert events.kinds == ["load_failed", "loaded"]
    assert served.status().last_error is None


def test_an_unchanged_reference_reloads_nothing_even_without_a_memory_budget(
    make: Any, fn: CountingLoader, src: InMemorySource, tmp_path: Path, events: Events
) -> None:
    config = fast_config(tmp_path / "cache")
    config = config.model_copy(update={"cache": config.cache.model_copy(update={"memory_items": 0})})
    served = make(config=config)
    first = served.load()
    resolves = sum(c.startswith("resolve") for c in src.calls)
    for _ in range(3):
        served.refresh()
    assert sum(c.startswith("resolve") for c in src.calls) == resolves + 3  # each check resolves...
    assert fn.calls == ["v1"]  # ...and deserializes nothing
    assert served.get().model is first.model
    assert events.kinds == ["loaded"]


def test_a_moved_alias_is_swapped_in(make: Any, src: InMemorySource, events: Events) -> None:
    served = make()
    served.load()
    src.publish("m", {"model.txt": b"v2"}, alias="prod")
    served.refresh()
    model, result = served.get()
    assert (model, result.version) == (Toy("v2"), "m/2")
    assert events.kinds == ["loaded", "swapped"]
    assert (events[-1].previous, events[-1].version, events[-1].result) == ("m/1", "m/2", result)


def test_a_broken_version_keeps_the_old_one_and_is_retried_once_per_interval(
    make: Any, src: InMemorySource, fn: CountingLoader, events: Events
) -> None:
    ticker = Ticker()
    served = make(reload_interval=5.0, jitter=0.2, wait=ticker).start()
    try:
        wait_for(lambda: len(ticker.delays) == 1, what="the first load")
        assert served.get().model == Toy("v1")
        src.publish("m", {"model.txt": b"broken-2"}, alias="prod")
        for _ in range(3):
            ticker.tick()
        assert fn.calls == ["v1", "broken-2", "broken-2", "broken-2"]  # one attempt per interval
        assert served.get().model == Toy("v1")
        assert served.state is ServingState.READY
        assert "broken-2" in (served.status().last_error or "")
        assert events.kinds == ["loaded", "reload_failed", "reload_failed", "reload_failed"]
        assert all(4.0 <= d <= 6.0 for d in ticker.delays), ticker.delays  # the interval, never a tight loop

        src.publish("m", {"model.txt": b"v3"}, alias="prod")
        ticker.tick()
        assert served.get().result.version == "m/3"
        assert events.kinds[-1] == "swapped"
        assert served.status().last_error is None
    finally:
        ticker.close()
        served.close()


def test_a_failed_warmup_is_never_served_nor_recorded_as_last_known_good(
    make: Any, src: InMemorySource, ref: ModelRef, tmp_path: Path, events: Events
) -> None:
    def warm(model: Toy) -> None:
        if model.text == "v2":
            raise RuntimeError("warm-up prediction failed")

    served = make(warm=warm)
    served.load()
    src.publish("m", {"model.txt": b"v2"}, alias="prod")
    served.refresh()
    assert served.get().model == Toy("v1")
    assert events.kinds == ["loaded", "reload_failed"]
    assert "warm-up prediction failed" in str(events[-1].error)

    offline = fast_config(tmp_path / "cache", offline=True)
    with ResilientLoader([(src, ref.uri)], config=offline) as loader:
        assert loader.fetch().version == "m/1"


def test_an_outage_degrades_without_touching_requests_then_recovers(
    make: Any, src: InMemorySource, events: Events
) -> None:
    served = make()
    served.load()
    src.set_available(False)
    served.refresh()
    assert (served.state, served.ready, served.status().degraded) == (ServingState.DEGRADED, True, True)
    calls = len(src.calls)
    for _ in range(100):
        assert served.get().result.version == "m/1"
        with served.use() as (model, _):
            assert model == Toy("v1")
    assert len(src.calls) == calls  # requests never reach the source
    served.refresh()
    assert events.kinds == ["loaded", "degraded"]  # reported once, not at every check
    src.set_available(True)
    served.refresh()
    assert served.state is ServingState.READY
    assert events.kinds == ["loaded", "degraded", "recovered"]


def test_comes_up_degraded_from_the_cache_when_the_source_is_down(
    make: Any, src: InMemorySource, tmp_path: Path, events: Events
) -> None:
    make().load()
    src.set_available(False)
    served = make()
    model, result = served.load()
    assert (model, result.version, result.degraded) == (Toy("v1"), "m/1", True)
    assert (served.state, served.ready) == (ServingState.DEGRADED, True)
    assert events.kinds == ["loaded", "loaded", "degraded"]


def test_swaps_are_atomic_under_concurrent_get(make: Any, src: InMemorySource) -> None:
    served = make()
    served.load()
    stop = threading.Event()
    seen: set[str] = set()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            model, result = served.get()
            if f"m/{model.text[1:]}" != result.version:
                errors.append(f"{model.text} served with {result.version}")
            seen.add(result.version)
            time.sleep(0)  # let the swapping thread have the GIL now and then

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for n in range(2, 12):
            src.publish("m", {"model.txt": f"v{n}".encode()}, alias="prod")
            served.refresh()
            wait_for(lambda n=n: f"m/{n}" in seen, what=f"a reader to see m/{n}")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert served.get().result.version == "m/11"


class LeasingLoader(ResilientLoader):
    """A loader with counted leases, recording what the handle asks of it."""

    leases: list[str]

    def retain(self, result: FetchResult) -> None:
        self.leases.append(f"+{result.version}")

    def release(self, result: FetchResult) -> None:
        self.leases.append(f"-{result.version}")


def test_a_swapped_out_version_is_released_when_its_last_user_is_done(
    src: InMemorySource, ref: ModelRef, fn: CountingLoader, tmp_path: Path
) -> None:
    loader = LeasingLoader([(src, ref.uri)], config=fast_config(tmp_path), memory=MemoryCache(4))
    loader.leases = []
    with loader, ServedModel(loader=loader, loader_fn=fn) as served:
        served.load()
        assert loader.leases == ["+m/1"]
        with served.use() as (model, result):
            src.publish("m", {"model.txt": b"v2"}, alias="prod")
            served.refresh()
            assert served.get().result.version == "m/2"
            assert (model, result.version) == (Toy("v1"), "m/1")  # the request finishes with v1
            assert loader.leases == ["+m/1", "+m/2"]
        assert loader.leases == ["+m/1", "+m/2", "-m/1"]
        src.publish("m", {"model.txt": b"v3"}, alias="prod")
        served.refresh()  # nobody uses v2: released at the swap
        assert loader.leases == ["+m/1", "+m/2", "-m/1", "+m/3", "-m/2"]


def test_stop_ends_the_watcher_promptly(make: Any) -> None:
    served = make(reload_interval=3600.0).start()
    assert served.wait_ready(30)
    thread = served._thread
    assert thread is not None
    assert thread.is_alive()
    assert served.stop(timeout=5.0)  # the promise: an hour-long wait ends at once
    assert not thread.is_alive()


def test_reloading_off_stops_after_the_first_load(make: Any) -> None:
    served = make(reload_interval=0).start()
    assert served.wait_ready(30)
    thread = served._thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()


def test_events_reach_the_log_and_a_failing_listener_changes_nothing(
    make: Any, src: InMemorySource, caplog: pytest.LogCaptureFixture
) -> None:
    def bad_listener(event: ServingEvent) -> None:
        raise RuntimeError("listener bug")

    served = make()
    served.add_listener(bad_listener)
    with caplog.at_level(logging.INFO, logger="model_loader.serving"):
        served.load()
        src.publish("m", {"model.txt": b"broken"}, alias="prod")
        served.refresh()
        served.refresh()
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "model_loader.serving"]
    assert ("INFO", f"{served.name}: loaded, serving version m/1") in records
    failed = [(level, msg) for level, msg in records if "reload failed" in msg]
    assert [level for level, _ in failed] == ["WARNING", "INFO"]  # repeats drop to INFO
    assert sum("listener" in msg for _, msg in records) == 3
    assert served.get().model == Toy("v1")


def test_from_env_reads_the_reload_interval(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.txt").write_text("v1")
    env = {"MODEL_LOADER_SOURCES": str(model), "MODEL_LOADER_CACHE_DIR": str(tmp_path / "c")}
    with ServedModel.from_env({**env, "MODEL_LOADER_RELOAD_INTERVAL": "0.5"}, loader_fn=CountingLoader()) as served:
        assert served.reload_interval == 0.5
        assert served.load().model == Toy("v1")
    with ServedModel.from_env(env) as served:
        assert served.reload_interval == 30.0
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(ValueError, match="MODEL_LOADER_RELOAD_INTERVAL"):
            ServedModel.from_env({**env, "MODEL_LOADER_RELOAD_INTERVAL": bad})


def test_metrics_follow_the_served_version(make: Any, src: InMemorySource) -> None:
    from prometheus_client import CollectorRegistry

    from model_loader.metrics import ServingMetrics

    registry = CollectorRegistry()
    served = make(metrics=ServingMetrics(registry), name="fraud")

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"reference": "fraud", **labels})

    assert (value("model_loader_ready"), value("model_loader_reloads_total", result="failure")) == (0.0, 0.0)
    _, first = served.load()
    info = {"version": "m/1", "digest": first.digest, "source": first.source}
    assert value("model_loader_model_info", **info) == 1.0
    assert value("model_loader_load_duration_seconds_count") == 1.0
    assert value("model_loader_cache_misses_total") == 1.0

    src.publish("m", {"model.txt": b"v2"}, alias="prod")
    _, second = served.refresh(), served.get().result
    assert value("model_loader_model_info", **info) is None  # the old series is gone
    assert value("model_loader_model_info", version="m/2", digest=second.digest, source=second.source) == 1.0
    assert value("model_loader_reloads_total", result="success") == 1.0

    served.refresh()  # unchanged
    assert value("model_loader_cache_hits_total", cache="memory") == 1.0
    src.set_available(False)
    served.refresh()
    assert value("model_loader_degraded") == 1.0
    src.set_available(True)
    served.refresh()
    assert value("model_loader_degraded") == 0.0
    assert value("model_loader_cache_hits_total", cache="memory") == 3.0  # the degraded check too
    src.publish("m", {"model.txt": b"broken"}, alias="prod")
    served.refresh()
    assert value("model_loader_reloads_total", result="failure") == 1.0
    assert value("model_loader_model_info", version="m/2", digest=second.digest, source=second.source) == 1.0


def test_a_group_loads_each_distinct_version_once(src: InMemorySource, ref: ModelRef, tmp_path: Path) -> None:
    src.publish("m", {"model.txt": b"v2"}, alias="challenger")
    fn = CountingLoader()
    refs = {
        "champion": [(src, "mem://m?alias=prod")],
        "challenger": [(src, "mem://m?alias=challenger")],
        "pinned": (src, "mem://m?version=1"),  # one source needs no list
    }
    with ModelGroup(refs, config=fast_config(tmp_path), loader_fn=fn, reload_interval=3600).start() as group:
        assert group.wait_ready(30)
        assert group.ready
        versions = {name: h.get().result.version for name, h in group.items()}
        assert versions == {"champion": "m/1", "challenger": "m/2", "pinned": "m/1"}
        assert sorted(fn.calls) == ["v1", "v2"]
        assert group["champion"].get().model is group["pinned"].get().model
        assert sum("fetch" in c for c in src.calls) == 2  # one download per distinct version
        assert {s.version for s in group.statuses().values()} == {"m/1", "m/2"}


@pytest.mark.slow
def test_champion_and_challenger_from_a_real_registry_share_downloads_and_deserializations(
    mlflow_s3_server: MlflowServer, tmp_path: Path
) -> None:
    """Three references, two distinct versions (``@champion`` and ``/2`` are one version)."""
    from prometheus_client import CollectorRegistry

    from model_loader.loader import default_model_loader
    from model_loader.metrics import ServingMetrics
    from model_loader.sources.mlflow import MlflowRegistrySource

    deserialized: list[str] = []

    def counting(path: Path) -> Any:
        deserialized.append(path.parent.name)
        return default_model_loader(path)

    env = {"MLFLOW_S3_ENDPOINT_URL": mlflow_s3_server.env["MLFLOW_S3_ENDPOINT_URL"]}
    sources = [MlflowRegistrySource(tracking_uri=mlflow_s3_server.url, environ=env) for _ in range(3)]
    refs = {
        "champion": [(sources[0], f"models:/{IRIS}@champion")],
        "challenger": [(sources[1], f"models:/{IRIS}@challenger")],
        "pinned": [(sources[2], f"models:/{IRIS}/2")],
    }
    registry = CollectorRegistry()
    group = ModelGroup(refs, config=fast_config(tmp_path), loader_fn=counting, metrics=ServingMetrics(registry))
    try:
        group.start()
        assert group.wait_ready(120)
        results = {name: handle.get().result for name, handle in group.items()}
        assert {n: r.version for n, r in results.items()} == {
            "champion": f"{IRIS}/2",
            "challenger": f"{IRIS}/3",
            "pinned": f"{IRIS}/2",
        }
        assert sorted(deserialized) == sorted({r.path.parent.name for r in results.values()})  # once per version
        assert len(list((tmp_path / "entries").iterdir())) == 2  # one download per version
        assert sum(not r.from_cache for r in results.values()) == 2
        assert group["champion"].get().model is group["pinned"].get().model
        x = np.random.default_rng(0).normal(size=(5, 4))
        assert len(group["challenger"].get().model.predict(x)) == 5
        for name, result in results.items():
            labels = {"reference": name, "version": result.version, "digest": result.digest, "source": result.source}
            assert registry.get_sample_value("model_loader_model_info", labels) == 1.0
    finally:
        group.close()
        for source in sources:
            source.close()
