"""Tiered caches: a local cache in front of a shared one pre-warmed by a job."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import read_tree
from model_loader import CacheConfig, LoaderConfig, ResilientLoader
from model_loader.testing import InMemorySource

FILES = {"model.bin": b"w" * 65536, "conf/a.json": b"{}"}


def config(local: Path, *tiers: Path, **cache: Any) -> LoaderConfig:
    return LoaderConfig(cache=CacheConfig(dir=local, tiers=tiers, **cache))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: what a writer would change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def read_only_shared(tmp_path: Path) -> Iterator[tuple[Path, InMemorySource, Any]]:
    """A shared tier pre-warmed by a "job", then made really read-only (a read-only tmpfs
    remount as root; permission bits and an unprivileged check otherwise)."""
    store = InMemorySource()
    ref = store.publish("m", FILES, alias="prod")
    shared = tmp_path / "shared"
    shared.mkdir()
    root = os.geteuid() == 0
    if root:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(shared)], capture_output=True)
        assert mounted.returncode == 0, mounted.stderr
    try:
        with ResilientLoader([(store, ref)], config=LoaderConfig(cache=CacheConfig(dir=shared))) as job:
            job.fetch()
        if root:
            subprocess.run(["mount", "-o", "remount,ro", str(shared)], check=True)
        else:
            for dirpath, dirnames, _ in os.walk(shared):
                for name in [*dirnames, ""]:
                    os.chmod(os.path.join(dirpath, name), 0o555)
        yield shared, store, ref
    finally:
        if root:
            subprocess.run(["umount", str(shared)], check=True)


def test_a_read_only_shared_hit_is_promoted_and_the_shared_tier_is_never_written(
    tmp_path: Path, read_only_shared: tuple[Path, InMemorySource, Any]
) -> None:
    shared, store, ref = read_only_shared
    before = snapshot(shared)
    local = tmp_path / "local"
    calls = len(store.calls)
    with ResilientLoader([(store, ref)], config=config(local, shared)) as loader:
        first = loader.fetch()
    assert (first.from_cache, read_tree(first.path)) == (True, FILES)
    assert first.path.is_relative_to(local)  # promoted: copied, since a read-only mount cannot be linked from
    assert "fetch m/1" not in store.calls[calls:]  # no download: the shared tier had it
    store.set_available(False)
    with ResilientLoader([(store, ref)], config=config(local)) as alone:
        assert alone.fetch().degraded  # the local tier now serves on its own, even during an outage
    assert snapshot(shared) == before


def test_promotion_off_serves_the_shared_copy_in_place(
    tmp_path: Path, read_only_shared: tuple[Path, InMemorySource, Any]
) -> None:
    shared, store, ref = read_only_shared
    local = tmp_path / "local"
    with ResilientLoader([(store, ref)], config=config(local, shared, promote="off")) as loader:
        served = loader.fetch()
    assert served.path.is_relative_to(shared)
    assert not any((local / "entries").iterdir())


def test_a_shared_tiers_last_known_good_serves_during_an_outage(
    tmp_path: Path, read_only_shared: tuple[Path, InMemorySource, Any]
) -> None:
    shared, store, ref = read_only_shared
    store.set_available(False)
    with ResilientLoader([(store, ref)], config=config(tmp_path / "local", shared), sleep=lambda s: None) as loader:
        served = loader.fetch()
    assert (served.degraded, read_tree(served.path)) == (True, FILES)


def test_promotion_on_one_filesystem_hard_links(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES)
    shared = tmp_path / "shared"
    with ResilientLoader([(store, ref)], config=config(shared)) as job:
        original = job.fetch()
    with ResilientLoader([(store, ref)], config=config(tmp_path / "local", shared)) as loader:
        promoted = loader.fetch()
    assert promoted.path != original.path
    assert (promoted.path / "model.bin").stat().st_ino == (original.path / "model.bin").stat().st_ino
    assert store.calls.count("fetch m/1") == 1  # only the job downloaded


def test_a_miss_in_every_tier_is_fetched_into_the_first_writable_one(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", FILES)
    shared = tmp_path / "shared"
    with ResilientLoader([(store, ref)], config=config(tmp_path / "local", shared)) as loader:
        served = loader.fetch()
    assert served.path.is_relative_to(tmp_path / "local")
    assert not any((shared / "entries").iterdir())
