"""One cache directory shared by several hosts.

Two hosts are simulated with two FUSE mounts (bindfs) of one directory: flock works
within a mount and is not forwarded between mounts, as on many shared volumes. Each
"host" has its own host id (``MODEL_LOADER_HOST_ID``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import read_tree, write_tree
from model_loader import CacheConfig, LoaderConfig, ResilientLoader
from model_loader._cache import DiskCache
from model_loader._hosts import host_id

_CHILD = """
import hashlib, json, sys, time
from pathlib import Path
from model_loader import FetchContext, FileEntry, LoaderConfig, CacheConfig, Manifest, ResilientLoader
from model_loader.sources.local import LocalSource

class SlowLink(LocalSource):
    # a slow origin: every file takes a while, and every byte sent is logged
    def fetch(self, resolved, dest):
        ctx = FetchContext.current()
        out = []
        with open(sys.argv[2], "a") as log:
            for f in resolved.files:
                data = Path(resolved.meta["path"], f.path).read_bytes()
                time.sleep(0.03)
                log.write(json.dumps([f.path, len(data)]) + "\\n")
                log.flush()
                target = dest / f.path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                entry = FileEntry(f.path, len(data), hashlib.sha256(data).hexdigest(), None, "sha256")
                ctx.file_done(entry)
                out.append(entry)
        return Manifest.of(out)

cfg = LoaderConfig(cache=CacheConfig(dir=sys.argv[3], shared=True))
with ResilientLoader([(SlowLink(), sys.argv[1])], config=cfg) as loader:
    print(json.dumps(loader.fetch().to_dict()), flush=True)
"""


def _bindfs_usable() -> str | None:
    if shutil.which("bindfs") is None:
        return "bindfs is not installed (.ci/run installs it with apt-get)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    return None


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two bindfs mounts of one directory: the same cache as two hosts see it."""
    reason = _bindfs_usable()
    if reason is not None:
        pytest.skip(reason)
    backing = tmp_path / "volume"
    mounts = [tmp_path / "host-a", tmp_path / "host-b"]
    backing.mkdir()
    mounted = []
    try:
        for mnt in mounts:
            mnt.mkdir()
            proc = subprocess.run(["bindfs", str(backing), str(mnt)], capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"bindfs cannot mount here: {proc.stderr.strip()}")
            mounted.append(mnt)
        yield mounts[0], mounts[1]
    finally:
        for mnt in mounted:
            subprocess.run(["fusermount", "-u", str(mnt)], check=False)


def test_flock_is_not_shared_between_the_two_mounts(two_hosts: tuple[Path, Path]) -> None:
    import fcntl

    a, b = two_hosts
    fa = os.open(a / "probe", os.O_RDWR | os.O_CREAT)
    fb = os.open(b / "probe", os.O_RDWR)
    try:
        fcntl.flock(fa, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fb, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise if locks were shared: the premise of this file
    finally:
        os.close(fa)
        os.close(fb)


def test_four_processes_per_host_with_random_kills_serve_exact_bytes(
    tmp_path: Path, two_hosts: tuple[Path, Path]
) -> None:
    model = tmp_path / "model"
    files = {f"shard-{i:02}.bin": os.urandom(64 * 1024) for i in range(30)}
    write_tree(model, files)
    origin = tmp_path / "origin.log"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    hosts = {"host-a": two_hosts[0], "host-b": two_hosts[1]}

    def start(host: str) -> subprocess.Popen[str]:
        env = {**os.environ, "MODEL_LOADER_HOST_ID": host}
        cmd = [sys.executable, str(script), str(model), str(origin), str(hosts[host])]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    torn: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # no partial entry may ever be visible, from either host
        entries = two_hosts[0] / "entries"
        while not stop.is_set():
            for name in os.listdir(entries) if entries.exists() else []:
                if not os.path.exists(entries / name / "manifest.json") and os.path.exists(entries / name):
                    torn.append(name)
            stop.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    rng = random.Random(4)
    procs = {(host, i): start(host) for host in hosts for i in range(4)}
    try:
        for _ in range(3):  # random SIGKILLs while they fetch; the killed come back
            time.sleep(rng.uniform(0.1, 0.6))  # the kills land at random moments: that is the experiment
            key = rng.choice(sorted(procs))
            procs[key].send_signal(signal.SIGKILL)
            procs[key].wait()
            procs[key] = start(key[0])
        outs = {key: json.loads(p.communicate(timeout=180)[0]) for key, p in procs.items()}
    finally:
        stop.set()
        watcher.join()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs.values())
    for (host, _), out in outs.items():
        assert read_tree(Path(out["path"])) == files
        assert Path(out["path"]).is_relative_to(hosts[host])
    assert torn == []
    assert DiskCache(two_hosts[1]).verify_all("full") == []
    pulled = sum(size for _, size in map(json.loads, origin.read_text().splitlines()))
    copies = pulled / sum(len(b) for b in files.values())
    assert copies <= 2.2, f"two hosts pulled {copies:.2f} copies (at most one per host, plus files cut by kills)"


def _staging_of_another_host(cache: Path, key: str, *, host: str, age: float, files: dict[str, bytes]) -> Path:
    import hashlib

    stage = cache / ".staging" / f"{key}.ghost"
    write_tree(stage / "files", files)
    journal = "".join(
        json.dumps({"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest(), "verified": "sha256"}) + "\n"
        for p, b in files.items()
    )
    (stage / "journal.jsonl").write_text(journal)
    owner = stage / "owner.json"
    owner.write_text(json.dumps({"host": host, "pid": 1, "started": time.time() - age}))
    past = time.time() - age
    os.utime(owner, (past, past))
    return stage


@pytest.mark.parametrize(("age", "resumed"), [(3600.0, True), (0.0, False)])
def test_a_dead_hosts_staging_is_resumed_and_a_live_ones_is_left_alone(
    tmp_path: Path, age: float, resumed: bool
) -> None:
    from model_loader.testing import InMemorySource

    store = InMemorySource()
    files = {f"f{i}": bytes([i]) * 100 for i in range(6)}
    ref = store.publish("m", files)
    cache = tmp_path / "cache"
    key = store.resolve(ref).cache_key
    DiskCache(cache)
    stage = _staging_of_another_host(cache, key, host="another-host", age=age, files=dict(list(files.items())[:3]))
    assert host_id() != "another-host"
    asked: list[int] = []
    real_fetch = store.fetch

    def counting_fetch(resolved: Any, dest: Path) -> Any:
        asked.append(len(resolved.files))
        return real_fetch(resolved, dest)

    store.fetch = counting_fetch  # type: ignore[method-assign]
    with ResilientLoader([(store, ref)], config=LoaderConfig(cache=CacheConfig(dir=cache, shared=True))) as loader:
        served = loader.fetch()
    assert read_tree(served.path) == files
    assert asked == [3 if resumed else 6]
    assert stage.exists() is not resumed  # resumed: renamed into the entry; alive: untouched
    if not resumed:
        assert (stage / "files" / "f0").read_bytes() == files["f0"]
