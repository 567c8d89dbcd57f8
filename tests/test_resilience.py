"""The cache transaction under damage, kills, frozen lock holders and rollbacks, with the
loader's default settings unless a setting is the subject."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import read_tree, wait_for, write_tree
from model_loader import (
    AllSourcesFailedError,
    CacheConfig,
    Deadline,
    FileEntry,
    IntegrityError,
    LoaderConfig,
    Manifest,
    ModelRef,
    ResilientLoader,
    ResolvedModel,
    SourceUnavailableError,
)
from model_loader._cache import DiskCache
from model_loader.testing import InMemorySource

FILES = {"model.bin": b"w" * 4096, "conf/params.json": b'{"a": 1}', "README": b"toy"}


def config(cache_dir: Path, *, cache: dict[str, Any] | None = None, **changes: Any) -> LoaderConfig:
    """Default settings, but this cache directory."""
    return LoaderConfig(cache=CacheConfig(dir=cache_dir, **(cache or {})), **changes)


def no_sleep(seconds: float) -> None:
    return None


def first_load(tmp_path: Path) -> tuple[InMemorySource, ModelRef, Path, Path]:
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")
    cache = tmp_path / "cache"
    with ResilientLoader([(store, ref)], config=config(cache), sleep=no_sleep) as loader:
        served = loader.fetch()
    return store, ref, cache, served.path.parent


# -- the damage matrix ------------------------------------------------------------------


def _damage(kind: str, entry: Path, tmp_path: Path) -> None:
    manifest = entry / "manifest.json"
    if kind == "no-manifest":
        manifest.unlink()
    elif kind == "manifest-not-an-object":
        manifest.write_text("[1, 2, 3]")
    elif kind == "manifest-wrong-types":
        data = json.loads(manifest.read_text())
        data["files"] = [{"path": 7, "size": "big"}]
        manifest.write_text(json.dumps(data))
    elif kind == "manifest-not-json":
        manifest.write_bytes(b"\xff\x00garbage")
    elif kind == "another-models-entry":
        other = InMemorySource("other")
        ref = other.publish("x", {"other.bin": b"o" * 4096})
        with ResilientLoader([(other, ref)], config=config(tmp_path / "c2")) as loader:
            theirs = loader.fetch().path.parent
        shutil.rmtree(entry)
        shutil.copytree(theirs, entry)
    elif kind == "file-where-the-entry-belongs":
        shutil.rmtree(entry)
        entry.write_bytes(b"not a directory")
    elif kind == "file-where-files-belongs":
        shutil.rmtree(entry / "files")
        (entry / "files").write_bytes(b"not a directory")
    elif kind == "missing-file":
        (entry / "files" / "model.bin").unlink()
    elif kind == "truncated-file":
        (entry / "files" / "model.bin").write_bytes(b"w" * 10)
    elif kind == "same-size-other-bytes":
        (entry / "files" / "model.bin").write_bytes(b"x" * 4096)
    elif kind == "extra-file":
        (entry / "files" / "intruder.py").write_text("print('hi')")
    elif kind == "a-directory-where-a-file-belongs":
        (entry / "files" / "README").unlink()
        (entry / "files" / "README").mkdir()
    else:  # pragma: no cover - a typo in the parameters
        raise AssertionError(kind)


ALWAYS_DETECTED = [
    "no-manifest",
    "manifest-not-an-object",
    "manifest-wrong-types",
    "manifest-not-json",
    "another-models-entry",
    "file-where-the-entry-belongs",
    "file-where-files-belongs",
    "missing-file",
    "truncated-file",
    "a-directory-where-a-file-belongs",
]
FULL_ONLY = ["same-size-other-bytes", "extra-file"]
MATRIX = [(k, "fast") for k in ALWAYS_DETECTED] + [(k, "full") for k in ALWAYS_DETECTED + FULL_ONLY]


@pytest.mark.parametrize(("kind", "verify"), MATRIX)
def test_damage_with_the_source_up_is_quarantined_and_fetched_again(tmp_path: Path, kind: str, verify: str) -> None:
    store, ref, cache, entry = first_load(tmp_path)
    _damage(kind, entry, tmp_path)
    with ResilientLoader([(store, ref)], config=config(cache, cache={"verify": verify})) as loader:
        served = loader.fetch()
    assert (served.from_cache, served.degraded, read_tree(served.path)) == (False, False, FILES)
    assert DiskCache(cache).verify_all("full") == []
    assert list((cache / ".quarantine").iterdir())  # kept for inspection


@pytest.mark.parametrize(("kind", "verify"), MATRIX)
def test_damage_with_the_source_down_is_a_typed_error_naming_it(tmp_path: Path, kind: str, verify: str) -> None:
    store, ref, cache, entry = first_load(tmp_path)
    _damage(kind, entry, tmp_path)
    store.set_available(False)
    with (
        ResilientLoader([(store, ref)], config=config(cache, cache={"verify": verify}), sleep=no_sleep) as loader,
        pytest.raises(AllSourcesFailedError, match="damaged") as info,
    ):
        loader.fetch()
    assert isinstance(info.value.failures[0][1], SourceUnavailableError)


@pytest.mark.parametrize(("kind", "verify"), MATRIX)
def test_damage_offline_is_a_typed_error_naming_it(tmp_path: Path, kind: str, verify: str) -> None:
    store, ref, cache, entry = first_load(tmp_path)
    _damage(kind, entry, tmp_path)
    with (
        ResilientLoader([(store, ref)], config=config(cache, offline=True, cache={"verify": verify})) as loader,
        pytest.raises(AllSourcesFailedError, match=r"offline.*damaged"),
    ):
        loader.fetch()


@pytest.mark.parametrize("content", ["[]", '"x"', '{"key": 5}', "{}", "\xff", '{"identity": "mem://default"}'])
def test_a_ref_of_any_shape_is_ignored_and_replaced(tmp_path: Path, content: str) -> None:
    store, ref, cache, _ = first_load(tmp_path)
    (ref_file,) = (cache / "refs").iterdir()
    ref_file.write_text(content)
    store.set_available(False)
    with (
        ResilientLoader([(store, ref)], config=config(cache), sleep=no_sleep) as loader,
        pytest.raises(AllSourcesFailedError, match="no last-known-good version"),
    ):
        loader.fetch()
    store.set_available(True)
    with ResilientLoader([(store, ref)], config=config(cache)) as loader:
        assert loader.fetch().from_cache
    store.set_available(False)
    with ResilientLoader([(store, ref)], config=config(cache), sleep=no_sleep) as loader:
        assert loader.fetch().degraded  # the ref was written again by the successful load


@pytest.mark.parametrize("content", ["[[1, 2]]", '{"a": 1}', '[["/x", 1, 2, 3, 4, "r", null]]', "7"])
def test_a_local_hash_memo_of_any_shape_is_ignored(tmp_path: Path, content: str) -> None:
    model = tmp_path / "model"
    write_tree(model, FILES)
    cache = tmp_path / "cache"
    with ResilientLoader([str(model)], config=config(cache)) as loader:
        first = loader.fetch()
    for memo in (cache / "state" / "local").iterdir():
        memo.write_text(content)
    with ResilientLoader([str(model)], config=config(cache)) as loader:
        again = loader.fetch()
    assert (again.version, again.from_cache) == (first.version, True)


def test_cache_verify_checks_every_directory_and_reports_each(tmp_path: Path) -> None:
    store = InMemorySource()
    cache = tmp_path / "cache"
    entries = []
    for name in "abcde":
        ref = store.publish(name, {"f": name.encode() * 100})
        with ResilientLoader([(store, ref)], config=config(cache)) as loader:
            entries.append(loader.fetch().path.parent)
    (entries[0] / "manifest.json").unlink()
    (entries[1] / "files" / "f").write_bytes(b"z" * 100)
    shutil.rmtree(entries[2])
    entries[2].write_text("a file")
    (cache / "entries" / "not-a-key").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "model_loader", "cache", "verify", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    damaged = [line for line in out.stdout.splitlines() if line.startswith("corrupt")]
    assert len(damaged) == 4, out.stdout
    assert sorted(p.name for p in (cache / "entries").iterdir()) == sorted([entries[3].name, entries[4].name])


def test_stale_staging_beside_a_healthy_entry_is_removed(tmp_path: Path) -> None:
    store, ref, cache, entry = first_load(tmp_path)
    stale = cache / ".staging" / f"{entry.name}.deadbeef"
    (stale / "files").mkdir(parents=True)
    (stale / "files" / "model.bin").write_bytes(b"half")
    with ResilientLoader([(store, ref)], config=config(cache)) as loader:
        assert loader.fetch().from_cache
    assert not stale.exists()


# -- the right version, always ----------------------------------------------------------


def test_a_rollback_survives_a_restart_during_an_outage(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"v": b"1"}, alias="prod")
    cache = tmp_path / "cache"
    with ResilientLoader([(store, ref)], config=config(cache), loader_fn=lambda p: (p / "v").read_bytes()) as loader:
        assert loader.load() == b"1"
        store.publish("m", {"v": b"2"}, alias="prod")
        assert loader.load() == b"2"
        store._aliases[("m", "prod")] = 1  # the alias moves back: a rollback
        back, result = loader.load_with_result()
        assert (back, result.version, result.from_cache) == (b"1", "m/1", True)  # a memory hit
    store.set_available(False)
    with ResilientLoader([(store, ref)], config=config(cache), sleep=no_sleep) as restarted:
        served = restarted.fetch()
    assert (served.version, served.degraded, read_tree(served.path)) == ("m/1", True, {"v": b"1"})


def test_concurrent_loads_each_get_their_own_result(tmp_path: Path) -> None:
    store = InMemorySource()
    a = store.publish("a", {"v": b"a"})
    b = store.publish("b", {"v": b"b"})
    cache = tmp_path / "cache"
    loaders = [
        ResilientLoader([(store, r)], config=config(cache), loader_fn=lambda p: (p / "v").read_bytes()) for r in (a, b)
    ]
    results: list[tuple[bytes, str]] = []
    lock = threading.Lock()

    def work(loader: ResilientLoader) -> None:
        for _ in range(20):
            model, result = loader.load_with_result()
            with lock:
                results.append((model, result.version))

    threads = [threading.Thread(target=work, args=(loader,)) for loader in loaders for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {(m, v) for m, v in results} == {(b"a", "a/1"), (b"b", "b/1")}


# -- resumed fetches ----------------------------------------------------------------------


class FlakyAfter(InMemorySource):
    """Fails with SourceUnavailableError after writing ``every`` files per fetch attempt."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every
        self.written: list[str] = []

    def fetch(self, resolved: ResolvedModel, dest: Path) -> Manifest:
        from model_loader import FetchContext

        ctx = FetchContext.current()
        assert resolved.files is not None
        entries = []
        for f in resolved.files[: self.every]:
            data = self._versions[resolved.meta["name"]][int(resolved.meta["number"]) - 1][f.path]
            target = dest / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            import hashlib

            done = FileEntry(f.path, len(data), hashlib.sha256(data).hexdigest())
            ctx.file_done(done)
            entries.append(done)
            self.written.append(f.path)
        if len(entries) < len(resolved.files):
            raise SourceUnavailableError("cut off mid-fetch", scheme="mem")
        return Manifest.of(entries)


