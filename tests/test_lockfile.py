"""Lock files: a release pins its models; served exactly, online or offline, or refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from _mlflow_server import MlflowServer
from helpers import read_tree, write_tree
from model_loader import (
    AllSourcesFailedError,
    CacheConfig,
    FileEntry,
    IntegrityError,
    InvalidReferenceError,
    LoaderConfig,
    Manifest,
    ResilientLoader,
)
from model_loader.lockfile import LockFile, lock

FILES = {"model.bin": b"weights-1" * 1000, "conf.json": b"{}"}


def config(cache: Path, **changes: object) -> LoaderConfig:
    return LoaderConfig(cache=CacheConfig(dir=cache), **changes)  # type: ignore[arg-type]


def served(locked: LockFile, cache: Path, **changes: object) -> list[dict[str, bytes]]:
    out = []
    for model in locked.models:
        with ResilientLoader.from_lock(model, config=config(cache, **changes)) as loader:
            out.append(read_tree(loader.fetch().path))
    return out


def test_a_lock_round_trips_and_serves_online_and_offline(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tree(model, FILES)
    locked = lock([[str(model)]], config(tmp_path / "cache"))
    again = LockFile.loads(locked.dumps())
    assert again == locked
    (entry,) = again.models
    assert {f.path: f.size for f in entry.files} == {p: len(b) for p, b in FILES.items()}
    assert served(again, tmp_path / "fresh") == [FILES]  # online, into an empty cache
    assert served(again, tmp_path / "fresh", offline=True) == [FILES]  # offline, from the cache


def test_a_changed_source_is_refused_but_the_cached_locked_version_is_served(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tree(model, FILES)
    cache = tmp_path / "cache"
    locked = lock([[str(model)]], config(cache))
    (model / "model.bin").write_bytes(b"weights-2" * 1000)  # the directory moved on
    assert served(locked, cache) == [FILES]  # the cache still holds exactly the locked version
    empty = config(tmp_path / "empty")
    with (
        ResilientLoader.from_lock(locked.models[0], config=empty) as loader,
        pytest.raises(AllSourcesFailedError) as info,
    ):
        loader.fetch()
    assert isinstance(info.value.failures[0][1], IntegrityError)
    assert not any((tmp_path / "empty" / "entries").iterdir())


def test_a_tampered_lock_file_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tree(model, FILES)
    cache = tmp_path / "cache"
    text = lock([[str(model)]], config(cache)).dumps()
    data = json.loads(text)
    data["models"][0]["files"][0]["sha256"] = "0" * 64  # the files no longer add up to the digest
    with pytest.raises(InvalidReferenceError, match="digest"):
        LockFile.loads(json.dumps(data))
    # consistent, but not what the source or the cache hold: never served
    (good,) = LockFile.loads(text).models
    files = tuple(
        FileEntry(f.path, f.size, hashlib.sha256(b"other").hexdigest()) if f.path == "conf.json" else f
        for f in good.files
    )
    forged = dataclasses.replace(good, files=files, digest=Manifest.of(files).digest)
    for where in (cache, tmp_path / "empty"):
        with (
            ResilientLoader.from_lock(forged, config=config(where)) as loader,
            pytest.raises((IntegrityError, AllSourcesFailedError)),
        ):
            loader.fetch()
    assert not (tmp_path / "empty" / "entries").exists() or not any((tmp_path / "empty" / "entries").iterdir())


@pytest.mark.slow
def test_a_moved_alias_does_not_move_a_locked_release(
    mlflow_s3_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_s3_server.url)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", mlflow_s3_server.env["MLFLOW_S3_ENDPOINT_URL"])
    name = f"locked-{os.urandom(4).hex()}"
    ref = mlflow_s3_server.publish_files(name, {"w.bin": b"one"}, "prod")
    locked = lock([[ref.uri]], config(tmp_path / "cache"))
    assert locked.models[0].pinned == f"models:/{name}/1"
    mlflow_s3_server.publish_files(name, {"w.bin": b"two"}, "prod")  # the alias moves on
    assert served(locked, tmp_path / "fresh") == [{"w.bin": b"one"}]  # fetched by its version, not the alias
    with ResilientLoader([ref.uri], config=config(tmp_path / "fresh")) as unlocked:
        assert read_tree(unlocked.fetch().path) == {"w.bin": b"two"}


def test_the_cli_locks_and_fetches_from_the_lock_online_and_offline(tmp_path: Path) -> None:
    import subprocess
    import sys

    a, b = tmp_path / "a", tmp_path / "b"
    write_tree(a, FILES)
    write_tree(b, {"other.bin": b"2" * 100})
    cache = tmp_path / "cache"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "model_loader", *args, "--cache-dir", str(cache)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    made = cli("lock", str(a), f"{b},{a}")
    assert made.returncode == 0, made.stderr
    lock_file = tmp_path / "models.lock"
    lock_file.write_text(made.stdout)
    assert [m.sources for m in LockFile.loads(made.stdout).models] == [(f"file://{a}",), (f"file://{b}", f"file://{a}")]
    for extra in ([], ["--offline"]):
        out = cli("fetch", "--json", "--lock", str(lock_file), *extra)
        assert out.returncode == 0, out.stderr
        trees = [read_tree(Path(r["path"])) for r in json.loads(out.stdout)]
        assert trees == [FILES, {"other.bin": b"2" * 100}]
    tampered = json.loads(made.stdout)
    tampered["models"][0]["digest"] = "sha256:" + "0" * 64
    lock_file.write_text(json.dumps(tampered))
    refused = cli("fetch", "--lock", str(lock_file))
    assert refused.returncode == 2
    assert "lock file" in refused.stderr
