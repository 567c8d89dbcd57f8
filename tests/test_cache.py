"""The disk cache: layout, atomic publish, verification, quarantine, LRU, leases."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import fast_config, read_tree, write_tree
from model_loader import CacheConfig, CacheError, IntegrityError, ResilientLoader
from model_loader._cache import DiskCache, MemoryCache
from model_loader.testing import InMemorySource


def test_layout_and_cachedir_tag(tmp_path: Path) -> None:
    DiskCache(tmp_path / "c")
    tag = (tmp_path / "c" / "CACHEDIR.TAG").read_text()
    assert tag.startswith("Signature: 8a477f597d28d172789f06886806bc55")
    assert {p.name for p in (tmp_path / "c").iterdir()} >= {"entries", "refs", ".staging", ".locks", "CACHEDIR.TAG"}


def test_a_cache_path_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="not usable"):
        DiskCache(tmp_path / "file" / "cache")


@contextlib.contextmanager
def _read_only_after(populate: Callable[[Path], None], where: Path) -> Iterator[Path]:
    """A cache directory filled by ``populate`` while writable, then made read-only for real
    (a read-only tmpfs remount as root; permission bits otherwise)."""
    where.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the filesystem itself read-only
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True)
        assert mounted.returncode == 0, mounted.stderr
        try:
            populate(where)
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
            yield where
        finally:
            subprocess.run(["umount", str(where)], check=True)
    else:
        populate(where)
        for dirpath, dirnames, _ in os.walk(where):
            for name in [*dirnames, ""]:
                os.chmod(os.path.join(dirpath, name), 0o555)
        yield where


def test_a_read_only_cache_serves_hits_and_offline_without_writing(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"model.bin": b"weights"}, alias="prod")
    other = store.publish("other", {"x": b"1"})

    def warm(cache: Path) -> None:
        with ResilientLoader([(store, ref)], config=fast_config(cache)) as loader:
            loader.fetch()

    with _read_only_after(warm, tmp_path / "ro") as cache:
        before = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
        assert DiskCache(cache).read_only
        with ResilientLoader([(store, ref)], config=fast_config(cache)) as loader:
            hit = loader.fetch()
        assert (hit.from_cache, read_tree(hit.path)) == (True, {"model.bin": b"weights"})
        with ResilientLoader([(store, ref)], config=fast_config(cache, offline=True)) as loader:
            assert loader.fetch().offline
        with (
            ResilientLoader([(store, other)], config=fast_config(cache)) as loader,
            pytest.raises(CacheError, match="read-only"),
        ):
            loader.fetch()
        assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == before
        with pytest.raises(CacheError, match="not usable"):
            DiskCache(cache / "fresh")


def _loader(tmp_path: Path, store: InMemorySource, ref: object, **cfg: object) -> ResilientLoader:
    return ResilientLoader([(store, ref)], config=fast_config(tmp_path / "cache", **cfg), sleep=lambda s: None)  # type: ignore[list-item]


def test_published_entry_has_manifest_and_exact_files(tmp_path: Path) -> None:
    store = InMemorySource()
    files = {"a.bin": b"a" * 10, "d/b.txt": b"b"}
    ref = store.publish("m", files, alias="prod")
    result = _loader(tmp_path, store, ref).fetch()
    assert read_tree(result.path) == files
    manifest = json.loads((result.path.parent / "manifest.json").read_text())
    assert manifest["version"] == "m/1"
    assert manifest["digest"] == result.digest
    assert {f["path"]: f["size"] for f in manifest["files"]} == {"a.bin": 10, "d/b.txt": 1}
    assert list((tmp_path / "cache" / ".staging").iterdir()) == []


def test_truncated_file_is_detected_in_fast_mode_quarantined_and_refetched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"w.bin": b"x" * 1000}, alias="prod")
    first = _loader(tmp_path, store, ref).fetch()
    with open(first.path / "w.bin", "r+b") as f:
        f.truncate(10)
    second = _loader(tmp_path, store, ref).fetch()
    assert second.from_cache is False
    assert (second.path / "w.bin").read_bytes() == b"x" * 1000
    assert len(list((tmp_path / "cache" / ".quarantine").iterdir())) == 1
    assert "quarantined" in caplog.text


def test_altered_bytes_pass_fast_mode_but_not_full_mode(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"w.bin": b"x" * 1000}, alias="prod")
    first = _loader(tmp_path, store, ref).fetch()
    with open(first.path / "w.bin", "r+b") as f:
        f.write(b"EVIL")
    fast = _loader(tmp_path, store, ref).fetch()
    assert fast.from_cache is True  # same size: fast mode trusts it, as documented
    full = _loader(tmp_path, store, ref, cache=CacheConfig(dir=tmp_path / "cache", verify="full")).fetch()
    assert full.from_cache is False
    assert (full.path / "w.bin").read_bytes() == b"x" * 1000


def test_a_deleted_cached_file_is_detected(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"a": b"1", "b": b"2"}, alias="prod")
    first = _loader(tmp_path, store, ref).fetch()
    (first.path / "b").unlink()
    again = _loader(tmp_path, store, ref).fetch()
    assert again.from_cache is False
    assert read_tree(again.path) == {"a": b"1", "b": b"2"}


def test_verify_all_quarantines_corrupt_entries(tmp_path: Path) -> None:
    store = InMemorySource()
    ok = _loader(tmp_path, store, store.publish("ok", {"a": b"1"})).fetch()
    bad = _loader(tmp_path, store, store.publish("bad", {"a": b"2"})).fetch()
    (bad.path / "a").write_bytes(b"3")
    cache = DiskCache(tmp_path / "cache")
    problems = cache.verify_all("full")
    assert [key for key, _ in problems] == [bad.path.parent.name]
    assert ok.path.exists()
    assert not bad.path.exists()


def _fill(tmp_path: Path, store: InMemorySource, names: list[str], size: int) -> dict[str, Path]:
    paths = {}
    for name in names:
        loader = _loader(tmp_path, store, store.publish(name, {"w": name.encode() * size}))
        paths[name] = loader.fetch().path
        loader.close()
    return paths


def test_prune_evicts_least_recently_used_but_not_ref_targets(tmp_path: Path) -> None:
    store = InMemorySource()
    paths = _fill(tmp_path, store, ["a", "b", "c"], 1000)
    for i, name in enumerate(["b", "a", "c"]):  # LRU order: b oldest
        used = paths[name].parent / ".used"
        os.utime(used, (1_000_000 + i, 1_000_000 + i))
    cache = DiskCache(tmp_path / "cache")
    # every entry is the current target of its ref: nothing may go
    assert cache.prune(1) == []
    # move each ref to a new version: the old entries are no longer targets
    store.publish("a", {"w": b"new-a"})
    store.publish("b", {"w": b"new-b"})
    for name in ("a", "b"):
        loader = _loader(tmp_path, store, store.ref(f"mem://{name}"))
        loader.fetch()
        loader.close()
    evicted = cache.prune(cache.total_size() - 1)
    assert [e.version for e in evicted] == ["b/1"]
    assert not paths["b"].exists()
    assert paths["a"].exists()


def test_prune_never_evicts_an_entry_another_process_is_serving(tmp_path: Path) -> None:
    store = InMemorySource()
    paths = _fill(tmp_path, store, ["a"], 100)
    store.publish("a", {"w": b"newer"})
    loader = _loader(tmp_path, store, store.ref("mem://a"))
    loader.fetch()
    loader.close()
    entry = paths["a"].parent
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            f"fd = os.open({str(entry / '.lease')!r}, os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_SH)\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        cache = DiskCache(tmp_path / "cache")
        assert cache.prune(0) == []
        assert entry.exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert [e.version for e in DiskCache(tmp_path / "cache").prune(0)] == ["a/1"]


def test_max_size_prunes_after_each_fetch(tmp_path: Path) -> None:
    store = InMemorySource()
    cfg = {"cache": CacheConfig(dir=tmp_path / "cache", max_size=2500)}
    for n in range(3):
        store.publish("m", {"w": bytes([n]) * 1000})
        loader = _loader(tmp_path, store, store.ref("mem://m"), **cfg)
        loader.fetch()
        loader.close()
    versions = sorted(e.version for e, _ in DiskCache(tmp_path / "cache").entries())
    assert versions == ["m/2", "m/3"]


def test_memory_cache_is_bounded_and_single_flight() -> None:
    import threading

    cache = MemoryCache(2)
    calls: list[str] = []
    gate = threading.Event()

    def slow() -> str:
        calls.append("x")
        gate.wait(10)
        return "value"

    threads = [threading.Thread(target=lambda: cache.get_or_load("k", slow)) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert calls == ["x"]
    cache.get_or_load("k2", lambda: "2")
    cache.get_or_load("k3", lambda: "3")
    assert len(cache) == 2
    assert cache.get("k") is None


def test_unreadable_manifest_is_an_integrity_error(tmp_path: Path) -> None:
    store = InMemorySource()
    result = _loader(tmp_path, store, store.publish("m", {"a": b"1"})).fetch()
    (result.path.parent / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="manifest"):
        DiskCache(tmp_path / "cache").lookup(result.path.parent.name)


def test_write_tree_helper_roundtrip(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a/b": b"1"})
    assert read_tree(tmp_path) == {"a/b": b"1"}


def test_a_loader_releases_the_lease_of_a_version_it_no_longer_serves(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"w": b"1"}, alias="prod")
    loader = _loader(tmp_path, store, ref)
    old = loader.fetch()
    store.publish("m", {"w": b"2"}, alias="prod")
    new = loader.fetch()
    other_process = DiskCache(tmp_path / "cache")  # a separate lease table, as in a pruning process
    evicted = other_process._evict(next(e for e, _ in other_process.entries() if e.version == "m/1"))
    assert evicted  # not leased any more: the loader moved on to m/2
    assert not old.path.exists()
    newest = next(e for e, _ in other_process.entries() if e.version == "m/2")
    assert other_process._evict(newest) is False  # still served, so still leased
    assert new.path.exists()