def test_retries_resume_after_the_files_already_fetched(tmp_path: Path) -> None:
    store = FlakyAfter(every=3)
    files = {f"part-{i:02}": bytes([i]) * 1000 for i in range(20)}
    ref = store.publish("m", files)
    with ResilientLoader([(store, ref)], config=config(tmp_path / "cache"), sleep=no_sleep) as loader:
        served = loader.fetch()
    assert read_tree(served.path) == files
    assert sorted(store.written) == sorted(files)  # every file fetched exactly once
    assert dict(served.retries)[ref.uri] == 6  # 7 attempts, each one made progress


_KILLED_CHILD = """
import hashlib, json, sys, time
from pathlib import Path
from model_loader import FetchContext, FileEntry, LoaderConfig, CacheConfig, Manifest, ResilientLoader
from model_loader.sources.local import LocalSource

class Slow(LocalSource):
    def fetch(self, resolved, dest):
        ctx = FetchContext.current()
        log = open(sys.argv[2], "a")
        out = []
        for f in resolved.files:
            data = Path(resolved.meta["path"], f.path).read_bytes()
            (dest / f.path).write_bytes(data)
            entry = FileEntry(f.path, len(data), hashlib.sha256(data).hexdigest(), None, "sha256")
            ctx.file_done(entry)
            log.write(json.dumps([f.path, len(data)]) + "\\n")
            log.flush()
            out.append(entry)
            if sys.argv[3] == "hang" and len(out) == 20:
                print("half", flush=True)
                time.sleep(3600)
        return Manifest.of(out)

loader = ResilientLoader([(Slow(), sys.argv[1])], config=LoaderConfig(cache=CacheConfig(dir=sys.argv[4])))
print(json.dumps(loader.fetch().to_dict()), flush=True)
"""


