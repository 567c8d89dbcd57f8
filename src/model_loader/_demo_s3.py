"""The S3 step of ``model-loader demo``: moto's in-process S3 mock, no server, no network.

A toy model is uploaded to a bucket and loaded through :class:`ResilientLoader` cold, warm
(disk cache hit after re-listing the prefix), after it is overwritten (a new version is
resolved and fetched), and with the store unreachable (last-known-good, degraded).
moto's in-process mock is fine for a demo; the tests use a real moto server over HTTP.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from model_loader._types import FetchResult

__all__ = ["run_s3_demo"]

Report = Callable[[str, "FetchResult | None", float, str], None]
_BUCKET = "demo-models"
_ENDPOINT = "https://s3.us-east-1.amazonaws.com"  # intercepted by the mock: nothing leaves the process


def _files(weights: list[float]) -> dict[str, bytes]:
    return {
        "model.json": json.dumps({"kind": "linear", "weights": weights, "bias": 0.1}).encode(),
        "README.txt": b"a toy linear model\n",
    }


@contextmanager
def _mock() -> Iterator[Any]:
    from moto import mock_aws

    with mock_aws():
        yield


def run_s3_demo(work: Path, cache_dir: Path, report: Report) -> None:
    """Upload a toy model to a mocked bucket and load it cold, warm, moved and degraded."""
    try:
        import boto3

        from model_loader.config import CacheConfig, LoaderConfig, RetryPolicy
        from model_loader.loader import ResilientLoader
        from model_loader.sources.s3 import S3Source

        mock = _mock()
        mock.__enter__()
    except ImportError:
        report("s3: skipped", None, 0.0, "install model-loader[demo] (or [test]) for the S3 step")
        return
    try:
        # explicit fake credentials: no credential chain (and no metadata endpoint) is consulted
        session = boto3.session.Session(aws_access_key_id="demo", aws_secret_access_key="demo", region_name="us-east-1")
        client = session.client("s3", endpoint_url=_ENDPOINT)
        client.create_bucket(Bucket=_BUCKET)

        def publish(weights: list[float]) -> None:
            for name, data in _files(weights).items():
                client.put_object(Bucket=_BUCKET, Key=f"toy/{name}", Body=data)

        from botocore.config import Config
        from botocore.exceptions import EndpointConnectionError

        # the source's own client, so the demo can cut its network (one attempt: the loader retries)
        source_client = session.client("s3", endpoint_url=_ENDPOINT, config=Config(retries={"total_max_attempts": 1}))
        source = S3Source(client=source_client, max_concurrency=4)

        def network_down(**_: Any) -> None:
            raise EndpointConnectionError(endpoint_url=_ENDPOINT)

        uri = f"s3://{_BUCKET}/toy/"
        config = LoaderConfig(
            cache=CacheConfig(dir=cache_dir),
            retry=RetryPolicy(attempts=2, initial_backoff=0.05, max_backoff=0.1, jitter=0.0),
        )

        def load(step: str, note: str = "") -> None:
            with ResilientLoader([(source, uri)], config=config) as loader:
                t0 = time.perf_counter()
                result = loader.fetch()
                elapsed = time.perf_counter() - t0
            weights = json.loads((result.path / "model.json").read_text())["weights"]
            report(step, result, elapsed, note or f"weights {weights}")

        publish([0.4, -1.2, 0.7])
        load("s3: cold")
        load("s3: warm, prefix re-listed, disk hit")
        publish([0.5, -1.0, 0.9])
        load("s3: overwritten: new version")
        source_client.meta.events.register("before-call.s3", network_down)
        load("s3: unreachable: last-known-good", "connection errors: served from cache (degraded)")
        source.close()
    finally:
        mock.__exit__(None, None, None)
