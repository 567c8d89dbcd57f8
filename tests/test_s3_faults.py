"""Faults injected for real between boto3 and a moto server (see ``_fault_proxy``).

First the S3 source alone: every fault becomes a typed error or is absorbed by resuming
the request. Then through :class:`ResilientLoader`: loads succeed at a 30% fault rate, a
body cut short never reaches the cache, an overwrite mid-download never mixes versions.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from _fault_proxy import FaultProxy, Seen
from _s3_server import make_bucket, put_files
from helpers import read_tree, wait_for
from model_loader import CacheConfig, LoaderConfig, ResilientLoader, RetryPolicy
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
READ_TIMEOUT = 0.4


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


@pytest.mark.parametrize("kind", ["500", "503", "reset", "stall", "stall_body", "truncate"])
def test_a_fault_while_listing_is_a_typed_transient_error(
    fault_proxy: FaultProxy, s3_client: Any, bucket: str, kind: str
) -> None:
    put_files(s3_client, bucket, f"list-{kind}/", model_files("l"))
    src = proxied(fault_proxy)
    fault_proxy.inject(kind, match=is_list)
    expected = SourceTimeoutError if kind.startswith("stall") else SourceUnavailableError
    with pytest.raises(expected) as info:
        src.resolve(parse_ref(f"s3://{bucket}/list-{kind}/"))
    if kind == "503":
        assert "SlowDown" in str(info.value)
    assert fault_proxy.faults[kind] == 1
    assert src.resolve(parse_ref(f"s3://{bucket}/list-{kind}/")).files is not None  # the pool recovered
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
    src = proxied(fault_proxy, request_attempts=3)
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
    src = proxied(fault_proxy, request_attempts=2, range_split="off")  # one request at a time per file
    resolved = src.resolve(parse_ref(f"s3://{bucket}/{prefix}"))
    fault_proxy.inject(kind, count=100, match=lambda s: is_object_get(s) and s.path.endswith("/" + target))
    expected = SourceTimeoutError if kind.startswith("stall") else SourceUnavailableError
    with pytest.raises(expected):
        src.fetch(resolved, tmp_path)
    tries = fault_proxy.faults[kind]
    assert tries == (1 if kind.startswith("stall") else 2)  # timeouts are left to the loader
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
    return [p.read_bytes() for p in cache.rglob("*") if p.is_file() and p.suffix == ".bin"]


def test_every_load_succeeds_at_a_30_percent_fault_rate(
    s3_client: Any, bucket: str, fault_proxy: FaultProxy, tmp_path: Path, no_leaked_threads: None
) -> None:
    fault_proxy.randomize(0.3, seed=1234)
    sleeps: list[float] = []
    for i in range(10):
        files = model_files(f"flaky{i}")
        put_files(s3_client, bucket, f"flaky{i}/", files)
        src = proxied(fault_proxy, request_attempts=4)
        with ResilientLoader(
            [(src, f"s3://{bucket}/flaky{i}/")],
            config=loader_config(tmp_path / f"cache{i}", attempts=25),
            sleep=sleeps.append,
        ) as loader:
            result = loader.fetch()
        src.close()
        assert not result.degraded
        assert not result.from_cache
        assert read_tree(result.path) == files
    injected = fault_proxy.faults
    assert injected.total() >= 8, injected  # the faults really happened (about 25 expected)
    assert len(injected) >= 3, injected


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
