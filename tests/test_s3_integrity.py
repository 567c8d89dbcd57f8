"""Every byte verified end to end, or said to be unverified: each way an object can be uploaded.

Objects are uploaded to a real moto server every way S3 allows (no checksum, each
checksum algorithm, multipart with and without checksums, typed full-object and composite
checksums, parts of several and of unequal sizes, SSE-KMS, a versioned bucket), then
fetched through the fault proxy by one GET or by ranged parts out of order. A clean body
is reported with how it was verified (``FileEntry.verified``); a body with one byte
flipped, or replaced by another object's bytes of the same length, is ``IntegrityError``.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _fault_proxy import FaultProxy, Seen
from _s3_server import MotoServer, make_bucket
from helpers import Sleeps, read_tree
from model_loader import CacheConfig, LoaderConfig, ResilientLoader
from model_loader._types import Manifest
from model_loader._uri import parse_ref
from model_loader.errors import AllSourcesFailedError, IntegrityError, InvalidResponseError
from model_loader.sources._s3_integrity import choose
from model_loader.sources.s3 import S3Source, VersionedS3Source

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Kind:
    name: str
    upload: Callable[[Any, Any, str, str, bytes], None]  # (client, plain client, bucket, key, data)
    size: int | tuple[int, ...]  # one size, or the sizes of the parts
    verified: str | None
    versioned: bool = False


def put(**extra: Any) -> Callable[[Any, Any, str, str, bytes], None]:
    def upload(client: Any, plain: Any, bucket: str, key: str, data: bytes) -> None:
        (client if "ChecksumAlgorithm" in extra else plain).put_object(Bucket=bucket, Key=key, Body=data, **extra)

    return upload


def transfer(**extra: Any) -> Callable[[Any, Any, str, str, bytes], None]:
    """boto3's TransferManager with 5 MiB parts (its default checksum: CRC32, untyped on moto)."""
    from boto3.s3.transfer import TransferConfig

    def upload(client: Any, plain: Any, bucket: str, key: str, data: bytes) -> None:
        config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
        client.upload_fileobj(io.BytesIO(data), bucket, key, Config=config, ExtraArgs=extra or None)

    return upload


def parts(sizes: tuple[int, ...], algorithm: str | None = None, kind: str | None = None, **extra: Any) -> Any:
    """The low-level multipart API: parts of exactly ``sizes`` (equal or not), optionally with a typed checksum."""

    def upload(client: Any, plain: Any, bucket: str, key: str, data: bytes) -> None:
        c = client if algorithm else plain
        checksum = {"ChecksumAlgorithm": algorithm} if algorithm else {}
        typed = {"ChecksumType": kind} if kind else {}
        up = c.create_multipart_upload(Bucket=bucket, Key=key, **checksum, **typed, **extra)
        done, pos = [], 0
        for number, size in enumerate(sizes, 1):
            r = c.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=up["UploadId"],
                PartNumber=number,
                Body=data[pos : pos + size],
                **checksum,
            )
            part = {"PartNumber": number, "ETag": r["ETag"]}
            if algorithm:
                part[f"Checksum{algorithm}"] = r[f"Checksum{algorithm}"]
            done.append(part)
            pos += size
        whole = {}
        if kind == "FULL_OBJECT":
            crc = zlib.crc32(data).to_bytes(4, "big")
            whole = {"ChecksumCRC32": base64.b64encode(crc).decode(), "ChecksumType": "FULL_OBJECT"}
        c.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": done}, **whole
        )

    return upload


SMALL = 200 * KiB
TWO = (5 * MiB, 300 * KiB)
KINDS = [
    Kind("plain", put(), SMALL, "md5"),
    Kind("crc32", put(ChecksumAlgorithm="CRC32"), SMALL, "s3-crc32"),
    Kind("sha1", put(ChecksumAlgorithm="SHA1"), SMALL, "s3-sha1"),
    Kind("sha256", put(ChecksumAlgorithm="SHA256"), SMALL, "s3-sha256"),
    Kind("sse-s3", put(ServerSideEncryption="AES256"), SMALL, "md5"),  # SSE-S3 keeps the MD5 ETag
    Kind("sse-kms", put(ServerSideEncryption="aws:kms"), SMALL, None),  # the ETag is no MD5: cannot be verified
    Kind("mp-none", parts(TWO), TWO, "md5-parts"),
    Kind("mp-6mib", parts((6 * MiB, 2 * MiB)), (6 * MiB, 2 * MiB), "md5-parts"),
    Kind("mp-transfer-crc32", transfer(), TWO, "s3-crc32"),  # composite, but neither typed nor suffixed by moto
    Kind("mp-transfer-sha256", transfer(ChecksumAlgorithm="SHA256"), TWO, "s3-sha256"),
    Kind("mp-transfer-sha1", transfer(ChecksumAlgorithm="SHA1"), TWO, "s3-sha1"),
    Kind("mp-full-crc32", parts(TWO, "CRC32", "FULL_OBJECT"), TWO, "s3-crc32"),
    Kind("mp-composite-crc32", parts(TWO, "CRC32", "COMPOSITE"), TWO, "s3-crc32"),
    # unequal parts: the first part's size implies a layout that fits the object's size
    # but is wrong (6,6,1 MiB), or one that cannot fit (6 MiB parts for 11.1 MiB)
    Kind("mp-unequal", parts((6 * MiB, 5 * MiB, 2 * MiB)), (6 * MiB, 5 * MiB, 2 * MiB), "md5-parts"),
    Kind("mp-unequal-short", parts((6 * MiB, 5 * MiB, 100 * KiB)), (6 * MiB, 5 * MiB, 100 * KiB), "md5-parts"),
    Kind("mp-sse-kms", parts(TWO, ServerSideEncryption="aws:kms"), TWO, None),
    Kind("versioned-plain", put(), SMALL, "md5", versioned=True),
    Kind("versioned-mp", parts(TWO), TWO, "md5-parts", versioned=True),
]
VERIFIABLE = [k for k in KINDS if k.verified]


