"""Large files continue where an earlier attempt stopped; bodies altered in flight are downloaded again.

Real moto server, real fault proxy, default settings. A large file's contiguous written
prefix is reported to ``FetchContext.file_progress`` as it grows (the cache journals it);
the next attempt, in this process or another, gets it in ``FetchContext.partial`` and asks
the store only for the rest, while the whole file is still hashed and checked. The proxy
counts the body bytes it really sends (``FaultProxy.body_bytes``): what an origin bills.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _fault_proxy import FaultProxy, Seen
from _s3_server import make_bucket, put_files
from helpers import Sleeps, read_tree, wait_for
from model_loader import CacheConfig, LoaderConfig, ResilientLoader
from model_loader._deadline import FetchContext
from model_loader._uri import parse_ref
from model_loader.errors import AllSourcesFailedError, IntegrityError
from model_loader.sources.s3 import S3Source

KiB = 1024
MiB = 1024 * KiB
BIG = "weights.bin"


@pytest.fixture(scope="module")
def bucket(s3_client: Any) -> str:
    return make_bucket(s3_client, "resume")


@pytest.fixture(scope="module")
def model(s3_client: Any, bucket: str) -> tuple[str, dict[str, bytes]]:
    """17 MiB of weights (a large file: preallocated, hashed by the hasher) and a few small files.

    Under 16 MiB + the 2 MiB a stream must show before its rate is trusted, so ``"auto"``
    never splits it: each fault below hits the one GET in flight, whatever the machine's load.
    """
    files = {BIG: os.urandom(17 * MiB)}
    files.update({f"config/part-{i}.json": os.urandom(3 * KiB + i) for i in range(4)})
    put_files(s3_client, bucket, "model/", files)
    return f"s3://{bucket}/model/", files


@pytest.fixture
def source(fault_proxy: FaultProxy) -> Iterator[S3Source]:
    src = S3Source(endpoint_url=fault_proxy.url)  # default settings
    yield src
    src.close()


def big_gets(proxy: FaultProxy, since: int = 0) -> list[Seen]:
    return [s for s in proxy.requests("GET")[since:] if s.path.endswith("/" + BIG)]


def start_of(seen: Seen) -> int:
    """First byte a GET asked for (0 without a Range header)."""
    return 0 if seen.range is None else int(seen.range.removeprefix("bytes=").split("-")[0])


def small_bytes(files: dict[str, bytes]) -> int:
    return sum(len(b) for p, b in files.items() if p != BIG)


# -- the source, handed a prefix -------------------------------------------------------------


@pytest.mark.parametrize("split", [{}, {"range_split": "eager", "part_size": 1 * MiB}], ids=["default", "eager-1MiB"])
def test_a_journalled_prefix_is_continued_and_the_whole_file_checked(
    model: tuple[str, dict[str, bytes]], fault_proxy: FaultProxy, tmp_path: Path, split: dict[str, Any]
) -> None:
    uri, files = model
    data = files[BIG]
    source = S3Source(endpoint_url=fault_proxy.url, **split)  # the rest split in ranged parts, or not
    resolved = source.resolve(parse_ref(uri))
    prefix = 7 * MiB + 123
    (tmp_path / BIG).write_bytes(data[:prefix])
    before = fault_proxy.body_bytes
    with FetchContext(partial={BIG: prefix}).applied():
        manifest = source.fetch(resolved, tmp_path)
    source.close()
    assert read_tree(tmp_path) == files
    entry = next(e for e in manifest.files if e.path == BIG)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()  # hashed from byte 0: the prefix read back
    assert entry.verified == "s3-crc32"
    gets = big_gets(fault_proxy)
    assert min(start_of(s) for s in gets) == prefix
    if not split:  # (a split cuts a streaming GET short: what the socket buffers held is sent for nothing)
        assert fault_proxy.body_bytes - before == len(data) - prefix + small_bytes(files)


def test_a_prefix_that_is_not_the_objects_is_caught_and_the_file_downloaded_again(
    model: tuple[str, dict[str, bytes]], source: S3Source, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    uri, files = model
    data = files[BIG]
    resolved = source.resolve(parse_ref(uri))
    prefix = 5 * MiB
    wrong = bytearray(data[:prefix])
    wrong[4321] ^= 0x01  # what a bad disk or an earlier altered body left
    (tmp_path / BIG).write_bytes(bytes(wrong))
    with FetchContext(partial={BIG: prefix}).applied():
        manifest = source.fetch(resolved, tmp_path)
    assert read_tree(tmp_path) == files
    assert next(e for e in manifest.files if e.path == BIG).verified == "s3-crc32"
    starts = [start_of(s) for s in big_gets(fault_proxy)]
    assert starts[0] == prefix
    assert 0 in starts[1:]


def test_a_prefix_longer_than_the_file_on_disk_continues_where_the_bytes_end(
    model: tuple[str, dict[str, bytes]], source: S3Source, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    uri, files = model
    data = files[BIG]
    resolved = source.resolve(parse_ref(uri))
    (tmp_path / BIG).write_bytes(data[: 3 * MiB])
    with FetchContext(partial={BIG: 9 * MiB}).applied():
        source.fetch(resolved, tmp_path)
    assert read_tree(tmp_path) == files
    assert min(start_of(s) for s in big_gets(fault_proxy)) == 3 * MiB


def test_the_written_prefix_is_reported_as_it_grows_not_per_read(
    model: tuple[str, dict[str, bytes]], source: S3Source, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    uri, files = model
    data = files[BIG]
    resolved = source.resolve(parse_ref(uri))
    fault_proxy.bandwidth = 16 * MiB  # about a second per copy: room for several reports
    reported: list[int] = []

    def progress(path: str, n: int) -> None:
        assert path == BIG
        with open(tmp_path / BIG, "rb") as f:  # what is reported is on disk, from byte 0
            assert hashlib.sha256(f.read(n)).digest() == hashlib.sha256(data[:n]).digest()
        reported.append(n)

    with FetchContext(file_progress=progress).applied():
        source.fetch(resolved, tmp_path)
    assert read_tree(tmp_path) == files
    assert reported, "no prefix reported"
    assert reported == sorted(set(reported))
    assert reported[-1] < len(data)
    gaps = [b - a for a, b in zip([0, *reported], reported, strict=False)]
    assert min(gaps) >= 1 * MiB  # a journal line per MiB at most, not per 256 KiB read


# -- through the loader: a fetch cut, retried -------------------------------------------------


def test_a_cut_fetch_retried_by_the_loader_asks_only_for_the_rest(
    model: tuple[str, dict[str, bytes]],
    source: S3Source,
    fault_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    uri, files = model
    data = files[BIG]
    # every request the fetch may make for the big file is cut half-way (request_attempts, 5):
    # the file is given up, the fetch fails, and the loader's next attempt continues it
    fault_proxy.inject("truncate", count=5, match=lambda s: s.method == "GET" and s.path.endswith("/" + BIG))
    sleeps = Sleeps()
    config = LoaderConfig(cache=CacheConfig(dir=tmp_path / "cache"))
    before = fault_proxy.body_bytes
    with ResilientLoader([(source, uri)], config=config, sleep=sleeps) as loader:
        result = loader.fetch()
    assert read_tree(result.path) == files
    assert sleeps, "the loader did not retry"
    gets = big_gets(fault_proxy)
    assert len(gets) == 6
    assert fault_proxy.faults["truncate"] == 5
    reached = 0  # each GET starts exactly where the one before was cut, the loader's retry included
    for seen in gets:
        assert start_of(seen) == reached
        reached += (len(data) - reached) // 2
    pulled = fault_proxy.body_bytes - before - small_bytes(files)
    print(f"\ncut 5 times, retried by the loader: {pulled / MiB:.2f} MiB pulled for a {len(data) / MiB:.0f} MiB file")
    assert len(data) <= pulled < len(data) + 64 * KiB  # each byte once (and a few listing bodies)


def test_bodies_altered_in_flight_are_downloaded_again_through_the_loader(
    model: tuple[str, dict[str, bytes]], source: S3Source, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    uri, files = model
    # the first GET of each file arrives with a byte flipped
    fault_proxy.inject("corrupt", count=len(files), match=lambda s: s.method == "GET" and "list-type" not in s.query)
    config = LoaderConfig(cache=CacheConfig(dir=tmp_path / "cache"))
    with ResilientLoader([(source, uri)], config=config, sleep=Sleeps()) as loader:
        result = loader.fetch()
    assert read_tree(result.path) == files
    assert result.verified
    assert not result.degraded
    assert fault_proxy.faults["corrupt"] == len(files)


def test_an_object_that_never_matches_its_checksum_fails_after_a_bounded_number_of_downloads(
    model: tuple[str, dict[str, bytes]], source: S3Source, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    uri, files = model
    data = files[BIG]
    decoy = os.urandom(len(data))  # what the store always sends for it: the same length, other bytes
    fault_proxy.inject(
        "substitute", count=10_000, match=lambda s: s.method == "GET" and s.path.endswith("/" + BIG), payload=decoy
    )
    cache = tmp_path / "cache"
    config = LoaderConfig(cache=CacheConfig(dir=cache))
    with (
        ResilientLoader([(source, uri)], config=config, sleep=Sleeps()) as loader,
        pytest.raises(AllSourcesFailedError) as info,
    ):
        loader.fetch()
    assert isinstance(info.value.failures[0][1], IntegrityError)
    downloads = [s for s in big_gets(fault_proxy) if start_of(s) == 0]
    assert len(downloads) == 5  # request_attempts, once: the loader does not retry an IntegrityError
    assert not [p for p in (cache / "entries").rglob("*") if p.is_file()]  # nothing reached the cache


# -- another process continues a killed one ---------------------------------------------------

_CHILD = """
import json, sys
from model_loader import CacheConfig, LoaderConfig, ResilientLoader
with ResilientLoader(sys.argv[1], config=LoaderConfig(cache=CacheConfig(dir=sys.argv[2]))) as loader:
    result = loader.fetch()
