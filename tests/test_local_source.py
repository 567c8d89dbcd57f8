"""The local-directory source and the in-memory fake: conformance and their own edges."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from helpers import write_tree
from model_loader import IntegrityError, ModelNotFoundError, ModelRef, StaleResolutionError, parse_ref
from model_loader.sources import local as local_module
from model_loader.sources.local import LocalSource
from model_loader.testing import InMemorySource
from model_loader.testing.conformance import SourceConformanceTests, sample_files


class TestLocalConformance(SourceConformanceTests):
    @pytest.fixture
    def source(self) -> LocalSource:
        return LocalSource()

    @pytest.fixture
    def publish(self, tmp_path: Path) -> Callable[[str, Mapping[str, bytes], str], ModelRef]:
        def publish(name: str, files: Mapping[str, bytes], alias: str) -> ModelRef:
            root = tmp_path / "models" / name / alias
            if root.exists():
                shutil.rmtree(root)
            write_tree(root, files)
            return parse_ref(str(root))

        return publish

    @pytest.fixture
    def missing_ref(self, tmp_path: Path) -> ModelRef:
        return parse_ref(str(tmp_path / "no-such-model"))


class TestInMemoryConformance(SourceConformanceTests):
    @pytest.fixture
    def store(self) -> InMemorySource:
        return InMemorySource()

    @pytest.fixture
    def source(self, store: InMemorySource) -> InMemorySource:
        return store

    @pytest.fixture
    def publish(self, store: InMemorySource) -> Callable[[str, Mapping[str, bytes], str], ModelRef]:
        return store.publish

    @pytest.fixture
    def missing_ref(self, store: InMemorySource) -> ModelRef:
        return store.ref("mem://nothing-here")

    @pytest.fixture
    def unavailable_source(self, store: InMemorySource) -> InMemorySource:
        down = InMemorySource()
        down.set_available(False)
        return down


def test_a_file_where_a_directory_is_expected(tmp_path: Path) -> None:
    (tmp_path / "model.pkl").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        LocalSource().resolve(parse_ref(str(tmp_path / "model.pkl")))


def test_an_empty_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no files"):
        LocalSource().resolve(parse_ref(str(tmp_path)))


def test_symlink_outside_the_directory_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tree(model, {"a.bin": b"a"})
    (tmp_path / "secret").write_text("nope")
    (model / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(IntegrityError, match="outside"):
        LocalSource().resolve(parse_ref(str(model)))


def test_symlink_inside_the_directory_is_served_as_a_file(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tree(model, {"weights/v1.bin": b"abc"})
    (model / "current.bin").symlink_to(model / "weights" / "v1.bin")
    resolved = LocalSource().resolve(parse_ref(str(model)))
    assert resolved.files is not None
    assert {f.path: f.size for f in resolved.files} == {"current.bin": 3, "weights/v1.bin": 3}


def test_special_files_are_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tree(model, {"a.bin": b"a"})
    os.mkfifo(model / "pipe")
    with pytest.raises(IntegrityError, match="not a regular file"):
        LocalSource().resolve(parse_ref(str(model)))
    os.unlink(model / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(model / "sock"))
        with pytest.raises(IntegrityError, match="not a regular file"):
            LocalSource().resolve(parse_ref(str(model)))
    finally:
        sock.close()


def test_re_resolving_an_unchanged_directory_reads_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    write_tree(model, sample_files("memo"))
    source = LocalSource()
    first = source.resolve(parse_ref(str(model)))
    hashed: list[Path] = []
    real = local_module.hash_file
    monkeypatch.setattr(local_module, "hash_file", lambda p: hashed.append(p) or real(p))
    assert source.resolve(parse_ref(str(model))) == first
    assert hashed == []
    (model / "model.bin").write_bytes(b"changed")
    changed = source.resolve(parse_ref(str(model)))
    assert [p.name for p in hashed] == ["model.bin"]
    assert changed.version != first.version


def test_include_and_exclude_globs(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tree(model, {"model.pkl": b"m", "checkpoints/1.ckpt": b"c", "env.tar.gz": b"e", "conf/a.json": b"{}"})
    source = LocalSource(exclude=("checkpoints/*", "*.tar.gz"))
    resolved = source.resolve(parse_ref(str(model)))
    assert resolved.files is not None
    assert sorted(f.path for f in resolved.files) == ["conf/a.json", "model.pkl"]
    only = LocalSource(include=("*.pkl",)).resolve(parse_ref(str(model)))
    assert only.files is not None
    assert [f.path for f in only.files] == ["model.pkl"]


def test_a_file_changed_between_resolve_and_fetch_is_stale(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tree(model, {"a.bin": b"one"})
    source = LocalSource()
    resolved = source.resolve(parse_ref(str(model)))
    (model / "a.bin").write_bytes(b"two")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(StaleResolutionError, match=r"a\.bin"):
        source.fetch(resolved, dest)


def test_a_fresh_process_reuses_the_persisted_hash_memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    write_tree(model, sample_files("persist"))
    state = tmp_path / "state"
    first = LocalSource(state_dir=state).resolve(parse_ref(str(model)))
    hashed: list[str] = []
    real = local_module.hash_file
    monkeypatch.setattr(local_module, "hash_file", lambda p: hashed.append(p.name) or real(p))
    again = LocalSource(state_dir=state).resolve(parse_ref(str(model)))  # a new instance: as a new process
    assert again.version == first.version
    assert hashed == []
    (model / "model.bin").write_bytes(b"changed")
    changed = LocalSource(state_dir=state).resolve(parse_ref(str(model)))
    assert hashed == ["model.bin"]
    assert changed.version != first.version
    assert LocalSource(state_dir=state).resolve(parse_ref(str(model))).version == changed.version
    assert hashed == ["model.bin"]  # the memo file was brought up to date


def test_an_unwritable_state_dir_only_costs_rehashing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tmp_path / "model"
    write_tree(model, {"a": b"1"})
    (tmp_path / "state").write_text("a file where the state directory should be")
    resolved = LocalSource(state_dir=tmp_path / "state").resolve(parse_ref(str(model)))
    assert resolved.files is not None
    assert "could not save the hash memo" in caplog.text