def total(kind: Kind) -> int:
    return kind.size if isinstance(kind.size, int) else sum(kind.size)


@pytest.fixture(scope="module")
def uploaded(moto_server: MotoServer, s3_client: Any) -> dict[str, tuple[str, bytes]]:
    """Every kind uploaded once: name -> (bucket, data)."""
    import boto3
    from botocore.config import Config

    plain = boto3.client(
        "s3",
        endpoint_url=moto_server.endpoint_url,
        region_name="us-east-1",
        config=Config(request_checksum_calculation="when_required"),  # no checksum unless asked for
    )
    buckets = {False: make_bucket(s3_client, "integrity"), True: make_bucket(s3_client, "integrity-v", versioned=True)}
    out = {}
    for kind in KINDS:
        data = os.urandom(total(kind))
        bucket = buckets[kind.versioned]
        kind.upload(s3_client, plain, bucket, f"{kind.name}/blob", data)
        out[kind.name] = (bucket, data)
    return out


PATHS = {
    "one-get": {},  # below multipart_threshold: one GET, hashed as it streams
    "ranged": {"part_size": 1 * MiB, "multipart_threshold": 64 * KiB, "range_split": "eager"},  # parts out of order
}


@pytest.fixture
def open_source(fault_proxy: FaultProxy) -> Iterator[Callable[[Kind, str], S3Source]]:
    made: list[S3Source] = []

    def build(kind: Kind, path: str) -> S3Source:
        cls = VersionedS3Source if kind.versioned else S3Source
        src = cls(endpoint_url=fault_proxy.url, **PATHS[path])
        made.append(src)
        return src

    yield build
    for src in made:
        src.close()


def fetch(src: S3Source, bucket: str, kind: Kind, dest: Path) -> Manifest:
    resolved = src.resolve(parse_ref(f"s3://{bucket}/{kind.name}/"))
    return src.fetch(resolved, dest)


def is_blob_get(kind: Kind) -> Callable[[Seen], bool]:
    return lambda s: s.method == "GET" and s.path.endswith(f"/{kind.name}/blob")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_every_upload_kind_is_verified_or_said_not_to_be(
    uploaded: dict[str, tuple[str, bytes]], open_source: Any, tmp_path: Path, kind: Kind, path: str
) -> None:
    bucket, data = uploaded[kind.name]
    manifest = fetch(open_source(kind, path), bucket, kind, tmp_path)
    assert read_tree(tmp_path) == {"blob": data}
    assert [(e.path, e.verified) for e in manifest.files] == [("blob", kind.verified)]
    assert manifest.verified is (kind.verified is not None)


ALTERED = [("corrupt", "ranged"), ("substitute", "one-get")]


def downloads(proxy: FaultProxy, kind: Kind) -> int:
    """GETs of the blob from byte 0: one per download, however many ranged parts each had."""
    gets = [s for s in proxy.requests("GET") if is_blob_get(kind)(s)]
    return sum(s.range is None or s.range.startswith("bytes=0-") for s in gets)


@pytest.mark.parametrize(("fault", "path"), ALTERED)
@pytest.mark.parametrize("kind", VERIFIABLE, ids=lambda k: k.name)
def test_a_body_altered_in_flight_is_downloaded_again(
    uploaded: dict[str, tuple[str, bytes]],
    open_source: Any,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    kind: Kind,
    fault: str,
    path: str,
) -> None:
    bucket, data = uploaded[kind.name]
    src = open_source(kind, path)
    resolved = src.resolve(parse_ref(f"s3://{bucket}/{kind.name}/"))
    decoy = os.urandom(len(data))  # another object's bytes, of the same length
    fault_proxy.inject(fault, count=1, match=is_blob_get(kind), payload=decoy if fault == "substitute" else None)
    manifest = src.fetch(resolved, tmp_path)
    assert read_tree(tmp_path) == {"blob": data}
    assert [(e.path, e.verified) for e in manifest.files] == [("blob", kind.verified)]
    assert fault_proxy.faults[fault] == 1
    assert downloads(fault_proxy, kind) == 2


