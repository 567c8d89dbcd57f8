"""P2P distribution: sources honour the standard proxy variables, so pointing nodes at a
P2P daemon's proxy (Dragonfly's dfdaemon) makes N nodes pull about one copy from the origin.

A caching forward proxy stands in for the daemon; each "node" is a process with its own
cache directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from _caching_proxy import CachingProxy
from _mlflow_server import MlflowServer
from _s3_server import MotoServer, make_bucket, put_files
from helpers import read_tree

FILES = {"weights.bin": os.urandom(3 * 1024 * 1024), **{f"conf/{i}.json": b"{}" * (i + 1) for i in range(10)}}


@pytest.fixture
def daemon() -> Iterator[CachingProxy]:
    proxy = CachingProxy().start()
    yield proxy
    proxy.stop()


def _node(uri: str, cache: Path, env: dict[str, str]) -> dict[str, object]:
    cmd = [sys.executable, "-m", "model_loader", "fetch", "--json", "--cache-dir", str(cache), uri]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_three_nodes_behind_one_p2p_proxy_pull_one_copy_of_an_s3_model(
    moto_server: MotoServer, daemon: CachingProxy, tmp_path: Path
) -> None:
    client = moto_server.client()
    bucket = make_bucket(client, "p2p")
    put_files(client, bucket, "m/", FILES)
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("NO_PROXY", "HTTPS_PROXY")}
    env.update(HTTP_PROXY=daemon.url, AWS_ENDPOINT_URL_S3=moto_server.endpoint_url)
    served = [_node(f"s3://{bucket}/m/", tmp_path / f"node-{i}", env) for i in range(3)]
    for out in served:
        assert read_tree(Path(str(out["path"]))) == FILES
        assert out["verified"] is True
    size = sum(len(b) for b in FILES.values())
    assert daemon.served_from_cache >= 2 * len(FILES)  # nodes 2 and 3 got every file from the daemon
    assert daemon.origin_bytes < 1.2 * size  # about one copy from the origin (plus listings)


@pytest.mark.slow
def test_registry_and_artifact_traffic_go_through_the_p2p_proxy(
    mlflow_proxied_server: MlflowServer, daemon: CachingProxy, tmp_path: Path
) -> None:
    name = f"p2p-{os.urandom(4).hex()}"
    ref = mlflow_proxied_server.publish_files(name, FILES, "prod")
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("NO_PROXY", "HTTPS_PROXY")}
    env.update(HTTP_PROXY=daemon.url, MLFLOW_TRACKING_URI=mlflow_proxied_server.url)
    env.update({k: v for k, v in mlflow_proxied_server.env.items() if k.startswith(("AWS_", "MLFLOW_S3"))})
    served = [_node(ref.uri, tmp_path / f"node-{i}", env) for i in range(3)]
    for out in served:
        assert read_tree(Path(str(out["path"]))) == FILES
    assert daemon.requests >= 3 * (2 + len(FILES))  # every node's registry calls and downloads went through it
    assert daemon.served_from_cache >= 2  # the weights of nodes 2 and 3 came from the daemon
    assert daemon.origin_bytes < 1.2 * sum(len(b) for b in FILES.values())