def test_a_herd_whose_downloader_is_killed_pulls_about_one_copy(tmp_path: Path) -> None:
    model = tmp_path / "model"
    files = {f"shard-{i:02}.bin": os.urandom(256 * 1024) for i in range(40)}
    write_tree(model, files)
    cache = tmp_path / "cache"
    origin = tmp_path / "origin.log"
    script = tmp_path / "child.py"
    script.write_text(_KILLED_CHILD)

    def start(mode: str) -> subprocess.Popen[str]:
        cmd = [sys.executable, str(script), str(model), str(origin), mode, str(cache)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    downloader = start("hang")
    try:
        assert downloader.stdout is not None
        assert downloader.stdout.readline().strip() == "half"
        herd = [start("run") for _ in range(7)]  # they queue on the lock, or find it free after the kill
        os.kill(downloader.pid, signal.SIGKILL)
        outs = [json.loads(p.communicate(timeout=120)[0]) for p in herd]
    finally:
        for p in [downloader, *locals().get("herd", [])]:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in herd)
    assert len({o["path"] for o in outs}) == 1
    assert read_tree(Path(outs[0]["path"])) == files
    pulled = sum(size for _, size in map(json.loads, origin.read_text().splitlines()))
    copies = pulled / sum(len(b) for b in files.values())
    assert copies < 1.3, f"the herd pulled {copies:.2f} copies"


