"""The conformance suite every source passes.

Subclass :class:`SourceConformanceTests` in a test module and provide the fixtures:

- ``source``: a fresh source instance (function scope: one test closes it).
- ``publish(name, files, alias) -> ModelRef``: store ``files`` (relative path -> bytes) as
  model ``name`` and return the *moving* reference that follows ``alias`` (publishing
  again with the same name and alias moves it).
- ``missing_ref``: a reference to a model that does not exist.
- ``unavailable_source`` (remote sources only): a source of the same kind whose backend
  cannot be reached (a closed port).

Example:
    >>> class TestMySource(SourceConformanceTests):
    ...     @pytest.fixture
    ...     def source(self): ...

Tests skip on declared capabilities, never on the source's type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from model_loader._io import safe_relpath
from model_loader._types import ModelRef, ResolvedModel
from model_loader.errors import ModelNotFoundError, SourceUnavailableError, StaleResolutionError
from model_loader.protocol import ModelSource, SourceCapabilities, SupportsVersionHistory

__all__ = ["Publish", "SourceConformanceTests", "read_tree", "sample_files"]

Publish = Callable[[str, Mapping[str, bytes], str], ModelRef]


def sample_files(seed: str = "a") -> dict[str, bytes]:
    """A small model: a nested path, a binary blob, an empty file."""
    blob = hashlib.sha256(seed.encode()).digest() * (300_000 // 32)
    return {
        "MLmodel": f"flavors: {{}}\nseed: {seed}\n".encode(),
        "model.bin": blob,
        "empty.txt": b"",
        "nested/dir/config.json": f'{{"seed": "{seed}"}}'.encode(),
    }


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` as relative POSIX path -> bytes."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = Path(dirpath, name)
            out[full.relative_to(root).as_posix()] = full.read_bytes()
    return out


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class SourceConformanceTests:
    """Behaviour every :class:`~model_loader.protocol.ModelSource` must show."""

    @pytest.fixture
    def unavailable_source(self) -> ModelSource | None:
        return None  # remote sources must override this; the test below fails if they do not

    def test_implements_protocol(self, source: ModelSource) -> None:
        assert isinstance(source, ModelSource)
        assert isinstance(type(source).scheme, str)
        assert type(source).scheme
        assert isinstance(type(source).capabilities, SourceCapabilities)

    def test_identity_is_stable_and_has_no_credentials(self, source: ModelSource) -> None:
        ident = source.identity
        assert isinstance(ident, str)
        assert ident
        assert source.identity == ident
        for secret_marker in ("@", "password", "token", "secret"):
            assert secret_marker not in ident.lower()

    def test_resolve_is_deterministic_frozen_and_hashable(self, source: ModelSource, publish: Publish) -> None:
        ref = publish(_unique("det"), sample_files("det"), "prod")
        first, second = source.resolve(ref), source.resolve(ref)
        assert first == second
        assert hash(first) == hash(second)
        assert first.version
        assert first.source_id == source.identity
        with pytest.raises(dataclasses.FrozenInstanceError):
            first.version = "other"  # type: ignore[misc]

    def test_missing_model_raises_model_not_found(self, source: ModelSource, missing_ref: ModelRef) -> None:
        with pytest.raises(ModelNotFoundError):
            source.resolve(missing_ref)

    def test_fetch_writes_exact_files_sizes_and_hashes(
        self, source: ModelSource, publish: Publish, tmp_path: Path
    ) -> None:
        files = sample_files("exact")
        resolved = source.resolve(publish(_unique("exact"), files, "prod"))
        dest = tmp_path / "dest"
        dest.mkdir()
        manifest = source.fetch(resolved, dest)
        assert read_tree(dest) == files
        assert {e.path: e.size for e in manifest.files} == {p: len(b) for p, b in files.items()}
        assert {e.path: e.sha256 for e in manifest.files} == {
            p: hashlib.sha256(b).hexdigest() for p, b in files.items()
        }
        if resolved.files is not None:
            assert {e.path: e.size for e in resolved.files} == {p: len(b) for p, b in files.items()}

    def test_manifest_paths_are_safe_and_relative(self, source: ModelSource, publish: Publish, tmp_path: Path) -> None:
        resolved = source.resolve(publish(_unique("paths"), sample_files("paths"), "prod"))
        manifest = source.fetch(resolved, tmp_path)
        for entry in manifest.files:
            assert safe_relpath(entry.path) == entry.path
            assert (tmp_path / entry.path).resolve().is_relative_to(tmp_path.resolve())

    def test_republish_gives_new_version_and_old_resolution_never_serves_new_bytes(
        self, source: ModelSource, publish: Publish, tmp_path: Path
    ) -> None:
        name = _unique("move")
        old_files, new_files = sample_files("old"), sample_files("new")
        ref = publish(name, old_files, "prod")
        old = source.resolve(ref)
        ref_again = publish(name, new_files, "prod")
        new = source.resolve(ref_again)
        assert new.version != old.version
        dest = tmp_path / "old"
        dest.mkdir()
        if type(source).capabilities.immutable_versions:
            source.fetch(old, dest)
            assert read_tree(dest) == old_files
        else:
            try:
                source.fetch(old, dest)
            except StaleResolutionError:
                return
            assert read_tree(dest) == old_files

    def test_unreachable_backend_raises_source_unavailable(
        self, source: ModelSource, unavailable_source: ModelSource | None, publish: Publish
    ) -> None:
        if not type(source).capabilities.remote:
            pytest.skip("a local source has no backend to lose")
        assert unavailable_source is not None, "a remote source's tests must provide unavailable_source"
        ref = publish(_unique("down"), sample_files("down"), "prod")
        with pytest.raises(SourceUnavailableError):
            unavailable_source.resolve(ref)

    def test_previous_versions_newest_first(self, source: ModelSource, publish: Publish) -> None:
        if not type(source).capabilities.version_history:
            pytest.skip("the source declares no version history")
        assert isinstance(source, SupportsVersionHistory)
        name = _unique("hist")
        publish(name, sample_files("v1"), "prod")
        publish(name, sample_files("v2"), "prod")
        latest = source.resolve(publish(name, sample_files("v3"), "prod"))
        earlier = source.previous_versions(latest, 5)
        assert len(earlier) == 2
        assert all(isinstance(r, ResolvedModel) for r in earlier)
        assert len({r.version for r in earlier} | {latest.version}) == 3

    def test_close_is_idempotent(self, source: ModelSource) -> None:
        source.close()
        source.close()
