"""Faults injected for real: SIGKILL mid-copy, concurrent processes, a full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from helpers import fast_config, read_tree, write_tree
from model_loader import CacheConfig, CacheError, ResilientLoader, ResolvedModel
from model_loader.testing import InMemorySource

BIG = 8 * 1024 * 1024


def _model(tmp_path: Path, size: int = BIG) -> tuple[Path, dict[str, bytes]]:
    files = {"weights.bin": os.urandom(size), "MLmodel.txt": b"toy", "conf/a.json": b"{}"}
    model = tmp_path / "model"
    write_tree(model, files)
    return model, files


def _staging(cache: Path) -> list[Path]:
    return list((cache / ".staging").iterdir()) if (cache / ".staging").exists() else []


def test_sigkill_mid_copy_leaves_no_partial_entry_and_the_next_run_recovers(tmp_path: Path) -> None:
    model, files = _model(tmp_path)
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import sys
        from model_loader import ResilientLoader, LoaderConfig, CacheConfig
        from model_loader.sources import local

        real = local.copy_file

        def copy_then_hang(src, dest, **kw):
            if src.name == "weights.bin":
                with open(src, "rb") as f, open(dest, "wb") as out:
                    out.write(f.read({BIG // 2}))
                    out.flush()
                print("half-written", flush=True)
                sys.stdin.read()  # hang here until killed
            return real(src, dest, **kw)

        local.copy_file = copy_then_hang
        loader = ResilientLoader([{str(model)!r}], config=LoaderConfig(cache=CacheConfig(dir={str(cache)!r})))
        loader.fetch()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "half-written"
        assert len(_staging(cache)) == 1  # the copy really is in flight
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list((cache / "entries").iterdir()) == []  # no partial entry was ever published
    result = ResilientLoader([str(model)], config=fast_config(cache)).fetch()
    assert result.from_cache is False
    assert read_tree(result.path) == files
    assert _staging(cache) == []  # the stale staging was cleaned


def test_four_processes_fetching_the_same_cold_model_make_one_copy(tmp_path: Path) -> None:
    model, files = _model(tmp_path, 32 * 1024 * 1024)
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import json, os, time
        from model_loader import ResilientLoader, LoaderConfig, CacheConfig
        loader = ResilientLoader([{str(model)!r}], config=LoaderConfig(cache=CacheConfig(dir={str(cache)!r})))
        print("ready", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        print(json.dumps(loader.fetch().to_dict()), flush=True)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        go.touch()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(r["from_cache"] for r in results) == [False, True, True, True]
    assert len({r["path"] for r in results}) == 1
    assert len(list((cache / "entries").iterdir())) == 1
    assert _staging(cache) == []
    assert read_tree(Path(results[0]["path"])) == files


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 4 MiB tmpfs: a real full disk (root can mount here; CI runs as root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()!r}); the free-space test still runs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


class _NoSizes(InMemorySource):
    """Declares no file sizes at resolve, so nothing can be checked before writing."""

    def resolve(self, ref: Any) -> ResolvedModel:
        r = super().resolve(ref)
        return ResolvedModel(r.ref, r.source_id, r.version, None, r.metadata)


def test_disk_full_while_staging_is_a_cache_error_and_leaves_earlier_entries_intact(small_disk: Path) -> None:
    store = _NoSizes()
    small = store.publish("small", {"a": b"x" * 1024})
    big = store.publish("big", {"w": b"y" * (6 * 1024 * 1024)})
    cache = small_disk / "cache"
    earlier = ResilientLoader([(store, small)], config=fast_config(cache)).fetch()
    with pytest.raises(CacheError, match="no space"):
        ResilientLoader([(store, big)], config=fast_config(cache)).fetch()
    assert _staging(cache) == []
    assert read_tree(earlier.path) == {"a": b"x" * 1024}
    again = ResilientLoader([(store, small)], config=fast_config(cache)).fetch()
    assert again.from_cache is True


def test_free_space_check_refuses_before_writing(tmp_path: Path) -> None:
    store = InMemorySource()
    ref = store.publish("m", {"w": b"y" * 1000})
    huge = 1 << 62  # more than any disk has free
    cfg = fast_config(tmp_path / "cache", cache=CacheConfig(dir=tmp_path / "cache", min_free=huge))
    with pytest.raises(CacheError, match="not enough free space"):
        ResilientLoader([(store, ref)], config=cfg).fetch()
    assert [c for c in store.calls if c.startswith("fetch")] == []
    assert _staging(tmp_path / "cache") == []


def test_a_corrupt_entry_found_by_two_processes_is_fetched_again_once(tmp_path: Path) -> None:
    model, files = _model(tmp_path, 1024 * 1024)
    cache = tmp_path / "cache"
    first = ResilientLoader([str(model)], config=fast_config(cache)).fetch()
    with open(first.path / "weights.bin", "r+b") as f:
        f.truncate(5)
    script = textwrap.dedent(
        f"""
        import json
        from model_loader import ResilientLoader, LoaderConfig, CacheConfig
        config = LoaderConfig(cache=CacheConfig(dir={str(cache)!r}))
        print(json.dumps(ResilientLoader([{str(model)!r}], config=config).fetch().to_dict()))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert sorted(o["from_cache"] for o in outs) == [False, True]
    assert read_tree(Path(outs[0]["path"])) == files
    assert _staging(cache) == []


def test_an_unreadable_file_is_access_denied_and_leaves_nothing_in_the_cache() -> None:
    import tempfile

    import filelock  # noqa: F401 - loaded before the fork: the child may not read root's files
    import tenacity  # noqa: F401

    base = Path(tempfile.mkdtemp(prefix="ml-unreadable-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        model = base / "model"
        write_tree(model, {"ok.txt": b"1", "secret.bin": b"2" * 100})
        os.chmod(model / "secret.bin", 0)
        cache = base / "cache"
        cache.mkdir(mode=0o777)
        os.chmod(cache, 0o777)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child drops root (which reads anything) and tries to load
            code = 1
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    ResilientLoader([str(model)], config=fast_config(cache)).fetch()
                    message = "served"
                except Exception as exc:
                    failures = getattr(exc, "failures", [])
                    message = f"{type(exc).__name__}:{','.join(type(e).__name__ for _, e in failures)}"
                os.write(write_fd, message.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        _, status = os.waitpid(pid, 0)
        outcome = os.read(read_fd, 4096).decode()
        os.close(read_fd)
        assert status == 0
        assert outcome.startswith("AllSourcesFailedError:AccessDeniedError"), outcome
        assert list((cache / "entries").iterdir()) == []
        assert _staging(cache) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