def test_a_frozen_lock_holder_does_not_outlast_the_deadline(tmp_path: Path) -> None:
    model = tmp_path / "model"
    files = {f"shard-{i:02}.bin": os.urandom(64 * 1024) for i in range(40)}
    write_tree(model, files)
    cache = tmp_path / "cache"
    script = tmp_path / "child.py"
    script.write_text(_KILLED_CHILD)
    holder = subprocess.Popen(
        [sys.executable, str(script), str(model), str(tmp_path / "log"), "hang", str(cache)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "half"
        os.kill(holder.pid, signal.SIGSTOP)  # frozen with the entry's lock held
        started = time.monotonic()
        with ResilientLoader([str(model)], config=config(cache, deadline=6)) as loader:
            served = loader.fetch()
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert read_tree(served.path) == files
    assert elapsed < 6 + 1, f"took {elapsed:.1f}s with a 6 s deadline"


# -- the deadline and the smaller promises -------------------------------------------------


class Recording(InMemorySource):
    """Records the current deadline's remaining time at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.budgets: dict[str, float] = {}

    def resolve(self, ref: ModelRef) -> ResolvedModel:
        self.budgets["resolve"] = Deadline.current().remaining()
        return super().resolve(ref)

    def fetch(self, resolved: ResolvedModel, dest: Path) -> Manifest:
        self.budgets["fetch"] = Deadline.current().remaining()
        return super().fetch(resolved, dest)


def test_sources_are_handed_the_deadline(tmp_path: Path) -> None:
    store = Recording()
    ref = store.publish("m", FILES)
    cache = tmp_path / "cache"
    with ResilientLoader([(store, ref)], config=config(cache, deadline=30)) as loader:
        loader.fetch()
    assert 25 < store.budgets["resolve"] <= 30  # nothing to fall back on: the source's whole budget
    assert 25 < store.budgets["fetch"] <= 30
    with ResilientLoader([(store, ref)], config=config(cache, deadline=30)) as loader:
        loader.fetch()
    assert store.budgets["resolve"] <= LoaderConfig().resolve_timeout  # a cached copy can be served instead


def test_one_string_is_one_source(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tree(model, FILES)
    with ResilientLoader(str(model), config=config(tmp_path / "cache")) as loader:
        assert loader.sources == (f"file://{model}",)
        assert read_tree(loader.fetch().path) == FILES


def test_all_sources_failed_says_what_failed_and_invents_nothing(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES)
    store.set_available(False)
    with (
        ResilientLoader([(store, ref)], config=config(tmp_path / "cache"), sleep=no_sleep) as loader,
        pytest.raises(AllSourcesFailedError) as info,
    ):
        loader.fetch()
    assert [type(e).__name__ for _, e in info.value.failures] == ["SourceUnavailableError"]
    assert "no last-known-good version" in str(info.value)
    assert "ModelNotFoundError" not in str(info.value)


class Unverifiable(InMemorySource):
    """Publishes no hashes before the download: only sizes can be checked."""

    def resolve(self, ref: ModelRef) -> ResolvedModel:
        resolved = super().resolve(ref)
        assert resolved.files is not None
        files = tuple(FileEntry(f.path, f.size) for f in resolved.files)
        return ResolvedModel(resolved.ref, resolved.source_id, resolved.version, files, resolved.metadata)


def test_require_verified_refuses_what_cannot_be_verified(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    loose = Unverifiable()
    ref = loose.publish("m", FILES)
    with ResilientLoader([(loose, ref)], config=config(cache)) as loader:
        assert loader.fetch().verified is False
    with (
        ResilientLoader([(loose, ref)], config=config(cache, require_verified=True)) as loader,
        pytest.raises(AllSourcesFailedError) as info,
    ):
        loader.fetch()
    assert isinstance(info.value.failures[0][1], IntegrityError)
    strict = InMemorySource("strict")
    ref = strict.publish("m", FILES)
    with ResilientLoader([(strict, ref)], config=config(cache, require_verified=True)) as loader:
        assert loader.fetch().verified is True


def test_concurrent_loads_deserialize_once_even_without_a_memory_cache(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES)
    calls: list[int] = []
    gate = threading.Event()

    def slow_load(path: Path) -> object:
        calls.append(1)
        gate.wait(10)
        return object()

    cfg = config(tmp_path / "cache", cache={"memory_items": 0})
    with ResilientLoader([(store, ref)], config=cfg, loader_fn=slow_load) as loader:
        loader.fetch()  # the files are cached; the loads below only deserialize
        entered: list[int] = []
        real = loader.memory.get_or_load

        def counting(key: Any, factory: Any) -> Any:
            entered.append(1)
            return real(key, factory)

        loader.memory.get_or_load = counting  # type: ignore[method-assign]
        got: list[object] = []
        threads = [threading.Thread(target=lambda: got.append(loader.load())) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(entered) == 4, what="four loads to ask the memory cache")
        gate.set()
        for t in threads:
            t.join()
    assert (len(got), len({id(o) for o in got}), len(calls)) == (4, 1, 1)
