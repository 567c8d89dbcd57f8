"""The MLflow registry source against real ``mlflow server`` processes (two layouts) and
small loopback stubs for the failures a real server will not produce on demand."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from _mlflow_server import IRIS, AuthProxy, LoopbackHttpServer, MlflowServer, reply
from _s3_server import free_port
from model_loader import (
    AccessDeniedError,
    Deadline,
    IntegrityError,
    InvalidResponseError,
    MissingDependencyError,
    ModelNotFoundError,
    ModelRef,
    SourceError,
    SourceSettings,
    SourceTimeoutError,
    SourceUnavailableError,
    parse_ref,
)
from model_loader.sources.mlflow import MlflowRegistrySource
from model_loader.sources.mlflow import _errors as mlflow_errors
from model_loader.sources.mlflow import _http as mlflow_http
from model_loader.sources.mlflow import _source as mlflow_source_module
from model_loader.sources.mlflow._errors import HttpStatusError
from model_loader.testing.conformance import Publish, SourceConformanceTests

pytestmark = pytest.mark.slow


def make_source(url: str, **kwargs: object) -> MlflowRegistrySource:
    kwargs.setdefault("connect_timeout", 5.0)
    kwargs.setdefault("read_timeout", 30.0)
    kwargs.setdefault("environ", {})
    return MlflowRegistrySource(tracking_uri=url, **kwargs)  # type: ignore[arg-type]


def s3_env(server: MlflowServer) -> dict[str, str]:
    return {"MLFLOW_S3_ENDPOINT_URL": server.env["MLFLOW_S3_ENDPOINT_URL"]}


def fetch_to(source: MlflowRegistrySource, ref: str | ModelRef, dest: Path) -> dict[str, str]:
    resolved = source.resolve(parse_ref(ref) if isinstance(ref, str) else ref)
    dest.mkdir(parents=True, exist_ok=True)
    return {e.path: e.sha256 or "" for e in source.fetch(resolved, dest).files}


# -- conformance, once per layout ---------------------------------------------------------


class _Conformance(SourceConformanceTests):
    server_fixture = ""

    @pytest.fixture
    def server(self, request: pytest.FixtureRequest) -> MlflowServer:
        server: MlflowServer = request.getfixturevalue(self.server_fixture)
        return server

    @pytest.fixture
    def source(self, server: MlflowServer) -> Iterator[MlflowRegistrySource]:
        src = make_source(server.url, environ=s3_env(server))
        yield src
        src.close()

    @pytest.fixture
    def publish(self, server: MlflowServer) -> Publish:
        def publish(name: str, files: Mapping[str, bytes], alias: str) -> ModelRef:
            return server.publish_files(name, files, alias)

        return publish

    @pytest.fixture
    def missing_ref(self) -> ModelRef:
        return parse_ref("models:/no-such-model-anywhere@prod")

    @pytest.fixture
    def unavailable_source(self) -> Iterator[MlflowRegistrySource]:
        src = make_source(f"http://127.0.0.1:{free_port()}")
        yield src
        src.close()


class TestMlflowConformanceProxied(_Conformance):
    server_fixture = "mlflow_proxied_server"


class TestMlflowConformanceS3(_Conformance):
    server_fixture = "mlflow_s3_server"


# -- resolve ------------------------------------------------------------------------------


@pytest.fixture
def source(mlflow_server: MlflowServer) -> Iterator[MlflowRegistrySource]:
    src = make_source(
        mlflow_server.url, environ={"MLFLOW_S3_ENDPOINT_URL": mlflow_server.env["MLFLOW_S3_ENDPOINT_URL"]}
    )
    yield src
    src.close()


@pytest.mark.parametrize(
    ("uri", "version"),
    [
        ("models:/iris@champion", 2),
        ("models:/iris@challenger", 3),
        ("models:/iris/1", 1),
        ("models:/iris/latest", 3),
    ],
)
def test_resolve_pins_name_version_and_storage_location(
    source: MlflowRegistrySource, mlflow_server: MlflowServer, uri: str, version: int
) -> None:
    resolved = source.resolve(parse_ref(uri))
    assert resolved.version == f"{IRIS}/{version}"
    assert resolved.source_id == source.identity == f"mlflow+{mlflow_server.url}"
    meta = resolved.meta
    assert meta["name"] == IRIS
    assert meta["version"] == str(version)
    assert meta["storage_location"] == mlflow_server.iris_versions[version]
    assert meta["run_id"]
    expected_scheme = "mlflow-artifacts:" if mlflow_server.layout == "proxied" else "s3:"
    assert meta["storage_location"].startswith(expected_scheme)


def test_stage_reference_resolves_and_warns_once(
    source: MlflowRegistrySource, mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = mlflow_server.client()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client.transition_model_version_stage(IRIS, "1", "Staging")
    monkeypatch.setattr(mlflow_source_module, "_stage_warned", set())
    with pytest.warns(DeprecationWarning, match="stages are deprecated"):
        assert source.resolve(parse_ref("models:/iris/staging")).version == f"{IRIS}/1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert source.resolve(parse_ref("models:/iris/Staging")).version == f"{IRIS}/1"
    with pytest.raises(ModelNotFoundError):
        source.resolve(parse_ref("models:/iris/Archived"))


def test_logged_model_reference(source: MlflowRegistrySource, tmp_path: Path) -> None:
    by_alias = source.resolve(parse_ref("models:/iris@champion"))
    model_id = by_alias.meta["storage_location"].rstrip("/").split("/")[-2]
    assert model_id.startswith("m-")
    resolved = source.resolve(parse_ref(f"models:/{model_id}"))
    assert resolved.version == model_id
    assert resolved.meta["storage_location"] == by_alias.meta["storage_location"]
    assert source.previous_versions(resolved, 3) == []
    files = fetch_to(source, f"models:/{model_id}", tmp_path / "m")
    assert "MLmodel" in files


@pytest.mark.parametrize(
    "uri", ["models:/no-such-model@champion", "models:/iris@no-such-alias", "models:/iris/99", "models:/m-0123abcd"]
)
def test_unknown_model_alias_version_raise_model_not_found(source: MlflowRegistrySource, uri: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        source.resolve(parse_ref(uri))
    assert info.value.scheme == "models"
    assert info.value.ref == uri


def test_deleted_version_is_not_found_and_skipped_by_history(
    source: MlflowRegistrySource, mlflow_server: MlflowServer
) -> None:
    name = f"deleted-{os.urandom(4).hex()}"
    for seed in "abc":
        mlflow_server.publish_files(name, {"weights.bin": seed.encode() * 100}, alias=None)
    mlflow_server.client().delete_model_version(name, "2")
    with pytest.raises(ModelNotFoundError):
        source.resolve(parse_ref(f"models:/{name}/2"))
    latest = source.resolve(parse_ref(f"models:/{name}/3"))
    assert [r.version for r in source.previous_versions(latest, 5)] == [f"{name}/1"]


def test_previous_versions_newest_first_with_limit(source: MlflowRegistrySource) -> None:
    latest = source.resolve(parse_ref("models:/iris/3"))
    assert [r.version for r in source.previous_versions(latest, 5)] == [f"{IRIS}/2", f"{IRIS}/1"]
    assert [r.version for r in source.previous_versions(latest, 1)] == [f"{IRIS}/2"]
    older = source.previous_versions(latest, 1)[0]
    assert older.ref.uri == f"models:/{IRIS}/2"
    assert older.meta["storage_location"]


# -- fetch --------------------------------------------------------------------------------


def test_fetch_sklearn_model_hashes_and_loads(
    source: MlflowRegistrySource, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    dest = tmp_path / "model"
    files = fetch_to(source, "models:/iris@champion", dest)
    assert {"MLmodel", "requirements.txt"} <= files.keys()
    for rel, sha in files.items():
        assert hashlib.sha256((dest / rel).read_bytes()).hexdigest() == sha
    import mlflow.pyfunc
    import numpy as np

    model = mlflow.pyfunc.load_model(str(dest))
    assert model.predict(np.zeros((3, 4))).shape == (3,)


def test_include_exclude_globs(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    src = make_source(
        mlflow_server.url,
        include=("MLmodel", "*.txt", "nested/*"),
        exclude=("*.yaml", "empty.txt"),
        environ=s3_env(mlflow_server),
    )
    files = {"MLmodel": b"m", "a.yaml": b"y", "empty.txt": b"", "keep.txt": b"k", "nested/deep/w.bin": b"w"}
    ref = mlflow_server.publish_files(f"globs-{os.urandom(4).hex()}", files, "prod")
    assert set(fetch_to(src, ref, tmp_path / "d")) == {"MLmodel", "keep.txt", "nested/deep/w.bin"}
    src.close()


def test_large_multipart_uploaded_artifact(
    source: MlflowRegistrySource, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """40 MiB: MLflow uploads it in parts (boto3's 8 MiB threshold), so S3 keeps a composite checksum."""
    big = os.urandom(40 * 1024 * 1024)
    ref = mlflow_server.publish_files(f"large-{os.urandom(4).hex()}", {"weights.bin": big, "MLmodel": b"m"}, "prod")
    files = fetch_to(source, ref, tmp_path / "d")
    assert files["weights.bin"] == hashlib.sha256(big).hexdigest()


@pytest.mark.parametrize("presigned", [True, False], ids=["presigned-urls", "through-the-server"])
def test_proxied_artifacts_with_and_without_presigned_urls(
    mlflow_proxied_server: MlflowServer, presigned: bool, tmp_path: Path
) -> None:
    src = make_source(mlflow_proxied_server.url)
    src._stores.presign.enabled = presigned
    files = {"MLmodel": b"m", "nested/a.bin": os.urandom(3000), "empty.txt": b""}
    ref = mlflow_proxied_server.publish_files(f"presign-{os.urandom(4).hex()}", files, "prod")
    got = fetch_to(src, ref, tmp_path / "d")
    assert got == {p: hashlib.sha256(b).hexdigest() for p, b in files.items()}
    assert src._stores.presign.enabled is presigned
    src.close()


@pytest.mark.parametrize("storage", ["refused", "403", "404"])
def test_presigned_url_failures(
    mlflow_proxied_server: MlflowServer, storage: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Storage the client cannot reach or may not read: stream through the server; gone: not found."""
    status = int(storage) if storage.isdigit() else 0
    storage_stub = LoopbackHttpServer(lambda req: reply(req, status, b"<Error/>", {"Content-Type": "text/xml"}))
    storage_url = f"http://127.0.0.1:{free_port()}" if storage == "refused" else storage_stub.url

    def handle(req: BaseHTTPRequestHandler) -> None:
        if "/mlflow-artifacts/presigned/" in req.path:
            body = {"url": f"{storage_url}/bucket/key?X-Amz-Signature=s3cr3t", "headers": {}}
            reply(req, 200, json.dumps(body).encode())
            return
        conn = http.client.HTTPConnection("127.0.0.1", mlflow_proxied_server.port, timeout=30)
        conn.request("GET", req.path)
        resp = conn.getresponse()
        reply(req, resp.status, resp.read(), {"Content-Type": resp.getheader("Content-Type", "")})
        conn.close()

    stub = LoopbackHttpServer(handle)
    try:
        src = make_source(stub.url)
        files = {"MLmodel": b"m", "w.bin": b"w" * 1000}
        ref = mlflow_proxied_server.publish_files(f"nopresign-{os.urandom(4).hex()}", files, "prod")
        if storage == "404":
            with pytest.raises(ModelNotFoundError):
                fetch_to(src, ref, tmp_path / "d")
            assert src._stores.presign.enabled
        else:
            assert set(fetch_to(src, ref, tmp_path / "d")) == set(files)
            assert not src._stores.presign.enabled
        assert "s3cr3t" not in caplog.text
    finally:
        stub.close()
        storage_stub.close()


def test_server_that_cannot_presign_streams_everything(tmp_path: Path) -> None:
    listing = [{"path": "a.bin", "is_dir": False, "file_size": 3}, {"path": "b.bin", "is_dir": False, "file_size": 3}]

    def handle(req: BaseHTTPRequestHandler) -> None:
        if "/mlflow-artifacts/presigned/" in req.path:
            reply(req, 501, b'{"error_code": "NOT_IMPLEMENTED", "message": "no presigning here"}')
        elif "get-download-uri" in req.path:
            reply(req, 200, b'{"artifact_uri": "mlflow-artifacts:/0/abc/artifacts"}')
        elif "/model-versions/get" in req.path:
            reply(req, 200, b'{"model_version": {"name": "m", "version": "1", "status": "READY"}}')
        elif "?path=" in req.path:
            reply(req, 200, json.dumps({"files": listing}).encode())
        else:
            reply(req, 200, b"abc", {"Content-Type": "application/octet-stream"})

    stub = LoopbackHttpServer(handle)
    try:
        src = make_source(stub.url, max_concurrency=1)
        src.fetch(src.resolve(parse_ref("models:/m/1")), tmp_path)
        presign_calls = [p for _, p, _ in stub.requests if "/presigned/" in p]
        assert len(presign_calls) == 1  # asked once, then remembered
        assert (tmp_path / "b.bin").read_bytes() == b"abc"
    finally:
        stub.close()


def test_deleted_artifacts_raise_model_not_found(
    source: MlflowRegistrySource, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    ref = mlflow_server.publish_files(f"gone-{os.urandom(4).hex()}", {"w.bin": b"x" * 10}, "prod")
    resolved = source.resolve(ref)
    mlflow_server.delete_artifacts(resolved.meta["storage_location"])
    with pytest.raises(ModelNotFoundError):
        source.fetch(resolved, tmp_path)


# -- availability, credentials ------------------------------------------------------------


def test_refused_connection_is_unavailable_not_retried() -> None:
    port = free_port()
    src = make_source(f"http://127.0.0.1:{port}")
    with pytest.raises(SourceUnavailableError) as info:
        src.resolve(parse_ref("models:/iris@champion"))
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert not isinstance(info.value, SourceTimeoutError)


def test_server_that_never_answers_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never responds
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        src = make_source(f"http://127.0.0.1:{listener.getsockname()[1]}", read_timeout=0.3)
        with pytest.raises(SourceTimeoutError):
            src.resolve(parse_ref("models:/iris@champion"))


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}', SourceUnavailableError),
        (500, b"<html>oops</html>", SourceUnavailableError),
        (504, b"", SourceTimeoutError),
        (429, b'{"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}', SourceUnavailableError),
        (401, b'{"error_code": "UNAUTHENTICATED", "message": "no"}', AccessDeniedError),
        (403, b'{"error_code": "PERMISSION_DENIED", "message": "no"}', AccessDeniedError),
        (302, b"", SourceError),
        (200, b"<html>a login page</html>", InvalidResponseError),  # a maintenance page: degradable
    ],
)
def test_http_answers_map_to_error_kinds(status: int, body: bytes, error: type[Exception]) -> None:
    stub = LoopbackHttpServer(lambda req: reply(req, status, body, {"Content-Type": "text/html"}))
    try:
        with pytest.raises(error) as info:
            make_source(stub.url).resolve(parse_ref("models:/iris@champion"))
        assert type(info.value) is error  # SourceError alone is permanent: not retried
    finally:
        stub.close()


def test_pending_registration_is_transient_and_failed_is_not_found() -> None:
    status = {"value": "PENDING_REGISTRATION"}

    def handle(req: BaseHTTPRequestHandler) -> None:
        mv = {"name": "m", "version": "1", "status": status["value"], "source": "s3://b/p"}
        reply(req, 200, json.dumps({"model_version": mv}).encode())

    stub = LoopbackHttpServer(handle)
    try:
        src = make_source(stub.url)
        with pytest.raises(SourceUnavailableError):
            src.resolve(parse_ref("models:/m/1"))
        status["value"] = "FAILED_REGISTRATION"
        with pytest.raises(ModelNotFoundError):
            src.resolve(parse_ref("models:/m/1"))
    finally:
        stub.close()


def test_credentials_basic_bearer_and_url_userinfo(mlflow_auth_proxy: AuthProxy, tmp_path: Path) -> None:
    ref = "models:/iris@champion"
    good = [
        {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "wonderland"},
        {"MLFLOW_TRACKING_TOKEN": "t0k3n"},
    ]
    for i, environ in enumerate(good):
        src = make_source(mlflow_auth_proxy.url, environ=environ)
        assert "MLmodel" in fetch_to(src, ref, tmp_path / str(i))  # registry and proxied artifacts
    with_userinfo = mlflow_auth_proxy.url.replace("http://", "http://alice:wonderland@")
    src = make_source(with_userinfo)
    assert src.identity == f"mlflow+{mlflow_auth_proxy.url}"
    assert src.resolve(parse_ref(ref)).source_id == src.identity
    for environ in [
        {},
        {"MLFLOW_TRACKING_TOKEN": "wrong"},
        {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "x"},
    ]:
        with pytest.raises(AccessDeniedError) as info:
            make_source(mlflow_auth_proxy.url, environ=environ).resolve(parse_ref(ref))
        for secret in ("wrong", "wonderland", "t0k3n"):
            assert secret not in str(info.value)


def test_credentials_never_logged_or_in_repr(
    mlflow_auth_proxy: AuthProxy, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level("DEBUG")
    src = make_source(mlflow_auth_proxy.url, environ={"MLFLOW_TRACKING_TOKEN": "t0k3n"})
    fetch_to(src, "models:/iris@champion", tmp_path)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("model_loader"))
    assert ours  # DEBUG records were written
    assert "t0k3n" not in ours
    assert "X-Amz-Signature" not in ours  # presigned URLs are credentials too (moto's own log has them)
    assert "t0k3n" not in repr(src)
    assert "t0k3n" not in repr(vars(src))


def test_authorization_goes_only_to_the_tracking_server(tmp_path: Path) -> None:
    """A storage location on another host (set by whoever registered the model) gets no token."""

    def artifacts(req: BaseHTTPRequestHandler) -> None:
        if "/presigned/" in req.path:  # an older server: no such route
            reply(req, 404, b"<html>Not Found</html>", {"Content-Type": "text/html"})
            return
        listing = b'{"files": [{"path": "f", "file_size": 1}]}'
        reply(req, 200, listing if "?path=" in req.path else b"1")

    artifact_host = LoopbackHttpServer(artifacts)

    def registry(req: BaseHTTPRequestHandler) -> None:
        if "get-download-uri" in req.path:
            location = f"{artifact_host.url}/api/2.0/mlflow-artifacts/artifacts/x"
            reply(req, 200, json.dumps({"artifact_uri": location}).encode())
        else:
            reply(req, 200, b'{"model_version": {"name": "m", "version": "1", "status": "READY"}}')

    tracking = LoopbackHttpServer(registry)
    try:
        src = make_source(tracking.url, environ={"MLFLOW_TRACKING_TOKEN": "t0k3n"})
        resolved = src.resolve(parse_ref("models:/m/1"))
        src.fetch(resolved, tmp_path)
        assert all(h.get("Authorization") == "Bearer t0k3n" for _, _, h in tracking.requests)
        assert artifact_host.requests
        assert not any("Authorization" in h for _, _, h in artifact_host.requests)
    finally:
        tracking.close()
        artifact_host.close()


# -- artifact listings from a misbehaving server -------------------------------------------


def _artifact_stub(listing: list[dict[str, object]], content: bytes) -> LoopbackHttpServer:
    def handle(req: BaseHTTPRequestHandler) -> None:
        if "get-download-uri" in req.path:
            reply(req, 200, b'{"artifact_uri": "mlflow-artifacts:/0/abc/artifacts"}')
        elif "/model-versions/get" in req.path:
            reply(req, 200, b'{"model_version": {"name": "m", "version": "1", "status": "READY"}}')
        elif "/presigned/" in req.path:
            reply(req, 501, b'{"error_code": "NOT_IMPLEMENTED", "message": "cannot presign"}')
        elif req.path.startswith("/api/2.0/mlflow-artifacts/artifacts?"):
            reply(req, 200, json.dumps({"files": listing}).encode())
        else:
            reply(req, 200, content, {"Content-Type": "application/octet-stream"})

    return LoopbackHttpServer(handle)


@pytest.mark.parametrize(
    "listing",
    [
        [{"path": "../escape", "is_dir": False, "file_size": 3}],
        [{"path": "..", "is_dir": True}],
        [{"path": "w.bin", "is_dir": False, "file_size": 999}],  # the server sends 3 bytes
    ],
)
def test_unsafe_paths_and_short_files_raise_integrity_error(listing: list[dict[str, object]], tmp_path: Path) -> None:
    stub = _artifact_stub(listing, b"abc")
    try:
        src = make_source(stub.url)
        with pytest.raises(IntegrityError):
            src.fetch(src.resolve(parse_ref("models:/m/1")), tmp_path)
        assert not (tmp_path.parent / "escape").exists()
    finally:
        stub.close()


def test_idle_connection_closed_by_server_is_replaced(tmp_path: Path) -> None:
    """Servers drop idle keep-alive connections; the next request must not fail for it."""

    def handle(req: BaseHTTPRequestHandler) -> None:
        reply(req, 200, b'{"model_version": {"name": "m", "version": "1", "status": "READY"}}')
        req.close_connection = True  # close without saying "Connection: close"

    stub = LoopbackHttpServer(handle)
    try:
        src = make_source(stub.url)
        http = src._http
        assert http is not None
        ep = mlflow_http.Endpoint.parse(stub.url)
        for _ in range(3):
            body = http.get_json(ep, "/api/2.0/mlflow/model-versions/get", deadline=Deadline(10.0))
            assert json.loads(body)["model_version"]["name"] == "m"
    finally:
        stub.close()


# -- configuration, lifecycle, import cost -------------------------------------------------


def test_environment_is_read_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:secret@tracking.example:5000/prefix/")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "https://registry.example")
    src = MlflowRegistrySource.from_settings(SourceSettings(connect_timeout=1.0))
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "https://elsewhere.example")
    assert src.identity == "mlflow+https://registry.example"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    with pytest.raises(SourceError, match="MLFLOW_TRACKING_URI"):
        MlflowRegistrySource()


def test_non_http_registry_without_mlflow_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"model-loader\[mlflow\]"):
        MlflowRegistrySource(tracking_uri="sqlite:///nowhere.db", environ={})


def test_close_is_idempotent_and_final(mlflow_proxied_server: MlflowServer) -> None:
    src = make_source(mlflow_proxied_server.url)
    src.resolve(parse_ref("models:/iris@champion"))
    src.close()
    src.close()
    with pytest.raises(SourceError, match="closed"):
        src.resolve(parse_ref("models:/iris@champion"))


def test_http_error_classes() -> None:
    classify = mlflow_errors.http_error_class
    assert classify(HttpStatusError(404, "RESOURCE_DOES_NOT_EXIST", "", "x")) is ModelNotFoundError
    assert classify(HttpStatusError(404, "", "<html>", "x")) is SourceError  # a wrong URL, not a missing model
    assert classify(HttpStatusError(400, "INVALID_PARAMETER_VALUE", "alias x not found", "x")) is ModelNotFoundError
    assert classify(HttpStatusError(400, "INVALID_PARAMETER_VALUE", "bad name", "x")) is SourceError


def test_registry_fetch_in_fresh_process_does_not_import_mlflow(
    mlflow_proxied_server: MlflowServer, tmp_path: Path
) -> None:
    code = textwrap.dedent(
        f"""
        import sys, pathlib
        from model_loader import parse_ref
        from model_loader.sources.mlflow import MlflowRegistrySource
        src = MlflowRegistrySource(tracking_uri={mlflow_proxied_server.url!r})
        dest = pathlib.Path({str(tmp_path / "out")!r}); dest.mkdir()
        manifest = src.fetch(src.resolve(parse_ref("models:/iris@champion")), dest)
        assert any(e.path == "MLmodel" for e in manifest.files)
        heavy = sorted(m for m in ("mlflow", "requests", "urllib3", "boto3", "botocore") if m in sys.modules)
        print(",".join(heavy) or "none")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"
