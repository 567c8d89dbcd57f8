"""Typed errors for what a store, a key or a disk can throw at the S3 source.

Malformed listings (rewritten in flight by the fault proxy) are ``InvalidResponseError``;
a key no filesystem can hold is refused at resolve with ``IntegrityError``; a full disk
is ``CacheError`` whether it shows when preallocating a large file or writing a small
one (a real limit: ``RLIMIT_FSIZE`` in a child process).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from _fault_proxy import FaultProxy, Seen
from _s3_server import MotoServer, free_port, make_bucket, put_files
from model_loader._uri import parse_ref
from model_loader.errors import IntegrityError, InvalidResponseError, SourceUnavailableError
from model_loader.sources.s3 import S3Source

KiB = 1024


@pytest.fixture(scope="module")
def bucket(s3_client: Any) -> str:
    name = make_bucket(s3_client, "errors")
    put_files(s3_client, name, "m/", {"a.bin": b"a" * 10, "b.bin": b"b" * 20})
    return name


def is_list(seen: Seen) -> bool:
    return seen.method == "GET" and "list-type=2" in seen.query


def sub(pattern: str, repl: str) -> Callable[[bytes], bytes]:
    return lambda body: re.sub(pattern.encode(), repl.encode(), body, count=1)


MALFORMED = {
    "no-size": sub(r"<Size>\d+</Size>", ""),
    "size-not-an-integer": sub(r"<Size>\d+</Size>", "<Size>12abc</Size>"),
    "negative-size": sub(r"<Size>\d+</Size>", "<Size>-5</Size>"),
    "size-too-large": sub(r"<Size>\d+</Size>", f"<Size>{2**62}</Size>"),
    "no-key": sub(r"<Key>[^<]*</Key>", ""),
    "no-etag": sub(r"<ETag>[^<]*</ETag>", ""),
    "etag-with-a-space": sub(r"<ETag>[^<]*</ETag>", "<ETag>&quot;a b&quot;</ETag>"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_listing_is_an_invalid_response(
    fault_proxy: FaultProxy, bucket: str, name: str, moto_server: MotoServer
) -> None:
    src = S3Source(endpoint_url=fault_proxy.url, request_backoff=0.0)
    fault_proxy.inject("rewrite", count=100, match=is_list, payload=MALFORMED[name])
    with pytest.raises(InvalidResponseError, match="malformed"):
        src.resolve(parse_ref(f"s3://{bucket}/m/"))
    fault_proxy.clear()
    assert src.resolve(parse_ref(f"s3://{bucket}/m/")).files is not None
    src.close()


def test_a_listing_cut_mid_xml_is_transient(fault_proxy: FaultProxy, bucket: str) -> None:
    # botocore reads a 200 whose XML does not parse as a stream cut short: a 500
    src = S3Source(endpoint_url=fault_proxy.url, request_backoff=0.0)
    fault_proxy.inject("rewrite", count=100, match=is_list, payload=lambda body: body[: len(body) // 2])
    with pytest.raises(SourceUnavailableError):
        src.resolve(parse_ref(f"s3://{bucket}/m/"))
    src.close()


def test_a_listing_that_loops_is_an_invalid_response(
    fault_proxy: FaultProxy, s3_client: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_files(s3_client, bucket, "loop/", {f"f{i}": b"x" for i in range(4)})
    monkeypatch.setattr("model_loader.sources.s3._LIST_PAGE_SIZE", 1)  # real pages, real tokens
    first: list[bytes] = []

    def replay_first_token(body: bytes) -> bytes:  # every page says "continue from page 2"
        token = re.search(rb"<NextContinuationToken>[^<]*</NextContinuationToken>", body)
        if token is None:
            return body
        if not first:
            first.append(token.group(0))
        return body.replace(token.group(0), first[0])

    src = S3Source(endpoint_url=fault_proxy.url)
    fault_proxy.inject("rewrite", count=100, match=is_list, payload=replay_first_token)
    with pytest.raises(InvalidResponseError, match="repeats a page"):
        src.resolve(parse_ref(f"s3://{bucket}/loop/"))
    src.close()


def test_credentials_in_an_endpoint_never_reach_errors_or_logs(bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    src = S3Source(endpoint_url=f"http://someone:s3cr3t-pw@127.0.0.1:{free_port()}", request_backoff=0.0)
    with pytest.raises(SourceUnavailableError) as info:
        src.resolve(parse_ref(f"s3://{bucket}/m/"))
    assert "s3cr3t" not in str(info.value)
    assert "s3cr3t" not in caplog.text
    assert "s3cr3t" not in src.identity
    src.close()


def test_a_key_too_long_for_a_filesystem_is_refused_at_resolve(
    moto_server: MotoServer, s3_client: Any, bucket: str
) -> None:
    long_name = "w" * 300  # a path component of 300 bytes: every common filesystem allows 255
    put_files(s3_client, bucket, "long/", {"ok.txt": b"fine", f"dir/{long_name}.bin": b"data"})
    src = S3Source(endpoint_url=moto_server.endpoint_url)
    with pytest.raises(IntegrityError, match=f"long/dir/{long_name}.bin") as info:
        src.resolve(parse_ref(f"s3://{bucket}/long/"))
    assert "304 bytes" in str(info.value)
    excluded = src.resolve(parse_ref(f"s3://{bucket}/long/?exclude=dir/*"))
    assert excluded.files is not None
    assert [f.path for f in excluded.files] == ["ok.txt"]
    src.close()


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path

    from model_loader._uri import parse_ref
    from model_loader.sources.s3 import S3Source

    endpoint, uri, dest, limit = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    source = S3Source(endpoint_url=endpoint, part_size=64 * 1024)
    resolved = source.resolve(parse_ref(uri))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        source.fetch(resolved, dest)
    except BaseException as exc:
        print(type(exc).__module__, type(exc).__name__, exc)
    else:
        print("no error")
    """
)


@pytest.mark.parametrize(
    ("files", "step"),
    [
        ({"small.bin": os.urandom(100 * KiB), "tiny": b"t"}, "writing"),  # one GET streamed to disk
        ({"large.bin": os.urandom(300 * KiB), "tiny": b"t"}, "preallocating"),  # ranged parts into a reserved file
    ],
    ids=["small-file", "large-file"],
)
def test_a_full_disk_is_a_cache_error(
    moto_server: MotoServer, s3_client: Any, bucket: str, tmp_path: Path, files: dict[str, bytes], step: str
) -> None:
    prefix = f"full-{step}/"
    put_files(s3_client, bucket, prefix, files)
    dest = tmp_path / "dest"
    dest.mkdir()
    args = [moto_server.endpoint_url, f"s3://{bucket}/{prefix}", str(dest), str(64 * KiB)]
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("model_loader.errors CacheError no space left while " + step), proc.stdout
