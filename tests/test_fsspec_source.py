"""The fsspec source on fsspec's memory filesystem and on its real HTTP filesystem against
a local HTTP server (tests/_http_store.py): conformance, pins, checksums, faults, the
deadline, and loads through ResilientLoader."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

import fsspec
import pytest

from _http_store import HttpStore
from _s3_server import free_port
from helpers import read_tree, wait_for
from model_loader import CacheConfig, LoaderConfig, ResilientLoader, RetryPolicy, registry
from model_loader._deadline import Deadline, FetchContext
from model_loader._types import FileEntry, ModelRef
from model_loader._uri import parse_ref
from model_loader.errors import (
    AccessDeniedError,
    AllSourcesFailedError,
    IntegrityError,
    InvalidReferenceError,
    InvalidResponseError,
    MissingDependencyError,
    ModelNotFoundError,
    SourceError,
    SourceTimeoutError,
    SourceUnavailableError,
    StaleResolutionError,
)
from model_loader.protocol import SourceSettings
from model_loader.sources import _fsspec_backends as backends
from model_loader.sources._fsspec_errors import redact
from model_loader.sources._fsspec_filesystem import identity as _identity
from model_loader.sources.fsspec import FsspecSource, GcsSource, HttpSource, MemoryFsSource
from model_loader.testing.conformance import SourceConformanceTests, sample_files

MiB = 1024 * 1024
SLACK = 3.0  # seconds a deadline may be overrun by (one chunk, thread wake-ups on 2 busy cores)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ref(uri: str) -> ModelRef:
    return parse_ref(uri, check_scheme=False)  # the schemes are registered by pyproject entry points


def memory_publish(root: str, files: Mapping[str, bytes]) -> ModelRef:
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.pipe({f"{root}/{rel}": data for rel, data in files.items()})
    return ref(f"memory:/{root}/")


def fetch_to(source: FsspecSource, resolved: object, dest: Path) -> dict[str, bytes]:
    dest.mkdir(parents=True, exist_ok=True)
    manifest = source.fetch(resolved, dest)  # type: ignore[arg-type]
    tree = read_tree(dest)
    assert {e.path: e.sha256 for e in manifest.files} == {p: sha(b) for p, b in tree.items()}
    return tree


def fsspec_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("model-loader-fsspec")]


@pytest.fixture
def no_leaked_threads() -> Iterator[None]:
    yield
    wait_for(lambda: not fsspec_threads(), timeout=10, what="download threads to exit")


# -- stores -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpStore]:
    with HttpStore(tmp_path_factory.mktemp("http-store")) as server:
        yield server


@pytest.fixture
def http_store(tmp_path: Path) -> Iterator[HttpStore]:
    """A store of its own (faults, checksums, stops) for one test."""
    server = HttpStore(tmp_path / "served", checksums=True)
    (tmp_path / "served").mkdir()
    with server:
        yield server


@pytest.fixture
def http_source() -> Iterator[HttpSource]:
    src = HttpSource(connect_timeout=2.0, read_timeout=10.0)
    yield src
    src.close()


# -- the conformance suite ----------------------------------------------------------------


class TestMemoryConformance(SourceConformanceTests):
    @pytest.fixture
    def source(self) -> MemoryFsSource:
        return MemoryFsSource()

    @pytest.fixture
    def publish(self) -> Callable[[str, Mapping[str, bytes], str], ModelRef]:
        run = uuid.uuid4().hex[:8]
        return lambda name, files, alias: memory_publish(f"/conformance-{run}/{name}/{alias}", files)

    @pytest.fixture
    def missing_ref(self) -> ModelRef:
        return ref(f"memory://no-such-model-{uuid.uuid4().hex[:8]}/")


class TestHttpConformance(SourceConformanceTests):
    @pytest.fixture
    def source(self) -> Iterator[HttpSource]:
        src = HttpSource()
        yield src
        src.close()

    @pytest.fixture
    def publish(self, store: HttpStore) -> Callable[[str, Mapping[str, bytes], str], ModelRef]:
        return lambda name, files, alias: ref(store.publish(f"{name}/{alias}", files))

    @pytest.fixture
    def missing_ref(self, store: HttpStore) -> ModelRef:
        return ref(store.url + "no-such-model/")

    @pytest.fixture
    def unavailable_source(self) -> Iterator[HttpSource]:
        # the server is up, but the only way to it (a proxy) is a closed port
        src = HttpSource(connect_timeout=1.0, storage_options={"proxy": f"http://127.0.0.1:{free_port()}"})
        yield src
        src.close()


# -- import cost and construction ---------------------------------------------------------


def test_import_model_loader_does_not_import_fsspec() -> None:
    code = "import sys, model_loader; print('fsspec' in sys.modules, 'aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_without_fsspec_the_import_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['fsspec'] = None\n"
        "from model_loader.errors import MissingDependencyError\n"
        "try:\n    import model_loader.sources.fsspec\n"
        "except MissingDependencyError as exc:\n    print(exc.extra, '|', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("fsspec |")
    assert "pip install 'model-loader[fsspec]'" in out


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_missing_backend_package_is_named() -> None:
    with pytest.raises(MissingDependencyError, match="gcsfs"):
        GcsSource()


def test_from_settings_builds_the_scheme_s_source_and_the_base_class_refuses() -> None:
    settings = SourceSettings(read_timeout=7.0, max_concurrency=3, exclude=("*.tmp",))
    src = MemoryFsSource.from_settings(settings)
    assert isinstance(src, MemoryFsSource)
    assert src.protocols == ("memory",)
    with pytest.raises(TypeError, match="protocol"):
        FsspecSource.from_settings(settings)
    assert FsspecSource(protocol="memory").identity == "fsspec+memory"


def test_the_registry_builds_a_source_for_the_scheme(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # what the pyproject entry point "memory = model_loader.sources.fsspec:MemoryFsSource" does
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_discovered", registry._discovered)  # discovery fills the copy: undo both
    registry.register_source("memory", "model_loader.sources.fsspec:MemoryFsSource", clobber=True)
    files = {"model.bin": b"reg"}
    model = memory_publish(f"/registry-{uuid.uuid4().hex[:8]}", files)
    src = registry.create_source(parse_ref(model.uri), SourceSettings(max_concurrency=2))
    assert isinstance(src, MemoryFsSource)
    with ResilientLoader(model.uri, config=loader_config(tmp_path / "cache")) as loader:
        assert read_tree(loader.fetch().path) == files


def test_identity_names_the_endpoint_or_account_and_never_a_credential() -> None:
    secret = "c2VjcmV0LWtleQ=="
    conn = f"DefaultEndpointsProtocol=https;AccountName=models;AccountKey={secret};EndpointSuffix=core.windows.net"
    assert _identity("az", "azure", {"connection_string": conn}) == "fsspec+az+models"
    assert _identity("gs", "gcs", {"endpoint_url": "http://user:pw@127.0.0.1:4443/", "token": secret}) == (
        "fsspec+gs+http://127.0.0.1:4443"
    )
    assert _identity("hf", "hf", {"token": secret}) == "fsspec+hf"
    assert HttpSource(storage_options={"headers": {"Authorization": "Bearer " + secret}}).identity == "fsspec+http"


def test_references_it_refuses(http_source: HttpSource) -> None:
    with pytest.raises(InvalidReferenceError, match="unknown parameter"):
        http_source.resolve(ref("http://127.0.0.1:1/m/?versionId=3"))
    with pytest.raises(InvalidReferenceError, match="storage_options") as info:
        http_source.resolve(ref("http://user:hunter2@127.0.0.1:1/m/"))
    assert "hunter2" not in str(info.value)
    with pytest.raises(InvalidReferenceError, match="memory://"):
        MemoryFsSource().resolve(ref("http://127.0.0.1:1/m/"))


# -- memory: listing, filters, safety, stale ----------------------------------------------


def test_a_key_that_escapes_the_model_directory_is_refused(tmp_path: Path) -> None:
    root = f"/escape-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("memory").pipe({f"{root}/m/ok.bin": b"ok", f"{root}/m/../../x": b"evil"})
    with pytest.raises(IntegrityError, match="escapes the model directory"):
        MemoryFsSource().resolve(ref(f"memory:/{root}/m/"))


def test_include_and_exclude_globs(tmp_path: Path) -> None:
    files = {"model.bin": b"w", "ckpt/step1.bin": b"c", "README.md": b"r"}
    model = memory_publish(f"/globs-{uuid.uuid4().hex[:8]}", files)
    resolved = MemoryFsSource(exclude=("ckpt/*",)).resolve(model)
    assert [f.path for f in resolved.files or ()] == ["README.md", "model.bin"]
    resolved = MemoryFsSource().resolve(ref(model.uri + "?include=*.bin&exclude=ckpt/*"))
    assert [f.path for f in resolved.files or ()] == ["model.bin"]
    with pytest.raises(ModelNotFoundError, match="none of the 3 files"):
        MemoryFsSource(include=("*.onnx",)).resolve(model)


def test_a_single_file_model(tmp_path: Path) -> None:
    model = memory_publish(f"/single-{uuid.uuid4().hex[:8]}", {"model.onnx": b"onnx"})
    src = MemoryFsSource()
    resolved = src.resolve(ref(model.uri + "model.onnx"))
    assert resolved.meta["kind"] == "file"
    assert fetch_to(src, resolved, tmp_path / "d") == {"model.onnx": b"onnx"}


def test_a_file_rewritten_after_resolve_is_stale_on_memory(tmp_path: Path) -> None:
    root = f"/stale-{uuid.uuid4().hex[:8]}"
    model = memory_publish(root, {"a.bin": b"old"})
    src = MemoryFsSource()
    resolved = src.resolve(model)
    assert resolved.meta["pin"] == "stat"
    fsspec.filesystem("memory").pipe({f"{root}/a.bin": b"new"})
    with pytest.raises(StaleResolutionError):
        fetch_to(src, resolved, tmp_path / "d")
    assert not (tmp_path / "d" / "a.bin").exists()  # no partial file left behind


def test_a_closed_source_refuses_work() -> None:
    src = MemoryFsSource()
    src.close()
    with pytest.raises(SourceError, match="closed"):
        src.resolve(ref("memory://anything/"))


# -- HTTP: pins, checksums, resume --------------------------------------------------------


def test_http_pins_by_etag_and_checks_content_md5(
    http_store: HttpStore, http_source: HttpSource, tmp_path: Path
) -> None:
    files = sample_files("md5") | {"with space/é.bin": b"unicode"}
    resolved = http_source.resolve(ref(http_store.publish("pinned", files)))
    assert resolved.meta["pin"] == "etag"
    assert resolved.meta["checksum"] == "md5"
    assert resolved.meta["immutable"] == "false"
    dest = tmp_path / "d"
    dest.mkdir()
    manifest = http_source.fetch(resolved, dest)
    assert read_tree(dest) == files
    assert {e.verified for e in manifest.files} == {"md5"}
    gets = [r for r in http_store.requests if r.method == "GET" and not r.path.endswith("/")]
    assert gets
    assert all(r.headers.get("If-Match", "").startswith('"') for r in gets)


def test_http_altered_bytes_are_refused_when_the_server_publishes_a_checksum(
    http_store: HttpStore, http_source: HttpSource, tmp_path: Path
) -> None:
    resolved = http_source.resolve(ref(http_store.publish("altered", {"model.bin": b"weights" * 1000})))
    http_store.fault("corrupt", "model.bin", method="GET")
    with pytest.raises(IntegrityError, match="md5"):
        fetch_to(http_source, resolved, tmp_path / "d")


def test_http_without_etag_pins_last_modified_and_checks_only_sizes(tmp_path: Path) -> None:
    (tmp_path / "served").mkdir()
    with HttpStore(tmp_path / "served", etags=False) as server:
        src = HttpSource()
        resolved = src.resolve(ref(server.publish("lm", {"a.bin": b"a" * 100})))
        assert resolved.meta["pin"] == "last-modified"
        assert resolved.meta["checksum"] == "none"
        dest = tmp_path / "d"
        dest.mkdir()
        assert {e.verified for e in src.fetch(resolved, dest).files} == {None}
        assert server.requests[-1].headers.get("If-Unmodified-Since")
        src.close()


def test_http_republished_file_is_stale(http_store: HttpStore, http_source: HttpSource, tmp_path: Path) -> None:
    uri = http_store.publish("moved", {"a.bin": b"one"})
    resolved = http_source.resolve(ref(uri))
    http_store.publish("moved", {"a.bin": b"two"})
    with pytest.raises(StaleResolutionError):
        fetch_to(http_source, resolved, tmp_path / "d")


def test_http_fetch_resumes_with_only_the_missing_files(
    http_store: HttpStore, http_source: HttpSource, tmp_path: Path
) -> None:
    files = {"done.bin": b"d" * 10, "todo.bin": b"t" * 10}
    resolved = http_source.resolve(ref(http_store.publish("resume", files)))
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "done.bin").write_bytes(files["done.bin"])
    done = FileEntry("done.bin", 10, sha(files["done.bin"]), None, "md5")
    reported: list[FileEntry] = []
    ctx = FetchContext(completed=MappingProxyType({"done.bin": done}), file_done=reported.append)
    with ctx.applied():
        manifest = http_source.fetch(resolved, dest)
    assert [e.path for e in reported] == ["todo.bin"]
    assert {e.path for e in manifest.files} == {"done.bin", "todo.bin"}
    assert not [r for r in http_store.requests if r.method == "GET" and r.path.endswith("done.bin")]


def test_http_files_download_in_parallel(http_store: HttpStore, tmp_path: Path, no_leaked_threads: None) -> None:
    files = {f"part-{i}.bin": bytes([i]) * 4096 for i in range(4)}
    resolved = HttpSource().resolve(ref(http_store.publish("parallel", files)))
    for i in range(4):  # slow bodies, so that parallel downloads overlap on the server
        http_store.fault("trickle", f"part-{i}.bin", method="GET", piece=1024, interval=0.1)
    http_store.peak_in_flight = 0
    src = HttpSource(max_concurrency=4)
    assert fetch_to(src, resolved, tmp_path / "d") == files
    assert http_store.peak_in_flight >= 2
    src.close()
    http_store.peak_in_flight = 0
    serial = HttpSource(max_concurrency=1)
    assert fetch_to(serial, resolved, tmp_path / "serial") == files
    assert http_store.peak_in_flight == 1
    serial.close()


# -- HTTP: faults and the deadline --------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, SourceUnavailableError), (503, SourceUnavailableError), (403, AccessDeniedError), (401, AccessDeniedError)],
)
def test_http_status_of_a_head_is_not_a_missing_file(
    http_store: HttpStore, http_source: HttpSource, status: int, error: type[Exception]
) -> None:
    # fsspec's HTTP info turns every failure into FileNotFoundError: the cause decides
    uri = http_store.publish(f"status-{status}", {"a.bin": b"a"})
    http_store.fault("status", "a.bin", method="HEAD", status=status)
    http_store.fault("status", "a.bin", method="GET", status=status)
    with pytest.raises(error) as info:
        http_source.resolve(ref(uri))
    assert not isinstance(info.value, ModelNotFoundError)


def test_http_listing_errors(http_store: HttpStore, http_source: HttpSource) -> None:
    uri = http_store.publish("listing", {"a.bin": b"a"})
    http_store.fault("status", "/listing/", method="GET", status=500, times=1)
    with pytest.raises(SourceUnavailableError, match="HTTP 500"):
        http_source.resolve(ref(uri))
    with pytest.raises(ModelNotFoundError):
        http_source.resolve(ref(http_store.url + "listing/absent.bin"))


def test_http_reset_mid_body_is_transient_and_leaves_no_partial_file(
    http_store: HttpStore, http_source: HttpSource, tmp_path: Path, no_leaked_threads: None
) -> None:
    resolved = http_source.resolve(ref(http_store.publish("reset", {"a.bin": b"x" * 200_000})))
    http_store.fault("reset", "a.bin", method="GET", after=50_000, times=1)
    with pytest.raises(SourceUnavailableError):
        fetch_to(http_source, resolved, tmp_path / "d")
    assert not (tmp_path / "d" / "a.bin").exists()
    assert fetch_to(http_source, resolved, tmp_path / "d") == {"a.bin": b"x" * 200_000}  # the next try succeeds


def test_a_trickling_server_is_cut_at_the_deadline(
    http_store: HttpStore, http_source: HttpSource, tmp_path: Path, no_leaked_threads: None
) -> None:
    resolved = http_source.resolve(ref(http_store.publish("trickle", {"a.bin": b"t" * 100_000})))
    http_store.fault("trickle", "a.bin", method="GET", piece=10, interval=0.02)  # 500 B/s: 200 s for the file
    budget = 1.5
    started = time.monotonic()
    with Deadline(budget).applied(), pytest.raises(SourceTimeoutError):
        fetch_to(http_source, resolved, tmp_path / "d")
    elapsed = time.monotonic() - started
    assert elapsed < budget + SLACK, f"a {budget}s budget took {elapsed:.2f}s"


@pytest.mark.parametrize("what", ["index", "head", "get"])
def test_a_stalled_server_is_cut_at_the_deadline(
    http_store: HttpStore, http_source: HttpSource, tmp_path: Path, what: str
) -> None:
    uri = http_store.publish(f"stall-{what}", {"a.bin": b"s" * 1000})
    resolved = http_source.resolve(ref(uri)) if what == "get" else None
    path, method = {"index": (f"/stall-{what}/", "GET"), "head": ("a.bin", "HEAD"), "get": ("a.bin", "GET")}[what]
    http_store.fault("stall", path, method=method)

    def work() -> object:
        return http_source.resolve(ref(uri)) if resolved is None else fetch_to(http_source, resolved, tmp_path / "d")

    budget = 1.0
    started = time.monotonic()
    with Deadline(budget).applied(), pytest.raises(SourceTimeoutError):
        work()
    assert time.monotonic() - started < budget + SLACK


# -- through ResilientLoader --------------------------------------------------------------


def loader_config(cache: Path, *, deadline: float = 60.0) -> LoaderConfig:
    retry = RetryPolicy(attempts=2, initial_backoff=0.0, max_backoff=0.0, jitter=0.0, source_deadline=30.0)
    return LoaderConfig(cache=CacheConfig(dir=cache), retry=retry, deadline=deadline, resolve_timeout=5.0)


def test_loads_cold_warm_refused_and_degraded(http_store: HttpStore, tmp_path: Path) -> None:
    files = sample_files("e2e")
    uri = http_store.publish("e2e", files)
    cache = tmp_path / "cache"
    src = HttpSource(connect_timeout=1.0)
    with ResilientLoader([(src, uri)], config=loader_config(cache), sleep=lambda s: None) as loader:
        cold = loader.fetch()
        assert not cold.from_cache
        assert not cold.degraded
        assert cold.verified  # every file checked against Content-MD5
        assert read_tree(cold.path) == files

        def file_gets() -> int:
            return len([r for r in http_store.requests if r.method == "GET" and not r.path.endswith("/")])

        gets = file_gets()
        warm = loader.fetch()
        assert warm.from_cache
        assert warm.version == cold.version
        assert file_gets() == gets  # index pages and HEADs only

    # a new version whose bytes arrive altered: refused, the cache keeps only the good one
    http_store.publish("e2e", sample_files("e2e-v2"))
    http_store.fault("corrupt", "model.bin", method="GET")
    with ResilientLoader([(src, uri)], config=loader_config(cache), sleep=lambda s: None) as loader:
        served = loader.fetch()
    assert served.degraded  # the last-known-good version, flagged
    assert served.version == cold.version
    assert read_tree(served.path) == files
    assert any("IntegrityError" in err for _, err in served.failures)
    http_store.clear_faults()

    # the server goes away: last-known-good, degraded
    http_store.stop()
    with ResilientLoader([(src, uri)], config=loader_config(cache, deadline=20.0), sleep=lambda s: None) as loader:
        down = loader.fetch()
    assert down.degraded
    assert down.version == cold.version
    assert read_tree(down.path) == files
    src.close()


def test_altered_bytes_with_nothing_cached_fail_the_load(http_store: HttpStore, tmp_path: Path) -> None:
    uri = http_store.publish("altered-cold", {"model.bin": b"m" * 5000})
    http_store.fault("corrupt", "model.bin", method="GET")
    cache = tmp_path / "cache"
    src = HttpSource()
    with (
        ResilientLoader([(src, uri)], config=loader_config(cache), sleep=lambda s: None) as loader,
        pytest.raises(AllSourcesFailedError) as info,
    ):
        loader.fetch()
    assert isinstance(info.value.failures[0][1], IntegrityError)
    assert not list((cache / "entries").glob("*")) if (cache / "entries").exists() else True
    src.close()


def test_memory_source_through_the_loader(tmp_path: Path) -> None:
    files = sample_files("mem")
    model = memory_publish(f"/loader-{uuid.uuid4().hex[:8]}", files)
    with ResilientLoader([(MemoryFsSource(), model.uri)], config=loader_config(tmp_path / "c")) as loader:
        result = loader.fetch()
        assert read_tree(result.path) == files
        assert not result.verified  # memory publishes no checksum: sizes only
        assert loader.fetch().from_cache


# -- parsing what backends say -------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_gcs_info_pins_the_generation_and_its_md5() -> None:
    md5 = hashlib.md5(b"x").digest()
    info = {"name": "b/k", "size": 1, "generation": "1712345678901234", "md5Hash": b64(md5), "etag": "CJ+2"}
    pin = backends.dialect_for(("gs", "gcs")).pin(info, "t")
    assert (pin.kind, pin.value, pin.md5, pin.checksum) == ("generation", "1712345678901234", md5.hex(), "md5")
    composite = {"name": "b/k", "size": 1, "generation": "7", "crc32c": "AAAAAA=="}
    assert backends.dialect_for(("gs",)).pin(composite, "t").checksum is None
    with pytest.raises(InvalidResponseError):
        backends.dialect_for(("gs",)).pin({"name": "b/k", "generation": "12; DROP"}, "t")


def test_azure_info_pins_the_version_or_the_etag() -> None:
    md5 = hashlib.md5(b"x").digest()
    dialect = backends.dialect_for(("abfs", "az", "abfss"))
    versioned = {
        "etag": '"0x8D"',
        "version_id": "2024-01-01T00:00:00.0000000Z",
        "content_settings": {"content_md5": bytearray(md5)},
    }
    pin = dialect.pin(versioned, "t")
    assert (pin.kind, pin.md5) == ("version_id", md5.hex())
    assert dialect.read_path("c/k", pin) == "c/k?versionid=2024-01-01T00:00:00.0000000Z"
    plain = dialect.pin({"etag": '"0x8D"', "content_settings": {"content_md5": None}}, "t")
    assert (plain.kind, plain.md5, dialect.pinned_read(plain)) == ("etag", None, False)
    with pytest.raises(InvalidResponseError):
        dialect.pin({"etag": '"0x8D"', "content_settings": {"content_md5": b"short"}}, "t")


def test_hf_info_gives_lfs_sha256_or_the_git_blob_id() -> None:
    dialect = backends.dialect_for(("hf",))
    lfs = dialect.pin({"lfs": {"sha256": "a" * 64, "size": 5}, "blob_id": "b" * 40}, "t")
    assert (lfs.sha256, lfs.git_sha1, lfs.checksum) == ("a" * 64, None, "sha256")
    small = dialect.pin({"lfs": None, "blob_id": "b" * 40}, "t")
    assert (small.git_sha1, small.checksum) == ("b" * 40, "git-sha1")
    with pytest.raises(InvalidResponseError):
        dialect.pin({"lfs": {"sha256": "not hex"}}, "t")


@pytest.mark.parametrize(
    "entry",
    [["not", "a", "mapping"], {"name": ""}, {"name": "a", "size": -1}, {"name": "a", "size": True}, {"name": 3}],
)
def test_malformed_listing_entries_are_invalid_responses(entry: object) -> None:
    with pytest.raises(InvalidResponseError):
        backends.parse_entry(entry, "t")


def test_messages_never_carry_signed_urls_or_user_info() -> None:
    text = "GET https://user:pw@cdn.example/x.bin?X-Amz-Signature=abc&token=t failed"
    out = redact(text)
    assert "pw" not in out
    assert "Signature" not in out
    assert "cdn.example/x.bin" in out