print(json.dumps({"path": str(result.path), "verified": result.verified}), flush=True)
"""


def child(uri: str, cache: Path, proxy: FaultProxy) -> subprocess.Popen[str]:
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": proxy.url}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, uri, str(cache)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def journalled_prefix(cache: Path) -> int:
    """The largest prefix of the big file journalled in any staging directory of ``cache``."""
    best = 0
    for journal in cache.glob(".staging/*/journal.jsonl"):
        for line in journal.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written
            if isinstance(record, dict) and record.get("path") == BIG and isinstance(record.get("prefix"), int):
                best = max(best, record["prefix"])
    return best


def test_a_process_killed_mid_download_is_continued_by_the_next(
    model: tuple[str, dict[str, bytes]], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    uri, files = model
    data = files[BIG]
    cache = tmp_path / "cache"
    fault_proxy.bandwidth = 4 * MiB  # per connection: the download takes seconds
    victim = child(uri, cache, fault_proxy)
    try:
        wait_for(lambda: journalled_prefix(cache) >= 4 * MiB, timeout=120, what="a journalled prefix of 4 MiB")
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    killed_at = len(fault_proxy.requests())
    victim_pulled = fault_proxy.body_bytes
    prefix = journalled_prefix(cache)

    survivor = child(uri, cache, fault_proxy)
    out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err[-2000:]
    result = json.loads(out)
    assert read_tree(Path(result["path"])) == files
    assert result["verified"]
    starts = [start_of(s) for s in big_gets(fault_proxy, killed_at)]
    assert min(starts) == prefix > 0  # continued at the journalled prefix, not from byte 0
    survivor_pulled = fault_proxy.body_bytes - victim_pulled
    assert survivor_pulled <= len(data) - prefix + small_bytes(files) + 64 * KiB
    total = sum(len(b) for b in files.values())
    print(
        f"\nkilled at a {prefix / MiB:.1f} MiB prefix: victim pulled {victim_pulled / MiB:.1f} MiB, "
        f"survivor {survivor_pulled / MiB:.1f} MiB; {(victim_pulled + survivor_pulled) / total:.2f} copies"
    )
