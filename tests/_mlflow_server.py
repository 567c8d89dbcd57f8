"""Real MLflow tracking servers for tests (sqlite backend, one process each, loopback).

Two layouts, each started once per session on first use:

- ``mlflow_proxied_server``: artifacts proxied through the server to the moto S3 server
  (``--artifacts-destination s3://...``); artifact URIs are ``mlflow-artifacts:/...``.
- ``mlflow_s3_server``: artifacts directly in moto S3 (``--default-artifact-root s3://...
  --no-serve-artifacts``); clients read and write S3 themselves.

They need two processes because the layouts differ by server flags. Publishing helpers
log real ``mlflow.sklearn`` models and plain files, and register them with aliases.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from _s3_server import MotoServer, free_port
from model_loader import ModelRef, parse_ref

START_TIMEOUT = 120.0
IRIS = "iris"  # registered in three versions on every session server: champion -> 2, challenger -> 3


@dataclass
class MlflowServer:
    """A running ``mlflow server`` process and how to publish to it."""

    url: str
    layout: str  # "proxied" or "s3"
    bucket: str
    prefix: str
    workdir: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(repr=False)
    iris_versions: dict[int, str] = field(default_factory=dict)  # version -> storage location

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)

    def publish_files(self, name: str, files: Mapping[str, bytes], alias: str | None = "prod") -> ModelRef:
        """Log ``files`` as a run's artifacts, register them as a new version, point ``alias`` at it."""
        client = self.client()
        with tempfile.TemporaryDirectory() as tmp:
            for rel, data in files.items():
                path = Path(tmp, rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            run = client.create_run("0")
            client.log_artifacts(run.info.run_id, tmp, "model")
            client.set_terminated(run.info.run_id)
        with contextlib.suppress(Exception):  # already registered
            client.create_registered_model(name)
        mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        if alias:
            client.set_registered_model_alias(name, alias, mv.version)
            return parse_ref(f"models:/{name}@{alias}")
        return parse_ref(f"models:/{name}/{mv.version}")

    def publish_sklearn(self, name: str, seed: int, alias: str | None = None) -> int:
        """Train a tiny LogisticRegression and log it with the real ``mlflow.sklearn`` flavor."""
        import mlflow
        import mlflow.sklearn
        import numpy as np
        from sklearn.linear_model import LogisticRegression

        rng = np.random.default_rng(seed)
        x = rng.normal(size=(90, 4))
        y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
        model = LogisticRegression(max_iter=300).fit(x, y)
        with use_tracking_uri(self.url), mlflow.start_run():
            info = mlflow.sklearn.log_model(model, name="model", registered_model_name=name, input_example=x[:2])
        version = int(info.registered_model_version)
        if alias:
            self.client().set_registered_model_alias(name, alias, str(version))
        return version

    def delete_artifacts(self, storage_location: str) -> None:
        """Delete a version's artifacts from the S3 bucket behind either layout."""
        import boto3

        prefix = _s3_key_prefix(self, storage_location)
        s3 = boto3.client("s3", endpoint_url=self.env["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])]
        assert keys, f"nothing stored under s3://{self.bucket}/{prefix}"
        for key in keys:
            s3.delete_object(Bucket=self.bucket, Key=key)


def _s3_key_prefix(server: MlflowServer, location: str) -> str:
    if location.startswith("mlflow-artifacts:"):
        path = location.split(":", 1)[1].lstrip("/")
        return f"{server.prefix}/{path}".rstrip("/") + "/"
    assert location.startswith(f"s3://{server.bucket}/"), location
    return location[len(f"s3://{server.bucket}/") :].rstrip("/") + "/"


@contextlib.contextmanager
def use_tracking_uri(url: str) -> Iterator[None]:
    """mlflow's fluent API keeps a global tracking URI: set it for one block."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous = utils._tracking_uri  # None when unset; "" would mean ./mlruns
    mlflow.set_tracking_uri(url)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def server_env(moto: MotoServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        {
            "MLFLOW_S3_ENDPOINT_URL": moto.endpoint_url,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def start_mlflow_server(workdir: Path, moto: MotoServer, layout: str, *, port: int | None = None) -> MlflowServer:
    """Start ``mlflow server`` and wait (polling ``/health`` with a deadline) until it answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    bucket = f"mlflow-{layout}-{uuid.uuid4().hex[:8]}"
    prefix = "artifacts"
    moto.client().create_bucket(Bucket=bucket)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",  # the venv's mlflow, whatever PATH says
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if layout == "proxied":
        cmd += ["--artifacts-destination", f"s3://{bucket}/{prefix}"]
    elif layout == "s3":
        cmd += ["--default-artifact-root", f"s3://{bucket}/{prefix}", "--no-serve-artifacts"]
    else:
        raise ValueError(layout)
    env = server_env(moto)
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed with the process
    # its own process group: `mlflow server` runs uvicorn as a child that SIGTERM would orphan
    process = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    server = MlflowServer(url, layout, bucket, prefix, workdir, process, env)
    try:
        wait_healthy(server, START_TIMEOUT)
    except BaseException:
        stop_mlflow_server(server)
        raise
    return server


def wait_healthy(server: MlflowServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.process.returncode}:\n{_log_tail(server)}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server not healthy after {timeout}s:\n{_log_tail(server)}")
        time.sleep(0.1)


def _log_tail(server: MlflowServer) -> str:
    try:
        return (server.workdir / "server.log").read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"


def stop_mlflow_server(server: MlflowServer) -> None:
    """Terminate the server's process group (uvicorn and its workers too), then kill what lingers."""
    stop_process_group(server.process)


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + 15
        while _group_alive(proc.pid) and time.monotonic() < deadline:  # the workers exit after the parent
            time.sleep(0.05)
        if not _group_alive(proc.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def mlflow_test_env(moto_server: MotoServer) -> Iterator[None]:
    """The test process's own MLflow client writes to moto S3 (s3 layout) through this variable."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = moto_server.endpoint_url
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _session_server(layout: str, moto: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = start_mlflow_server(tmp_path_factory.mktemp(f"mlflow-{layout}"), moto, layout)
    try:
        client = server.client()
        for seed in (1, 2, 3):
            version = server.publish_sklearn(IRIS, seed)
            server.iris_versions[version] = client.get_model_version_download_uri(IRIS, str(version))
        client.set_registered_model_alias(IRIS, "champion", "2")
        client.set_registered_model_alias(IRIS, "challenger", "3")
        yield server
    finally:
        stop_mlflow_server(server)


@pytest.fixture(scope="session")
def mlflow_proxied_server(
    moto_server: MotoServer, mlflow_test_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A session MLflow server proxying artifacts to moto S3, with ``iris`` v1-3 registered."""
    yield from _session_server("proxied", moto_server, tmp_path_factory)


@pytest.fixture(scope="session")
def mlflow_s3_server(
    moto_server: MotoServer, mlflow_test_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A session MLflow server whose artifacts live directly in moto S3, with ``iris`` v1-3."""
    yield from _session_server("s3", moto_server, tmp_path_factory)


@pytest.fixture(params=["proxied", "s3"])
def mlflow_server(request: pytest.FixtureRequest) -> MlflowServer:
    """Each session server in turn."""
    server: MlflowServer = request.getfixturevalue(f"mlflow_{request.param}_server")
    return server


# -- small loopback HTTP servers --------------------------------------------------------

Handler = Callable[[BaseHTTPRequestHandler], None]


class LoopbackHttpServer:
    """A threaded HTTP/1.1 server on a free loopback port; ``handle(request)`` answers."""

    def __init__(self, handle: Handler) -> None:
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.requests.append((self.command, self.path, dict(self.headers)))
                handle(self)

            do_POST = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="loopback-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


def reply(request: BaseHTTPRequestHandler, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
    request.send_response(status)
    request.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {"Content-Type": "application/json"}).items():
        request.send_header(key, value)
    request.end_headers()
    request.wfile.write(body)


class AuthProxy(LoopbackHttpServer):
    """A reverse proxy that lets through only requests with an accepted ``Authorization``.

    ``mlflow server --app-name basic-auth`` needs Flask-WTF (the ``mlflow[auth]`` extra),
    which the test environment does not have, so the check lives here, in front of a
    real server. Anything else gets 401 with MLflow's error body.
    """

    def __init__(self, upstream: str, *, users: Mapping[str, str], tokens: tuple[str, ...]) -> None:
        accepted = {f"Bearer {t}" for t in tokens}
        accepted |= {"Basic " + base64.b64encode(f"{u}:{p}".encode()).decode() for u, p in users.items()}
        target = urllib.parse.urlsplit(upstream)

        def handle(request: BaseHTTPRequestHandler) -> None:
            if request.headers.get("Authorization") not in accepted:
                body = b'{"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."}'
                reply(request, 401, body, {"Content-Type": "application/json", "WWW-Authenticate": "Basic"})
                return
            length = int(request.headers.get("Content-Length") or 0)
            body_in = request.rfile.read(length) if length else None
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                headers = {k: v for k, v in request.headers.items() if k.lower() not in ("authorization", "host")}
                conn.request(request.command, request.path, body=body_in, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                reply(request, resp.status, data, {"Content-Type": resp.getheader("Content-Type", "")})
            finally:
                conn.close()

        super().__init__(handle)


@pytest.fixture(scope="session")
def mlflow_auth_proxy(mlflow_proxied_server: MlflowServer) -> Iterator[AuthProxy]:
    """The proxied session server behind a proxy accepting ``alice:wonderland`` or token ``t0k3n``."""
    proxy = AuthProxy(mlflow_proxied_server.url, users={"alice": "wonderland"}, tokens=("t0k3n",))
    yield proxy
    proxy.close()
