"""The S3 source against a real moto server over HTTP: conformance, resolution, fetch, bad input."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from _fault_proxy import FaultProxy
from _s3_server import AuthMotoServer, MotoServer, free_port, make_bucket, put_files
from helpers import read_tree
from model_loader._types import ModelRef
from model_loader._uri import parse_ref
from model_loader.errors import (
    AccessDeniedError,
    IntegrityError,
    InvalidReferenceError,
    ModelNotFoundError,
    SourceError,
    SourceTimeoutError,
    SourceUnavailableError,
    StaleResolutionError,
)
from model_loader.protocol import SourceSettings
from model_loader.registry import create_source
from model_loader.sources.s3 import S3Source, VersionedS3Source
from model_loader.testing.conformance import SourceConformanceTests, sample_files

KiB = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def bucket(s3_client: Any) -> str:
    return make_bucket(s3_client)


@pytest.fixture(scope="module")
def versioned_bucket(s3_client: Any) -> str:
    return make_bucket(s3_client, "ver", versioned=True)


@pytest.fixture
def source(moto_server: MotoServer) -> Iterator[S3Source]:
    src = S3Source(endpoint_url=moto_server.endpoint_url)
    yield src
    src.close()


def fetch_to(source: S3Source, ref: ModelRef | str, dest: Path) -> dict[str, bytes]:
    resolved = source.resolve(parse_ref(ref) if isinstance(ref, str) else ref)
    dest.mkdir(parents=True, exist_ok=True)
    manifest = source.fetch(resolved, dest)
    tree = read_tree(dest)
    assert {e.path: e.sha256 for e in manifest.files} == {p: sha(b) for p, b in tree.items()}
    return tree


# -- the conformance suite ---------------------------------------------------------------


class TestS3Conformance(SourceConformanceTests):
    @pytest.fixture
    def publish(self, s3_client: Any, bucket: str) -> Any:
        def _publish(name: str, files: Mapping[str, bytes], alias: str) -> ModelRef:
            put_files(s3_client, bucket, f"{name}/{alias}/", files)
            return parse_ref(f"s3://{bucket}/{name}/{alias}/")

        return _publish

    @pytest.fixture
    def missing_ref(self, bucket: str) -> ModelRef:
        return parse_ref(f"s3://{bucket}/no-such-model/")

    @pytest.fixture
    def unavailable_source(self) -> Iterator[S3Source]:
        src = S3Source(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout=1.0)
        yield src
        src.close()


class TestVersionedS3Conformance(SourceConformanceTests):
    @pytest.fixture
    def source(self, moto_server: MotoServer) -> Iterator[VersionedS3Source]:
        src = VersionedS3Source(endpoint_url=moto_server.endpoint_url)
        yield src
        src.close()

    @pytest.fixture
    def publish(self, s3_client: Any, versioned_bucket: str) -> Any:
        def _publish(name: str, files: Mapping[str, bytes], alias: str) -> ModelRef:
            put_files(s3_client, versioned_bucket, f"{name}/{alias}/", files)
            return parse_ref(f"s3://{versioned_bucket}/{name}/{alias}/")

        return _publish

    @pytest.fixture
    def missing_ref(self, versioned_bucket: str) -> ModelRef:
        return parse_ref(f"s3://{versioned_bucket}/no-such-model/")

    @pytest.fixture
    def unavailable_source(self) -> Iterator[VersionedS3Source]:
        src = VersionedS3Source(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout=1.0)
        yield src
        src.close()


# -- construction, identity, import cost ------------------------------------------------


def test_importing_the_module_does_not_import_boto3() -> None:
    code = (
        "import sys, model_loader, model_loader.sources.s3; "
        "bad = [m for m in ('boto3', 'botocore', 's3transfer') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"imported at module import: {proc.stdout} {proc.stderr}"


@pytest.mark.parametrize(
    ("endpoint", "identity"),
    [
        (None, "s3"),
        ("https://s3.eu-west-1.amazonaws.com", "s3"),
        ("http://127.0.0.1:9000/", "s3+http://127.0.0.1:9000"),
        ("https://user:secret@minio.example:9443/base", "s3+https://minio.example:9443/base"),
    ],
)
def test_identity_is_the_endpoint_without_credentials(aws_env: None, endpoint: str | None, identity: str) -> None:
    src = S3Source(endpoint_url=endpoint, region="us-east-1")
    assert src.identity == identity
    src.close()


def test_endpoint_from_the_standard_environment_variable(
    moto_server: MotoServer, bucket: str, s3_client: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    put_files(s3_client, bucket, "env/", {"a.txt": b"from env"})
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint_url)
    ref = parse_ref(f"s3://{bucket}/env/")
    settings = SourceSettings(connect_timeout=2.0, read_timeout=3.0, max_concurrency=3, exclude=("*.tmp",))
    src = create_source(ref, settings)
    assert isinstance(src, S3Source)
    assert src.identity == "s3+" + moto_server.endpoint_url
    assert fetch_to(src, ref, tmp_path) == {"a.txt": b"from env"}
    src.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"max_concurrency": 0}, {"read_timeout": 0}, {"part_size": 1024}, {"range_split": "sometimes"}],
)
def test_invalid_settings_are_refused(aws_env: None, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        S3Source(**kwargs)


def test_injected_client_is_used_and_not_closed(moto_server: MotoServer, s3_client: Any, bucket: str) -> None:
    put_files(s3_client, bucket, "inj/", {"x": b"1"})
    src = S3Source(client=s3_client)
    assert src.identity == "s3+" + moto_server.endpoint_url
    assert src.resolve(parse_ref(f"s3://{bucket}/inj/")).files is not None
    src.close()
    assert s3_client.list_objects_v2(Bucket=bucket, Prefix="inj/")["KeyCount"] == 1  # still usable


def test_closed_source_refuses_work(source: S3Source, bucket: str) -> None:
    source.close()
    with pytest.raises(SourceError, match="closed"):
        source.resolve(parse_ref(f"s3://{bucket}/anything/"))


# -- resolve ------------------------------------------------------------------------------


def test_single_object_reference(source: S3Source, s3_client: Any, bucket: str, tmp_path: Path) -> None:
    put_files(s3_client, bucket, "single/", {"model.onnx": b"onnx", "other.txt": b"x"})
    resolved = source.resolve(parse_ref(f"s3://{bucket}/single/model.onnx"))
    assert resolved.files is not None
    assert [(f.path, f.size) for f in resolved.files] == [("model.onnx", 4)]
    assert resolved.meta["kind"] == "object"
    assert fetch_to(source, f"s3://{bucket}/single/model.onnx", tmp_path) == {"model.onnx": b"onnx"}


def test_key_without_slash_is_a_prefix_when_no_such_object(source: S3Source, s3_client: Any, bucket: str) -> None:
    put_files(s3_client, bucket, "noslash/", {"a": b"1", "b/c": b"2"})
    put_files(s3_client, bucket, "noslash-sibling/", {"z": b"not mine"})
    resolved = source.resolve(parse_ref(f"s3://{bucket}/noslash"))
    assert resolved.files is not None
    assert sorted(f.path for f in resolved.files) == ["a", "b/c"]
    assert resolved.meta["kind"] == "prefix"


def test_an_existing_key_wins_over_the_prefix_of_the_same_name(source: S3Source, s3_client: Any, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="both", Body=b"object")
    s3_client.put_object(Bucket=bucket, Key="both/inner", Body=b"prefix")
    resolved = source.resolve(parse_ref(f"s3://{bucket}/both"))
    assert resolved.files is not None
    assert [f.path for f in resolved.files] == ["both"]


def test_version_covers_every_pinned_object(source: S3Source, s3_client: Any, bucket: str) -> None:
    put_files(s3_client, bucket, "ver/", {"a": b"1", "b": b"2"})
    first = source.resolve(parse_ref(f"s3://{bucket}/ver/"))
    s3_client.put_object(Bucket=bucket, Key="ver/b", Body=b"3")
    second = source.resolve(parse_ref(f"s3://{bucket}/ver/"))
    assert first.version != second.version
    assert first.files is not None
    assert second.files is not None
    assert first.files[0] == second.files[0]
    assert first.files[1].pin != second.files[1].pin


def test_directory_markers_are_skipped(source: S3Source, s3_client: Any, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="markers/", Body=b"")
    s3_client.put_object(Bucket=bucket, Key="markers/sub/", Body=b"")
    s3_client.put_object(Bucket=bucket, Key="markers/sub/file", Body=b"data")
    resolved = source.resolve(parse_ref(f"s3://{bucket}/markers/"))
    assert resolved.files is not None
    assert [f.path for f in resolved.files] == ["sub/file"]


def test_include_and_exclude_from_settings_and_reference(
    moto_server: MotoServer, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    files = {"MLmodel": b"m", "model.pkl": b"p", "ckpt/step1.pt": b"c", "env.tar.gz": b"e"}
    put_files(s3_client, bucket, "filters/", files)
    src = S3Source(endpoint_url=moto_server.endpoint_url, exclude=("ckpt/*", "*.tar.gz"))
    assert set(fetch_to(src, f"s3://{bucket}/filters/", tmp_path / "a")) == {"MLmodel", "model.pkl"}
    got = fetch_to(src, f"s3://{bucket}/filters/?include=*.pkl,MLmodel", tmp_path / "b")
    assert set(got) == {"MLmodel", "model.pkl"}
    got = fetch_to(src, f"s3://{bucket}/filters/?exclude=model.pkl", tmp_path / "c")  # replaces the source's
    assert set(got) == {"MLmodel", "ckpt/step1.pt", "env.tar.gz"}
    with pytest.raises(ModelNotFoundError, match="include/exclude"):
        src.resolve(parse_ref(f"s3://{bucket}/filters/?include=*.onnx"))
    src.close()


def test_unknown_query_parameter_is_refused(source: S3Source, bucket: str) -> None:
    with pytest.raises(InvalidReferenceError, match="unknown parameter"):
        source.resolve(parse_ref(f"s3://{bucket}/p/?recursive=1"))


def test_other_schemes_are_refused(source: S3Source) -> None:
    with pytest.raises(InvalidReferenceError):
        source.resolve(parse_ref("models:/iris@prod"))


def test_listing_is_paginated(
    source: S3Source, s3_client: Any, bucket: str, monkeypatch: pytest.MonkeyPatch, fault_proxy: FaultProxy
) -> None:
    monkeypatch.setattr("model_loader.sources.s3._LIST_PAGE_SIZE", 7)
    put_files(s3_client, bucket, "many/", {f"f{i:02d}": b"x" for i in range(30)})
    for cls in (S3Source, VersionedS3Source):
        src = cls(endpoint_url=fault_proxy.url)
        resolved = src.resolve(parse_ref(f"s3://{bucket}/many/"))
        assert resolved.files is not None
        assert [f.path for f in resolved.files] == [f"f{i:02d}" for i in range(30)]
        src.close()
    assert len([s for s in fault_proxy.requests("GET") if "list-type=2" in s.query]) == 5  # 30 keys / 7


# -- bad input: typed errors ---------------------------------------------------------------


def test_unknown_bucket(source: S3Source) -> None:
    with pytest.raises(ModelNotFoundError, match="NoSuchBucket"):
        source.resolve(parse_ref("s3://no-such-bucket-here/model/"))
    with pytest.raises(ModelNotFoundError):
        source.resolve(parse_ref("s3://no-such-bucket-here/model.pkl"))


def test_missing_key_and_empty_prefix(source: S3Source, bucket: str) -> None:
    with pytest.raises(ModelNotFoundError, match="no objects"):
        source.resolve(parse_ref(f"s3://{bucket}/nothing/here.pkl"))
    with pytest.raises(ModelNotFoundError, match="no objects"):
        source.resolve(parse_ref(f"s3://{bucket}/nothing/"))


@pytest.mark.parametrize("bad_key", ["../evil", "a/../../evil", "a//b", "./x", "a\\..\\b", "a/./b"])
def test_keys_escaping_the_model_directory_are_refused(
    source: S3Source, s3_client: Any, bucket: str, bad_key: str
) -> None:
    prefix = f"trav-{hashlib.md5(bad_key.encode()).hexdigest()[:6]}/"
    put_files(s3_client, bucket, prefix, {"ok.txt": b"fine"})
    s3_client.put_object(Bucket=bucket, Key=prefix + bad_key, Body=b"evil")
    with pytest.raises(IntegrityError, match="escapes the model directory") as info:
        source.resolve(parse_ref(f"s3://{bucket}/{prefix}"))
    assert bad_key in str(info.value)


def test_an_excluded_unsafe_key_is_not_an_error(moto_server: MotoServer, s3_client: Any, bucket: str) -> None:
    put_files(s3_client, bucket, "trav-excl/", {"ok.txt": b"fine"})
    s3_client.put_object(Bucket=bucket, Key="trav-excl/../evil", Body=b"evil")
    src = S3Source(endpoint_url=moto_server.endpoint_url, exclude=("../*",))
    resolved = src.resolve(parse_ref(f"s3://{bucket}/trav-excl/"))
    assert resolved.files is not None
    assert [f.path for f in resolved.files] == ["ok.txt"]
    src.close()


def test_a_key_that_is_both_file_and_directory_is_refused(source: S3Source, s3_client: Any, bucket: str) -> None:
    put_files(s3_client, bucket, "clash/", {"a": b"file", "a/b": b"nested"})
    with pytest.raises(IntegrityError, match="both a file and a directory"):
        source.resolve(parse_ref(f"s3://{bucket}/clash/"))


def test_wrong_credentials_are_access_denied(moto_auth_server: AuthMotoServer, tmp_path: Path) -> None:
    client = moto_auth_server.client()
    bucket = make_bucket(client, "auth")
    put_files(client, bucket, "m/", {"a": b"secret model"})
    ref = parse_ref(f"s3://{bucket}/m/")
    good = S3Source(client=client)
    assert good.resolve(ref).files is not None  # the control: the right key works
    for key, secret, code in [
        (moto_auth_server.access_key, "wrong-secret", "SignatureDoesNotMatch"),
        ("AKIAUNKNOWNUNKNOWN12", "whatever", "InvalidAccessKeyId"),
    ]:
        bad = S3Source(client=moto_auth_server.client(key, secret))
        with pytest.raises(AccessDeniedError, match=code) as info:
            bad.resolve(ref)
        assert secret not in str(info.value)
        resolved = good.resolve(ref)
        with pytest.raises(AccessDeniedError):
            bad.fetch(resolved, tmp_path)
        assert not any(tmp_path.iterdir())


def test_unreachable_endpoint_is_unavailable(aws_env: None, bucket: str) -> None:
    src = S3Source(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout=1.0)
    with pytest.raises(SourceUnavailableError) as info:
        src.resolve(parse_ref(f"s3://{bucket}/m/"))
    assert not isinstance(info.value, SourceTimeoutError)
    src.close()


# -- fetch --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["off", "auto", "eager"])
def test_large_objects_in_every_split_mode(
    moto_server: MotoServer, s3_client: Any, bucket: str, fault_proxy: FaultProxy, tmp_path: Path, mode: str
) -> None:
    big = os.urandom(1024 * KiB + 123)
    files = {"big.bin": big, "small.txt": b"small", "empty": b"", "mid/medium.bin": os.urandom(100 * KiB)}
    put_files(s3_client, bucket, f"large-{mode}/", files)
    src = S3Source(endpoint_url=fault_proxy.url, part_size=64 * KiB, max_concurrency=6, range_split=mode)  # type: ignore[arg-type]
    assert fetch_to(src, f"s3://{bucket}/large-{mode}/", tmp_path) == files
    big_gets = [s for s in fault_proxy.requests("GET") if s.path.endswith("/big.bin")]
    ranged = [s for s in big_gets if s.range]
    if mode == "off":
        assert len(big_gets) == 1
        assert not ranged
    if mode == "eager":
        assert len(ranged) >= 2  # the idle workers split it
    assert all(s.range is None for s in fault_proxy.requests("GET") if not s.path.endswith("/big.bin"))
    src.close()


def test_auto_splits_a_large_object_when_one_connection_is_slow(
    s3_client: Any, bucket: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    files = {"big.bin": os.urandom(1024 * KiB)}
    put_files(s3_client, bucket, "slowlink/", files)
    fault_proxy.bandwidth = 2 * 1024 * KiB  # bytes/s per connection: a second for the object on one stream
    src = S3Source(endpoint_url=fault_proxy.url, part_size=64 * KiB, max_concurrency=4)  # range_split="auto"
    assert fetch_to(src, f"s3://{bucket}/slowlink/", tmp_path) == files
    ranged = [s for s in fault_proxy.requests("GET") if s.path.endswith("/big.bin") and s.range]
    assert len(ranged) >= 2  # idle workers took over the tail of the slow stream
    src.close()


def test_every_get_is_pinned_and_an_overwrite_is_stale(
    source: S3Source, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    put_files(s3_client, bucket, "stale/", {"a": b"old a", "b": b"old b"})
    resolved = source.resolve(parse_ref(f"s3://{bucket}/stale/"))
    s3_client.put_object(Bucket=bucket, Key="stale/b", Body=b"new b")
    with pytest.raises(StaleResolutionError):
        source.fetch(resolved, tmp_path)


def test_a_deleted_object_is_not_found_at_fetch(source: S3Source, s3_client: Any, bucket: str, tmp_path: Path) -> None:
    put_files(s3_client, bucket, "gone/", {"a": b"1", "b": b"2"})
    resolved = source.resolve(parse_ref(f"s3://{bucket}/gone/"))
    s3_client.delete_object(Bucket=bucket, Key="gone/a")
    with pytest.raises(ModelNotFoundError):
        source.fetch(resolved, tmp_path)


def test_version_id_reference_pins_one_object_version(
    moto_server: MotoServer, s3_client: Any, versioned_bucket: str, tmp_path: Path
) -> None:
    v1 = s3_client.put_object(Bucket=versioned_bucket, Key="pinned/model.pkl", Body=b"v1")["VersionId"]
    s3_client.put_object(Bucket=versioned_bucket, Key="pinned/model.pkl", Body=b"v2")
    src = S3Source(endpoint_url=moto_server.endpoint_url)
    ref = parse_ref(f"s3://{versioned_bucket}/pinned/model.pkl?versionId={v1}")
    assert fetch_to(src, ref, tmp_path / "a") == {"model.pkl": b"v1"}
    assert fetch_to(src, f"s3://{versioned_bucket}/pinned/model.pkl", tmp_path / "b") == {"model.pkl": b"v2"}
    with pytest.raises(ModelNotFoundError):
        src.resolve(parse_ref(f"s3://{versioned_bucket}/pinned/model.pkl?versionId=nope"))
    src.close()


def test_versioned_source_serves_the_old_version_after_overwrite_and_delete(
    moto_server: MotoServer, s3_client: Any, versioned_bucket: str, tmp_path: Path
) -> None:
    put_files(s3_client, versioned_bucket, "vsrc/", {"a": b"old a", "b": b"old b"})
    src = VersionedS3Source(endpoint_url=moto_server.endpoint_url)
    resolved = src.resolve(parse_ref(f"s3://{versioned_bucket}/vsrc/"))
    put_files(s3_client, versioned_bucket, "vsrc/", {"a": b"new a"})  # b deleted: a delete marker
    tmp_path.mkdir(exist_ok=True)
    src.fetch(resolved, tmp_path)
    assert read_tree(tmp_path) == {"a": b"old a", "b": b"old b"}
    assert fetch_to(src, f"s3://{versioned_bucket}/vsrc/", tmp_path / "new") == {"a": b"new a"}
    src.close()


@pytest.mark.parametrize("times", [1, 1000], ids=["once", "always"])
@pytest.mark.parametrize("size", [5 * KiB, 300 * KiB])  # one GET with ChecksumMode; ranged parts + HEAD
def test_a_corrupted_body_fails_the_s3_checksum(
    s3_client: Any, bucket: str, fault_proxy: FaultProxy, tmp_path: Path, size: int, times: int
) -> None:
    data = os.urandom(size)
    put_files(s3_client, bucket, f"corrupt-{size}-{times}/", {"blob": data})
    head = s3_client.head_object(Bucket=bucket, Key=f"corrupt-{size}-{times}/blob", ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32"), "boto3 stores a CRC32 with every upload; moto keeps it"
    src = S3Source(endpoint_url=fault_proxy.url, part_size=64 * KiB, range_split="eager")
    resolved = src.resolve(parse_ref(f"s3://{bucket}/corrupt-{size}-{times}/"))
    fault_proxy.inject("corrupt", count=times, match=lambda s: s.method == "GET" and s.path.endswith("/blob"))
    if times == 1:  # altered in flight: caught, and the file downloaded again
        assert src.fetch(resolved, tmp_path).files[0].verified == "s3-crc32"
        assert read_tree(tmp_path) == {"blob": data}
    else:
        with pytest.raises(IntegrityError, match=r"(?i)checksum"):
            src.fetch(resolved, tmp_path)
    src.close()


@pytest.mark.parametrize("threshold", [64 * KiB, 64 * 1024 * KiB], ids=["ranged-path", "single-get-path"])
def test_a_multipart_upload_with_a_composite_checksum_is_fetched(
    moto_server: MotoServer, s3_client: Any, bucket: str, tmp_path: Path, threshold: int
) -> None:
    from boto3.s3.transfer import TransferConfig

    data = os.urandom(11 * 1024 * KiB)  # 3 parts of 5 MiB at most: S3 keeps a checksum of the parts' checksums
    key = f"multipart-{threshold}/weights.bin"
    config = TransferConfig(multipart_threshold=5 * 1024 * KiB, multipart_chunksize=5 * 1024 * KiB)
    s3_client.upload_fileobj(io.BytesIO(data), bucket, key, Config=config)
    assert s3_client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"').endswith("-3")
    src = S3Source(endpoint_url=moto_server.endpoint_url, part_size=64 * KiB, multipart_threshold=threshold)
    assert fetch_to(src, f"s3://{bucket}/{key}", tmp_path) == {"weights.bin": data}
    src.close()


def test_fetch_refuses_a_resolution_from_another_source(
    source: S3Source, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    put_files(s3_client, bucket, "other/", {"a": b"1"})
    resolved = source.resolve(parse_ref(f"s3://{bucket}/other/"))
    foreign = resolved.__class__(
        resolved.ref, "s3+http://elsewhere:1", resolved.version, resolved.files, resolved.metadata
    )
    with pytest.raises(SourceError, match="not by this source"):
        source.fetch(foreign, tmp_path)


def test_sample_files_round_trip_through_a_proxy_with_no_faults(
    s3_client: Any, bucket: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    files = sample_files("proxy")
    put_files(s3_client, bucket, "viaproxy/", files)
    src = S3Source(endpoint_url=fault_proxy.url)
    assert fetch_to(src, f"s3://{bucket}/viaproxy/", tmp_path) == files
    assert fault_proxy.faults.total() == 0
    assert len(fault_proxy.requests("GET")) >= len(files)
    src.close()