@pytest.mark.parametrize(("fault", "path"), ALTERED)
@pytest.mark.parametrize("kind", VERIFIABLE, ids=lambda k: k.name)
def test_a_body_altered_every_time_is_an_integrity_error(
    uploaded: dict[str, tuple[str, bytes]],
    open_source: Any,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    kind: Kind,
    fault: str,
    path: str,
) -> None:
    bucket, data = uploaded[kind.name]
    src = open_source(kind, path)
    resolved = src.resolve(parse_ref(f"s3://{bucket}/{kind.name}/"))
    decoy = os.urandom(len(data))
    fault_proxy.inject(fault, count=10_000, match=is_blob_get(kind), payload=decoy if fault == "substitute" else None)
    with pytest.raises(IntegrityError, match=r"(?i)checksum|ETag") as info:
        src.fetch(resolved, tmp_path)
    assert downloads(fault_proxy, kind) == 5  # the default request_attempts, then it is the object's fault
    assert "in each of 5 downloads" in str(info.value)


def test_an_altered_body_never_reaches_the_cache(
    uploaded: dict[str, tuple[str, bytes]], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    kind = next(k for k in KINDS if k.name == "mp-none")
    bucket, data = uploaded[kind.name]
    src = S3Source(endpoint_url=fault_proxy.url)
    fault_proxy.inject("substitute", count=100, match=is_blob_get(kind), payload=os.urandom(len(data)))
    config = LoaderConfig(cache=CacheConfig(dir=tmp_path / "cache"))
    with (
        ResilientLoader([(src, f"s3://{bucket}/{kind.name}/")], config=config, sleep=Sleeps()) as loader,
        pytest.raises(AllSourcesFailedError) as info,
    ):
        loader.fetch()
    assert isinstance(info.value.failures[0][1], IntegrityError)
    assert not [p for p in (tmp_path / "cache" / "entries").rglob("*") if p.is_file()]
    fault_proxy.clear()
    with ResilientLoader([(src, f"s3://{bucket}/{kind.name}/")], config=config, sleep=Sleeps()) as loader:
        result = loader.fetch()
    assert read_tree(result.path) == {"blob": data}
    assert result.verified
    src.close()


# -- what the headers allow (real S3's answers, which moto does not give) ---------------------

MD5 = '"0123456789abcdef0123456789abcdef"'
MULTI = '"0123456789abcdef0123456789abcdef-3"'
CRC = base64.b64encode(b"\x01\x02\x03\x04").decode()


def labels(headers: dict[str, Any], etag: str) -> list[tuple[tuple[str, int], ...]]:
    return [tuple((c.label, c.parts) for c in choice.candidates) for choice in choose(headers, etag, "GET k")]


def test_choose_prefers_a_checksum_and_falls_back_to_the_etag() -> None:
    assert labels({"ChecksumCRC32": CRC}, MD5) == [(("s3-crc32", 0),), (("md5", 0),)]
    assert labels({}, MD5) == [(("md5", 0),)]
    assert labels({"ServerSideEncryption": "aws:kms"}, MD5) == []
    assert labels({"SSECustomerAlgorithm": "AES256"}, MULTI) == []
    assert labels({"ServerSideEncryption": "AES256"}, MD5) == [(("md5", 0),)]


def test_choose_reads_real_s3s_checksum_types() -> None:
    full = {"ChecksumCRC32": CRC, "ChecksumType": "FULL_OBJECT"}
    assert labels(full, MULTI)[0] == (("s3-crc32", 0),)
    composite = {"ChecksumCRC32": CRC + "-3", "ChecksumType": "COMPOSITE"}
    assert labels(composite, MULTI) == [(("s3-crc32", 3),), (("md5-parts", 3),)]
    untyped = {"ChecksumCRC32": CRC}  # moto: a multipart upload's composite, unmarked
    assert labels(untyped, MULTI)[0] == (("s3-crc32", 0), ("s3-crc32", 3))


def test_an_algorithm_that_cannot_be_computed_here_falls_back() -> None:
    got = labels({"ChecksumCRC32C": "AAAAAA=="}, MD5)  # CRC32C needs awscrt (botocore[crt])
    if importlib.util.find_spec("awscrt") is None:
        assert got == [(("md5", 0),)]
    else:
        assert got[0] == (("s3-crc32c", 0),)


@pytest.mark.parametrize("value", ["not base64!", "AAAA", CRC + "-x"])
def test_a_malformed_checksum_header_is_an_invalid_response(value: str) -> None:
    with pytest.raises(InvalidResponseError):
        choose({"ChecksumCRC32": value}, MD5, "GET k")
