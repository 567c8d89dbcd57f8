"""Faults injected for real between boto3 and a moto server (see ``_fault_proxy``).

First the S3 source alone: every fault becomes a typed error or is absorbed by re-issuing
the request (resuming a body at the byte it reached); a file that keeps failing is given
up alone while the others complete; a store that fails everything is not hammered. Then
through :class:`ResilientLoader` with default settings: every load succeeds at a 30%
fault rate, a body cut short never reaches the cache, an overwrite mid-download never
mixes versions.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from _fault_proxy import FaultProxy, Seen
from _s3_server import make_bucket, put_files
from helpers import Sleeps, read_tree, wait_for
from model_loader import CacheConfig, LoaderConfig, ResilientLoader, RetryPolicy
from model_loader._deadline import FetchContext
from model_loader._types import FileEntry
from model_loader._uri import parse_ref
from model_loader.errors import (
    AccessDeniedError,
    AllSourcesFailedError,
    SourceTimeoutError,
    SourceUnavailableError,
    StaleResolutionError,
)
from model_loader.sources.s3 import S3Source, VersionedS3Source

KiB = 1024
MiB = 1024 * KiB
READ_TIMEOUT = 0.4
FAST_FAULTS = ("500", "503", "reset", "truncate")


@pytest.fixture(scope="module")
def bucket(s3_client: Any) -> str:
    return make_bucket(s3_client, "faults")


@pytest.fixture(scope="module")
def versioned_bucket(s3_client: Any) -> str:
    return make_bucket(s3_client, "faults-ver", versioned=True)


def model_files(seed: str) -> dict[str, bytes]:
    """Two small files and one large enough to be fetched in ranged parts (part_size 64 KiB)."""
    return {
        "MLmodel": f"seed: {seed}\n".encode(),
        "weights/big.bin": seed.encode() * (300 * KiB // len(seed)) + os.urandom(77),
        "config.json": f'{{"seed": "{seed}"}}'.encode(),
    }


def proxied(proxy: FaultProxy, cls: type[S3Source] = S3Source, **kwargs: Any) -> S3Source:
    """A source shaped for small test models: 64 KiB parts split eagerly, short read timeout, no backoff waits."""
    options: dict[str, Any] = {
        "endpoint_url": proxy.url,
        "connect_timeout": 1.0,
        "read_timeout": READ_TIMEOUT,
        "part_size": 64 * KiB,
        "range_split": "eager",
        "max_concurrency": 4,
        "request_backoff": 0.0,
    }
    options.update(kwargs)
    return cls(**options)


def is_list(seen: Seen) -> bool:
    return seen.method == "GET" and "list-type=2" in seen.query


def is_object_get(seen: Seen) -> bool:
    return seen.method == "GET" and "list-type" not in seen.query


@pytest.fixture
def no_leaked_threads() -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield

    def settled() -> bool:
        return not [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("model-loader-s3")]

    wait_for(settled, timeout=10, what="download threads to exit")


# -- the source alone ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAST_FAULTS)
def test_a_fast_fault_while_listing_is_re_issued(
    fault_proxy: FaultProxy, s3_client: Any, bucket: str, kind: str
) -> None:
    put_files(s3_client, bucket, f"list-{kind}/", model_files("l"))
    src = proxied(fault_proxy)
    fault_proxy.inject(kind, count=2, match=is_list)
    resolved = src.resolve(parse_ref(f"s3://{bucket}/list-{kind}/"))
    assert resolved.files is not None
    assert len(resolved.files) == 3
    assert fault_proxy.faults[kind] == 2
    assert len([s for s in fault_proxy.requests("GET") if is_list(s)]) == 3
    src.close()


@pytest.mark.parametrize("kind", ["500", "503", "reset", "truncate", "stall", "stall_body"])
def test_a_fault_that_persists_while_listing_is_a_typed_transient_error(
    fault_proxy: FaultProxy, s3_client: Any, bucket: str, kind: str
) -> None:
    put_files(s3_client, bucket, f"list-persist-{kind}/", model_files("l"))
    src = proxied(fault_proxy)
    fault_proxy.inject(kind, count=100, match=is_list)
    expected = SourceTimeoutError if kind.startswith("stall") else SourceUnavailableError
    with pytest.raises(expected) as info:
        src.resolve(parse_ref(f"s3://{bucket}/list-persist-{kind}/"))
    if kind == "503":
        assert "SlowDown" in str(info.value)
    assert fault_proxy.faults[kind] == (1 if kind.startswith("stall") else 5)  # timeouts are left to the loader
    fault_proxy.clear()
    assert src.resolve(parse_ref(f"s3://{bucket}/list-persist-{kind}/")).files is not None  # the pool recovered
    src.close()


@pytest.mark.parametrize("target", ["MLmodel", "weights/big.bin"])
@pytest.mark.parametrize("kind", ["500", "503", "reset", "truncate"])
def test_fast_transient_faults_during_fetch_are_resumed(
    fault_proxy: FaultProxy,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
    kind: str,
    target: str,
    no_leaked_threads: None,
) -> None:
    files = model_files(kind)
    prefix = f"resume-{kind}-{target.replace('/', '-')}/"
    put_files(s3_client, bucket, prefix, files)
    src = proxied(fault_proxy)
    resolved = src.resolve(parse_ref(f"s3://{bucket}/{prefix}"))
    fault_proxy.inject(kind, count=2, match=lambda s: is_object_get(s) and s.path.endswith("/" + target))
    manifest = src.fetch(resolved, tmp_path)
    assert read_tree(tmp_path) == files
    assert {e.path for e in manifest.files} == set(files)
    assert fault_proxy.faults[kind] == 2
    if kind == "truncate" and target == "weights/big.bin":  # resumed from the byte it reached, not from 0
        assert any(s.range and not s.range.startswith("bytes=0-") for s in fault_proxy.requests("GET"))
    src.close()


@pytest.mark.parametrize("target", ["MLmodel", "weights/big.bin"])
@pytest.mark.parametrize("kind", ["500", "503", "reset", "truncate", "stall", "stall_body"])
def test_a_fault_that_persists_fails_the_fetch_with_a_typed_error(
    fault_proxy: FaultProxy,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
    kind: str,
    target: str,
    no_leaked_threads: None,
) -> None:
    prefix = f"persist-{kind}-{target.replace('/', '-')}/"
    put_files(s3_client, bucket, prefix, model_files(kind))
    src = proxied(fault_proxy, range_split="off")  # one request at a time per file
    resolved = src.resolve(parse_ref(f"s3://{bucket}/{prefix}"))
    fault_proxy.inject(kind, count=100, match=lambda s: is_object_get(s) and s.path.endswith("/" + target))
    expected = SourceTimeoutError if kind.startswith("stall") else SourceUnavailableError
    done: list[FileEntry] = []
    with FetchContext(file_done=done.append).applied(), pytest.raises(expected):
        src.fetch(resolved, tmp_path)
    tries = fault_proxy.faults[kind]
    assert tries == (1 if kind.startswith("stall") else 5)  # default request_attempts; timeouts are the loader's
    if not kind.startswith("stall"):  # given up alone: the other two files completed and were reported
        assert sorted(e.path for e in done) == sorted(p for p in model_files(kind) if p != target)
        assert all(e.verified for e in done)
    src.close()


def test_a_fatal_error_cuts_the_other_transfers_at_once(
    fault_proxy: FaultProxy, s3_client: Any, bucket: str, tmp_path: Path, no_leaked_threads: None
) -> None:
    put_files(s3_client, bucket, "cut-all/", {"stalls.bin": b"s" * 1000, "denied.bin": b"d" * 2000})
    src = S3Source(endpoint_url=fault_proxy.url)  # read_timeout 60 s, no deadline
    resolved = src.resolve(parse_ref(f"s3://{bucket}/cut-all/"))
    fault_proxy.stall_seconds = 60
    stalled = threading.Event()

    def stall_first(seen: Seen) -> bool:
        if is_object_get(seen) and seen.path.endswith("/stalls.bin"):
            stalled.set()
            return True
        return False

    def denied(seen: Seen) -> bool:
        return is_object_get(seen) and seen.path.endswith("/denied.bin")

    fault_proxy.inject("stall_body", count=1, match=stall_first)
    fault_proxy.inject("403", count=1, match=lambda s: denied(s) and stalled.is_set())
    fault_proxy.inject("500", count=100, match=lambda s: denied(s) and not stalled.is_set())  # re-issued until then
    started = time.monotonic()
    with pytest.raises(AccessDeniedError):
        src.fetch(resolved, tmp_path)
    assert time.monotonic() - started < 10  # not the 60 s read timeout of the stalled transfer
    src.close()


def test_only_the_missing_files_are_fetched_again(
    fault_proxy: FaultProxy, s3_client: Any, bucket: str, tmp_path: Path, no_leaked_threads: None
) -> None:
    files = {f"shard-{i:02d}.bin": os.urandom(3 * KiB + i) for i in range(12)}
    put_files(s3_client, bucket, "resume/", files)
    src = proxied(fault_proxy)
    resolved = src.resolve(parse_ref(f"s3://{bucket}/resume/"))
    fault_proxy.inject("500", count=100, match=lambda s: is_object_get(s) and s.path.endswith("/shard-07.bin"))
    done: list[FileEntry] = []
    progress: list[int] = []
    with FetchContext(file_done=done.append, progress=progress.append).applied(), pytest.raises(SourceUnavailableError):
        src.fetch(resolved, tmp_path)
    assert sorted(e.path for e in done) == sorted(p for p in files if p != "shard-07.bin")
    assert sum(progress) >= sum(len(b) for p, b in files.items() if p != "shard-07.bin")

    # the loader's next attempt: what is missing, with the rest listed as completed
    fault_proxy.clear()
    before = len(fault_proxy.requests("GET"))
    assert resolved.files is not None
    missing = tuple(f for f in resolved.files if f.path == "shard-07.bin")
    retry = resolved.__class__(resolved.ref, resolved.source_id, resolved.version, missing, resolved.metadata)
    completed = {e.path: e for e in done}
    with FetchContext(completed=completed).applied():
        manifest = src.fetch(retry, tmp_path)
    assert [e.path for e in manifest.files] == ["shard-07.bin"]
    assert [s.path for s in fault_proxy.requests("GET")[before:]] == [f"/{bucket}/resume/shard-07.bin"]
    assert read_tree(tmp_path) == files

    # handed the whole resolution, it still skips what the context says is done
    before = len(fault_proxy.requests("GET"))
    with FetchContext(completed={**completed, "shard-07.bin": manifest.files[0]}).applied():
        whole = src.fetch(resolved, tmp_path)
    assert len(whole.files) == len(files)
    assert len(fault_proxy.requests("GET")) == before
    src.close()


def test_a_store_that_fails_everything_is_not_hammered(
    fault_proxy: FaultProxy, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    files = {f"f{i:02d}": b"x" * (100 + i) for i in range(40)}
    put_files(s3_client, bucket, "hammer/", files)
    src = proxied(fault_proxy)
    resolved = src.resolve(parse_ref(f"s3://{bucket}/hammer/"))
    fault_proxy.inject("500", count=10_000, match=is_object_get)
    with pytest.raises(SourceUnavailableError):
        src.fetch(resolved, tmp_path)
    # 5 attempts for each of 40 files would be 200 GETs; the retry quota stops re-issuing at 20
    assert fault_proxy.faults["500"] <= 40 + 20
    src.close()


def test_forbidden_through_the_proxy_is_access_denied(fault_proxy: FaultProxy, s3_client: Any, bucket: str) -> None:
    put_files(s3_client, bucket, "forbidden/", {"a": b"1"})
    src = proxied(fault_proxy)
    fault_proxy.inject("403", match=is_list)
    with pytest.raises(AccessDeniedError, match="InvalidAccessKeyId"):
        src.resolve(parse_ref(f"s3://{bucket}/forbidden/"))
    src.close()


def overwrite_on_second_get(s3_client: Any, bucket: str, prefix: str, new: Mapping[str, bytes]) -> Any:
    """A proxy hook that republishes the model just before the second object GET is forwarded."""
    gets = []
    lock = threading.Lock()

    def hook(seen: Seen) -> None:
        if not is_object_get(seen) or not seen.path.startswith(f"/{bucket}/{prefix}"):
            return
        with lock:
            gets.append(seen)
            if len(gets) == 2:
                put_files(s3_client, bucket, prefix, new)

    return hook


def test_an_overwrite_during_fetch_is_stale(
    fault_proxy: FaultProxy, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    put_files(s3_client, bucket, "midway/", model_files("old"))
    src = proxied(fault_proxy, max_concurrency=1)
    resolved = src.resolve(parse_ref(f"s3://{bucket}/midway/"))
    fault_proxy.before_forward = overwrite_on_second_get(s3_client, bucket, "midway/", model_files("new"))
    with pytest.raises(StaleResolutionError):
        src.fetch(resolved, tmp_path)
    src.close()


# -- through the loader ----------------------------------------------------------------------


def loader_config(cache: Path, *, attempts: int) -> LoaderConfig:
    retry = RetryPolicy(attempts=attempts, initial_backoff=0.0, max_backoff=0.0, jitter=0.0, source_deadline=60.0)
    return LoaderConfig(cache=CacheConfig(dir=cache), retry=retry, deadline=90.0)


def cached_blobs(cache: Path) -> list[bytes]:
    """The .bin files of published entries (an interrupted fetch's staging is kept to resume from)."""
    return [p.read_bytes() for p in (cache / "entries").rglob("*") if p.is_file() and p.suffix == ".bin"]


@pytest.fixture(scope="module")
def flaky_model(s3_client: Any, bucket: str) -> tuple[str, dict[str, bytes]]:
    """24 MiB of weights and 40 small files (uploaded once; each load fills its own cache)."""
    files = {"weights/model.bin": os.urandom(24 * MiB)}
    files.update({f"config/part-{i:02d}.json": os.urandom(2 * KiB + 37 * i) for i in range(40)})
    put_files(s3_client, bucket, "flaky/", files)
    return f"s3://{bucket}/flaky/", files


def test_every_load_succeeds_at_a_30_percent_fault_rate_with_default_settings(
    flaky_model: tuple[str, dict[str, bytes]],
    fault_proxy: FaultProxy,
    tmp_path: Path,
    no_leaked_threads: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)  # hundreds of retry warnings: expected here
    uri, files = flaky_model
    fault_proxy.randomize(0.3, seed=1234, kinds=FAST_FAULTS)
    src = S3Source(endpoint_url=fault_proxy.url)  # default settings throughout
    sleeps = Sleeps()
    default = LoaderConfig()
    started = time.monotonic()
    loads = 20
    for i in range(loads):
        config = LoaderConfig(cache=CacheConfig(dir=tmp_path / f"cache{i}"))
        with ResilientLoader([(src, uri)], config=config, sleep=sleeps) as loader:
            t0 = time.monotonic()
            result = loader.fetch()
            elapsed = time.monotonic() - t0
        assert not result.degraded
        assert not result.from_cache
        assert elapsed < default.deadline
        assert read_tree(result.path) == files
    src.close()
    took = time.monotonic() - started
    injected = fault_proxy.faults
    requests = len(fault_proxy.requests())
    print(f"\n30% faults: {loads} loads, 0 failed, {took:.1f}s, {requests} requests, faults {dict(injected)}")
    assert injected.total() >= 0.2 * requests, injected  # the faults really happened
    assert len(injected) == len(FAST_FAULTS), injected


def test_a_body_cut_short_never_reaches_the_cache(
    s3_client: Any, bucket: str, fault_proxy: FaultProxy, tmp_path: Path, no_leaked_threads: None
) -> None:
    files = model_files("cut")
    put_files(s3_client, bucket, "cut/", files)
    src = proxied(fault_proxy, request_attempts=1)
    uri = f"s3://{bucket}/cut/"
    cache = tmp_path / "cache"
    fault_proxy.inject("truncate", count=100, match=lambda s: is_object_get(s) and s.path.endswith("/big.bin"))
    with (
        ResilientLoader([(src, uri)], config=loader_config(cache, attempts=2), sleep=lambda s: None) as loader,
        pytest.raises(AllSourcesFailedError) as info,
    ):
        loader.fetch()
    assert isinstance(info.value.failures[0][1], SourceUnavailableError)
    assert cached_blobs(cache) == []  # nothing published, staging removed
    assert fault_proxy.faults["truncate"] >= 2

    fault_proxy.clear()  # the network heals: the next load is complete
    with ResilientLoader([(src, uri)], config=loader_config(cache, attempts=2), sleep=lambda s: None) as loader:
        result = loader.fetch()
    assert read_tree(result.path) == files
    assert cached_blobs(cache) == [files["weights/big.bin"]]
    src.close()


@pytest.mark.parametrize("versioned", [False, True], ids=["etag-pinned", "version-pinned"])
def test_an_overwrite_during_download_never_mixes_versions(
    s3_client: Any, bucket: str, versioned_bucket: str, fault_proxy: FaultProxy, tmp_path: Path, versioned: bool
) -> None:
    where = versioned_bucket if versioned else bucket
    old, new = model_files("old"), model_files("new")
    put_files(s3_client, where, "mixed/", old)
    src = proxied(fault_proxy, VersionedS3Source if versioned else S3Source, max_concurrency=1)
    fault_proxy.before_forward = overwrite_on_second_get(s3_client, where, "mixed/", new)
    config = loader_config(tmp_path / "cache", attempts=2)
    with ResilientLoader([(src, f"s3://{where}/mixed/")], config=config, sleep=lambda s: None) as loader:
        result = loader.fetch()
    served = read_tree(result.path)
    # pinned by ETag: the overwrite is detected and the loader resolves again (new files);
    # pinned by VersionId: the resolved versions are still fetchable (old files)
    assert served == (old if versioned else new)
    src.close()
