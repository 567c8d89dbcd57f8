"""The load's deadline bounds every S3 request: stores that trickle, stall or never answer.

botocore's read timeout bounds one socket read, so a store sending one byte a second
never times out on its own. These tests run the S3 source (default settings) against the
fault proxy's trickles (headers included, or body only) and stalls, and against a black
hole that accepts connections and never reads, under a short budget: every resolve and
fetch ends within the budget plus a second, with ``SourceTimeoutError``, and leaves no
download thread behind.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _fault_proxy import BlackHole, FaultProxy, Seen
from _s3_server import make_bucket, put_files
from helpers import Sleeps, wait_for
from model_loader import CacheConfig, LoaderConfig, ResilientLoader
from model_loader._deadline import Deadline
from model_loader._types import ResolvedModel
from model_loader._uri import parse_ref
from model_loader.errors import AllSourcesFailedError, SourceTimeoutError, SourceUnavailableError
from model_loader.sources.s3 import S3Source

KiB = 1024
BUDGET = 3.0
SLACK = 1.0  # the promise: cut within the budget + 1 s


@pytest.fixture(scope="module")
def bucket(s3_client: Any) -> str:
    name = make_bucket(s3_client, "deadline")
    put_files(s3_client, bucket=name, prefix="m/", files=MODEL)
    return name


MODEL = {"MLmodel": b"flavors: {}\n", "weights.bin": os.urandom(300 * KiB), "config.json": b"{}"}


def is_list(seen: Seen) -> bool:
    return seen.method == "GET" and "list-type=2" in seen.query


def is_object_get(seen: Seen) -> bool:
    return seen.method == "GET" and "list-type" not in seen.query


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    with BlackHole() as hole:
        yield hole


def download_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("model-loader-s3")]


@pytest.fixture
def no_leaked_threads() -> Iterator[None]:
    before = set(download_threads())
    yield
    wait_for(lambda: not set(download_threads()) - before, timeout=SLACK, what="the watchdog to stop")


def within_budget(call: Callable[[], object], budget: float = BUDGET) -> tuple[BaseException, float]:
    """Run ``call`` under a ``budget``-second deadline; the error it raised and the seconds it took."""
    started = time.monotonic()
    with Deadline(budget).applied(), pytest.raises(SourceUnavailableError) as info:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < budget + SLACK, f"took {elapsed:.2f}s for a {budget}s budget"
    assert not [n for n in download_threads() if n != "model-loader-s3-watchdog"]  # workers joined
    return info.value, elapsed


@pytest.mark.parametrize("kind", ["trickle", "trickle_body", "stall"])
def test_a_listing_that_trickles_or_stalls_is_cut_by_the_budget(
    fault_proxy: FaultProxy, bucket: str, kind: str, no_leaked_threads: None
) -> None:
    src = S3Source(endpoint_url=fault_proxy.url)  # read_timeout 60 s: only the budget can cut these
    fault_proxy.stall_seconds = 30
    fault_proxy.inject(kind, count=100, match=is_list)
    error, elapsed = within_budget(lambda: src.resolve(parse_ref(f"s3://{bucket}/m/")))
    assert isinstance(error, SourceTimeoutError)
    assert elapsed > BUDGET - 0.5  # cut by the budget, not by some error
    assert fault_proxy.faults[kind] == 1  # a timeout is never re-issued inside the step
    src.close()


@pytest.mark.parametrize(
    ("kind", "target"),  # MLmodel: one GET; weights.bin: a HEAD, then ranged GETs split eagerly
    [
        ("trickle", "MLmodel"),
        ("trickle", "weights.bin"),
        ("trickle_body", "MLmodel"),
        ("trickle_body", "weights.bin"),
        ("stall", "MLmodel"),
        ("stall_body", "weights.bin"),
    ],
)
def test_a_download_that_trickles_or_stalls_is_cut_by_the_budget(
    fault_proxy: FaultProxy, bucket: str, tmp_path: Path, kind: str, target: str, no_leaked_threads: None
) -> None:
    src = S3Source(endpoint_url=fault_proxy.url, part_size=64 * KiB, range_split="eager")
    resolved = src.resolve(parse_ref(f"s3://{bucket}/m/"))
    fault_proxy.stall_seconds = 30
    fault_proxy.inject(kind, count=100, match=lambda s: is_object_get(s) and s.path.endswith("/" + target))
    error, _ = within_budget(lambda: src.fetch(resolved, tmp_path))
    assert isinstance(error, SourceTimeoutError)
    assert fault_proxy.faults[kind] >= 1
    src.close()


def test_a_black_hole_is_cut_by_the_budget(black_hole: BlackHole, bucket: str, no_leaked_threads: None) -> None:
    src = S3Source(endpoint_url=black_hole.url)
    error, _ = within_budget(lambda: src.resolve(parse_ref(f"s3://{bucket}/m/")))
    assert isinstance(error, SourceTimeoutError)
    assert black_hole.accepted >= 1
    src.close()


def test_a_black_hole_is_cut_at_the_read_timeout_when_it_is_shorter(black_hole: BlackHole, bucket: str) -> None:
    src = S3Source(endpoint_url=black_hole.url, read_timeout=1.0)
    error, elapsed = within_budget(lambda: src.resolve(parse_ref(f"s3://{bucket}/m/")), budget=30.0)
    assert isinstance(error, SourceTimeoutError)
    assert elapsed < 1.0 + SLACK
    src.close()


def test_a_fetch_from_a_black_hole_is_cut_by_the_budget(
    moto_server: Any, black_hole: BlackHole, bucket: str, tmp_path: Path, no_leaked_threads: None
) -> None:
    resolved = S3Source(endpoint_url=moto_server.endpoint_url).resolve(parse_ref(f"s3://{bucket}/m/"))
    src = S3Source(endpoint_url=black_hole.url, part_size=64 * KiB)
    hole = dataclasses.replace(resolved, source_id=src.identity)  # the same objects, behind the black hole
    error, _ = within_budget(lambda: src.fetch(hole, tmp_path))
    assert isinstance(error, SourceTimeoutError)
    src.close()


def test_backoff_before_a_re_issue_never_outlasts_the_budget(
    fault_proxy: FaultProxy, bucket: str, tmp_path: Path, no_leaked_threads: None
) -> None:
    src = S3Source(endpoint_url=fault_proxy.url, request_backoff=60.0)  # the subject: a backoff longer than the budget
    resolved = src.resolve(parse_ref(f"s3://{bucket}/m/"))
    fault_proxy.inject("503", count=100, match=is_list)
    error, _ = within_budget(lambda: src.resolve(parse_ref(f"s3://{bucket}/m/")))
    assert "SlowDown" in str(error)
    fault_proxy.clear()
    fault_proxy.inject("500", count=100, match=lambda s: is_object_get(s) and s.path.endswith("/MLmodel"))
    error, _ = within_budget(lambda: src.fetch(resolved, tmp_path))
    assert "InternalError" in str(error)
    src.close()


def test_the_loader_deadline_cuts_a_trickling_store(
    fault_proxy: FaultProxy, bucket: str, tmp_path: Path, no_leaked_threads: None
) -> None:
    src = S3Source(endpoint_url=fault_proxy.url)
    fault_proxy.stall_seconds = 30
    fault_proxy.inject("trickle_body", count=1000, match=is_object_get)
    config = LoaderConfig(cache=CacheConfig(dir=tmp_path / "cache"), deadline=BUDGET)
    started = time.monotonic()
    with (
        ResilientLoader([(src, f"s3://{bucket}/m/")], config=config, sleep=Sleeps()) as loader,
        pytest.raises(AllSourcesFailedError) as info,
    ):
        loader.fetch()
    assert time.monotonic() - started < BUDGET + SLACK
    assert isinstance(info.value.failures[0][1], SourceTimeoutError)
    src.close()


def test_an_unlimited_deadline_starts_no_watchdog(moto_server: Any, bucket: str, tmp_path: Path) -> None:
    src = S3Source(endpoint_url=moto_server.endpoint_url)
    resolved: ResolvedModel = src.resolve(parse_ref(f"s3://{bucket}/m/"))
    src.fetch(resolved, tmp_path)
    assert "model-loader-s3-watchdog" not in download_threads()
    src.close()
