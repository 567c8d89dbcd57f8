"""MLflow's variables and deployments, against real servers: a registry apart from the
tracking server, HTTP(S) proxies (a counting proxy on 127.0.0.1, CONNECT for https),
``MLFLOW_S3_IGNORE_TLS`` (moto behind a self-signed TLS front), ``MLFLOW_HTTP_REQUEST_TIMEOUT``,
scheme-less tracking URIs, source identities and what the cache says on a miss, and
artifact locations routed through the source registry."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from _hostile_http import FakeMlflow, HostileServer, black_hole
from _mlflow_server import IRIS, MlflowServer, start_mlflow_server, stop_mlflow_server, use_tracking_uri
from _proxy import CountingProxy, TlsFront, self_signed
from _s3_server import MotoServer, free_port
from helpers import fast_config, read_tree
from model_loader import (
    AccessDeniedError,
    AllSourcesFailedError,
    Deadline,
    FileEntry,
    LoaderConfig,
    Manifest,
    ModelRef,
    ResilientLoader,
    ResolvedModel,
    SourceCapabilities,
    SourceError,
    SourceSettings,
    SourceTimeoutError,
    SourceUnavailableError,
    parse_ref,
)
from model_loader._identity import describe_cached, normalise_url
from model_loader.sources.mlflow import MlflowRegistrySource, MlflowRunsSource
from model_loader.testing.conformance import Publish, SourceConformanceTests

FILES = {"MLmodel": b"flavors: {}\n", "weights/w.bin": bytes(range(256)) * 64, "conf.txt": b"abc"}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _host(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


def fetch(source: MlflowRegistrySource | MlflowRunsSource, uri: str, dest: Path) -> dict[str, bytes]:
    resolved = source.resolve(parse_ref(uri))
    dest.mkdir(parents=True, exist_ok=True)
    source.fetch(resolved, dest)
    return read_tree(dest)


# -- a registry apart from the tracking server ------------------------------------------------


def _post(server: MlflowServer, path: str, payload: dict[str, object]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{server.url}/api/2.0/mlflow/{path}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


@pytest.fixture(scope="module")
def registry_server(
    moto_server: MotoServer, mlflow_test_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A second ``mlflow server`` used only as a model registry (its own database)."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-registry"), moto_server, "proxied")
    yield server
    stop_mlflow_server(server)


@pytest.mark.slow
def test_a_version_whose_source_is_a_run_is_looked_up_on_the_tracking_server(
    mlflow_proxied_server: MlflowServer, registry_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    tracking = mlflow_proxied_server
    client = tracking.client()
    run = client.create_run("0")
    with tempfile.TemporaryDirectory() as tmp:
        for rel, data in FILES.items():
            Path(tmp, rel).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp, rel).write_bytes(data)
        client.log_artifacts(run.info.run_id, tmp, "model")
    name = _unique("split")
    # straight to the registry's REST API: MLflow 3's client would rewrite a runs:/ source into a logged model
    _post(registry_server, "registered-models/create", {"name": name})
    source_uri = f"runs:/{run.info.run_id}/model"
    created = _post(
        registry_server, "model-versions/create", {"name": name, "source": source_uri, "run_id": run.info.run_id}
    )
    assert created["model_version"]["source"] == source_uri
    with pytest.raises(Exception, match=r"RESOURCE_DOES_NOT_EXIST|not found"):
        MlflowClient(tracking_uri=registry_server.url).get_run(run.info.run_id)  # the registry has no such run

    source = MlflowRegistrySource(tracking_uri=tracking.url, registry_uri=registry_server.url, environ={})
    try:
        resolved = source.resolve(parse_ref(f"models:/{name}/1"))
        assert resolved.source_id == f"mlflow+{registry_server.url}"
        assert resolved.meta["storage_location"].startswith("mlflow-artifacts:/")
        assert fetch(source, f"models:/{name}/1", tmp_path / "ours") == FILES
    finally:
        source.close()
    import mlflow.artifacts

    # MLflow reads the registry from its global state here, not from an argument; the variable is
    # restored by monkeypatch (mlflow.set_registry_uri would leave it set for the rest of the session)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry_server.url)
    with use_tracking_uri(tracking.url):
        theirs = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/1", dst_path=str(tmp_path / "m"))
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    mine = read_tree(tmp_path / "ours")
    assert {k: v for k, v in read_tree(Path(theirs)).items() if k != "registered_model_meta"} == mine

    runs = MlflowRunsSource(tracking_uri=tracking.url, registry_uri=registry_server.url, environ={})
    try:
        resolved = runs.resolve(parse_ref(f"runs:/{run.info.run_id}/model"))
        assert resolved.source_id == f"mlflow+{tracking.url}"  # runs live on the tracking server
        assert {f.path: f.size for f in resolved.files or ()} == {p: len(d) for p, d in FILES.items()}
        assert fetch(runs, f"runs:/{run.info.run_id}/model", tmp_path / "runs") == FILES
    finally:
        runs.close()


@pytest.mark.slow
def test_run_artifacts_that_change_after_resolve_are_stale(mlflow_proxied_server: MlflowServer, tmp_path: Path) -> None:
    from model_loader import StaleResolutionError

    server = mlflow_proxied_server
    client = server.client()
    run = client.create_run("0")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "a.txt").write_bytes(b"a")
        client.log_artifacts(run.info.run_id, tmp, "out")
    source = MlflowRunsSource(tracking_uri=server.url, environ={})
    try:
        resolved = source.resolve(parse_ref(f"runs:/{run.info.run_id}/out"))
        assert resolved.version.startswith(f"{run.info.run_id}/out@")
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "b.txt").write_bytes(b"b")
            client.log_artifacts(run.info.run_id, tmp, "out")
        (tmp_path / "d").mkdir()
        with pytest.raises(StaleResolutionError, match="changed since"):
            source.fetch(resolved, tmp_path / "d")
        again = source.resolve(parse_ref(f"runs:/{run.info.run_id}/out"))
        assert again.version != resolved.version
        assert fetch(source, f"runs:/{run.info.run_id}/out", tmp_path / "e") == {"a.txt": b"a", "b.txt": b"b"}
    finally:
        source.close()


@pytest.mark.slow
def test_runs_references_load_through_the_loader(mlflow_s3_server: MlflowServer, tmp_path: Path) -> None:
    mv = mlflow_s3_server.client().get_model_version(IRIS, "2")
    env = {
        "MLFLOW_TRACKING_URI": mlflow_s3_server.url,
        "MLFLOW_S3_ENDPOINT_URL": mlflow_s3_server.env["MLFLOW_S3_ENDPOINT_URL"],
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with ResilientLoader(f"runs:/{mv.run_id}/model", config=fast_config(tmp_path / "cache")) as loader:
            result = loader.fetch()
            again = loader.fetch()
    assert result.version.startswith(f"{mv.run_id}/model@")
    assert (result.path / "MLmodel").is_file()
    assert again.from_cache
    assert (again.version, again.digest) == (result.version, result.digest)


class TestMlflowRunsConformanceS3(SourceConformanceTests):
    """``runs:/`` on the S3 layout, where listings carry ETags. (In the proxied layout a listing
    has sizes only: a file overwritten in place with the same size is not seen; docs/mlflow.md.)"""

    @pytest.fixture
    def source(self, mlflow_s3_server: MlflowServer) -> Iterator[MlflowRunsSource]:
        src = MlflowRunsSource(
            tracking_uri=mlflow_s3_server.url,
            environ={"MLFLOW_S3_ENDPOINT_URL": mlflow_s3_server.env["MLFLOW_S3_ENDPOINT_URL"]},
        )
        yield src
        src.close()

    @pytest.fixture
    def publish(self, mlflow_s3_server: MlflowServer) -> Publish:
        runs: dict[str, str] = {}
        client = mlflow_s3_server.client()

        def publish(name: str, files: Mapping[str, bytes], alias: str) -> ModelRef:
            if name not in runs:
                runs[name] = client.create_run("0").info.run_id
            with tempfile.TemporaryDirectory() as tmp:
                for rel, data in files.items():
                    Path(tmp, rel).parent.mkdir(parents=True, exist_ok=True)
                    Path(tmp, rel).write_bytes(data)
                client.log_artifacts(runs[name], tmp, "model")
            return parse_ref(f"runs:/{runs[name]}/model")

        return publish

    @pytest.fixture
    def missing_ref(self) -> ModelRef:
        return parse_ref(f"runs:/{uuid.uuid4().hex}/model")

    @pytest.fixture
    def unavailable_source(self) -> Iterator[MlflowRunsSource]:
        src = MlflowRunsSource(tracking_uri=f"http://127.0.0.1:{free_port()}", environ={})
        yield src
        src.close()


# -- proxies --------------------------------------------------------------------------------


@pytest.mark.slow
def test_http_proxy_carries_the_rest_calls_and_the_presigned_downloads(
    mlflow_proxied_server: MlflowServer, tmp_path: Path
) -> None:
    server = mlflow_proxied_server
    with CountingProxy() as proxy:
        source = MlflowRegistrySource(tracking_uri=server.url, environ={"HTTP_PROXY": proxy.url})
        try:
            files = fetch(source, "models:/iris@champion", tmp_path / "d")
        finally:
            source.close()
        hosts = proxy.hosts()
        storage = _host(server.env["MLFLOW_S3_ENDPOINT_URL"])
        paths = [r.target for r in proxy.requests]
    assert "MLmodel" in files
    assert hosts[_host(server.url)] >= 3  # alias, download URI, listings
    assert hosts[storage] == len(files)  # every file through a presigned URL, through the proxy
    assert any("/registered-models/alias" in p for p in paths)
    assert all(r.method != "CONNECT" for r in proxy.requests)


@pytest.mark.slow
def test_no_proxy_sends_matching_hosts_directly(mlflow_proxied_server: MlflowServer, tmp_path: Path) -> None:
    server = mlflow_proxied_server
    port = _host(server.url).rsplit(":", 1)[1]
    with CountingProxy() as proxy:
        env = {"http_proxy": proxy.url, "NO_PROXY": f"example.com, 127.0.0.1:{port}"}
        source = MlflowRegistrySource(tracking_uri=server.url, environ=env)
        try:
            files = fetch(source, "models:/iris@champion", tmp_path / "d")
        finally:
            source.close()
        hosts = proxy.hosts()
    assert "MLmodel" in files
    assert _host(server.url) not in hosts  # bypassed: the entry names its host and port
    assert hosts[_host(server.env["MLFLOW_S3_ENDPOINT_URL"])] == len(files)  # another port: proxied


@pytest.mark.slow
def test_https_goes_through_a_connect_tunnel_with_the_proxys_credentials_only(
    mlflow_proxied_server: MlflowServer, tmp_path: Path
) -> None:
    server = mlflow_proxied_server
    cert, key = self_signed(tmp_path)
    with TlsFront(server.port, cert, key) as front, CountingProxy(auth="Basic dTpw") as proxy:  # u:p
        env = {
            "HTTPS_PROXY": f"http://u:p@127.0.0.1:{proxy.port}",
            "MLFLOW_TRACKING_SERVER_CERT_PATH": str(cert),
            "MLFLOW_TRACKING_TOKEN": "tracking-secret",
        }
        source = MlflowRegistrySource(tracking_uri=f"https://localhost:{front.port}", environ=env)
        try:
            files = fetch(source, "models:/iris@champion", tmp_path / "d")
        finally:
            source.close()
        requests = list(proxy.requests)
    assert "MLmodel" in files
    tunnels = [r for r in requests if r.method == "CONNECT"]
    assert tunnels
    assert {r.target for r in tunnels} == {f"localhost:{front.port}"}
    assert all(r.method == "CONNECT" or not r.target.startswith("https") for r in requests)
    for r in tunnels:
        assert r.headers.get("Proxy-Authorization") == "Basic dTpw"
        assert "Authorization" not in r.headers  # the tracking token never reaches the proxy
        assert "tracking-secret" not in repr(r)


def test_a_proxy_that_wants_other_credentials_is_access_denied(tmp_path: Path) -> None:
    with CountingProxy(auth="Basic c2VjcmV0") as proxy:
        source = MlflowRegistrySource(
            tracking_uri="https://localhost:1", environ={"HTTPS_PROXY": f"http://wrong:pw@127.0.0.1:{proxy.port}"}
        )
        with pytest.raises(AccessDeniedError, match="407") as info:
            source.resolve(parse_ref("models:/m@prod"))
        source.close()
    assert "wrong" not in str(info.value)
    assert "pw@" not in str(info.value)
    assert f"127.0.0.1:{proxy.port}" in str(info.value)


def test_a_proxy_that_is_down_is_unavailable_and_named() -> None:
    with HostileServer(black_hole) as dead:
        port = dead.port
    source = MlflowRegistrySource(
        tracking_uri="http://mlflow.invalid:5000", environ={"HTTP_PROXY": f"127.0.0.1:{port}"}
    )
    with pytest.raises(SourceUnavailableError, match=re.escape(f"the proxy http://127.0.0.1:{port}")):
        source.resolve(parse_ref("models:/m@prod"))
    source.close()


@pytest.mark.parametrize("value", ["socks5://127.0.0.1:1080", "https://proxy.internal:3128"])
def test_a_proxy_this_client_cannot_use_is_refused_not_bypassed(value: str) -> None:
    source = MlflowRegistrySource(tracking_uri="http://mlflow.internal", environ={"ALL_PROXY": value})
    with pytest.raises(SourceError, match=r"ALL_PROXY=.*only http:// proxies") as info:
        source.resolve(parse_ref("models:/m@prod"))
    assert not isinstance(info.value, SourceUnavailableError)  # a setting to change, not an outage
    source.close()
    bypassed = MlflowRegistrySource(tracking_uri="http://127.0.0.1:1", environ={"ALL_PROXY": value, "NO_PROXY": "*"})
    with pytest.raises(SourceUnavailableError):  # straight to the (closed) port: NO_PROXY wins
        bypassed.resolve(parse_ref("models:/m@prod"))
    bypassed.close()


@pytest.mark.slow
def test_s3_artifacts_go_through_the_proxy_botocore_reads(
    mlflow_s3_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = mlflow_s3_server
    with CountingProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)  # boto3 reads os.environ, as in MLflow's S3 repository
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        source = MlflowRegistrySource(
            tracking_uri=server.url,
            environ={"HTTP_PROXY": proxy.url, "MLFLOW_S3_ENDPOINT_URL": server.env["MLFLOW_S3_ENDPOINT_URL"]},
        )
        try:
            files = fetch(source, "models:/iris@champion", tmp_path / "d")
        finally:
            source.close()
        hosts = proxy.hosts()
    assert "MLmodel" in files
    assert hosts[_host(server.url)] >= 2
    assert hosts[_host(server.env["MLFLOW_S3_ENDPOINT_URL"])] >= len(files)


# -- TLS of the artifact store: MLFLOW_S3_IGNORE_TLS ------------------------------------------


@pytest.mark.slow
def test_mlflow_s3_ignore_tls_reads_a_self_signed_store(mlflow_s3_server: MlflowServer, tmp_path: Path) -> None:
    server = mlflow_s3_server
    cert, key = self_signed(tmp_path)
    moto_port = int(server.env["MLFLOW_S3_ENDPOINT_URL"].rsplit(":", 1)[1])
    with TlsFront(moto_port, cert, key) as front:
        endpoint = f"https://127.0.0.1:{front.port}"
        strict = MlflowRegistrySource(tracking_uri=server.url, environ={"MLFLOW_S3_ENDPOINT_URL": endpoint})
        try:
            with pytest.raises(SourceUnavailableError, match=r"(?i)certificate verify failed") as info:
                fetch(strict, "models:/iris@champion", tmp_path / "strict")
            assert "MLFLOW_S3_IGNORE_TLS" in str(info.value)
        finally:
            strict.close()
        env = {"MLFLOW_S3_ENDPOINT_URL": endpoint, "MLFLOW_S3_IGNORE_TLS": "true"}
        relaxed = MlflowRegistrySource(tracking_uri=server.url, environ=env)
        try:
            files = fetch(relaxed, "models:/iris@champion", tmp_path / "relaxed")
        finally:
            relaxed.close()
        assert front.connections >= 1
    assert "MLmodel" in files


def test_an_mlflow_boolean_that_is_not_one_is_refused() -> None:
    with pytest.raises(SourceError, match=r"MLFLOW_S3_IGNORE_TLS='yes' is not a boolean"):
        MlflowRegistrySource(tracking_uri="http://mlflow.internal", environ={"MLFLOW_S3_IGNORE_TLS": "yes"})


# -- MLFLOW_HTTP_REQUEST_TIMEOUT --------------------------------------------------------------


def test_mlflow_http_request_timeout_sets_the_timeouts_explicit_ones_win() -> None:
    env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    assert MlflowRegistrySource(tracking_uri="http://m", environ=env).timeouts == (2.0, 2.0)
    assert MlflowRegistrySource(tracking_uri="http://m", environ={"MLFLOW_HTTP_REQUEST_TIMEOUT": "300"}).timeouts == (
        5.0,
        300.0,
    )
    assert MlflowRegistrySource(tracking_uri="http://m", environ={}).timeouts == (5.0, 60.0)
    explicit = MlflowRegistrySource(tracking_uri="http://m", environ=env, connect_timeout=1, read_timeout=30)
    assert explicit.timeouts == (1, 30)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "http://m")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        assert MlflowRegistrySource.from_settings(SourceSettings()).timeouts == (2.0, 2.0)  # the loader's defaults
        assert MlflowRegistrySource.from_settings(SourceSettings(read_timeout=9)).timeouts == (2.0, 9)
    with pytest.raises(SourceError, match=r"MLFLOW_HTTP_REQUEST_TIMEOUT='soon' is not a positive number"):
        MlflowRegistrySource(tracking_uri="http://m", environ={"MLFLOW_HTTP_REQUEST_TIMEOUT": "soon"})


def test_mlflow_http_request_timeout_cuts_a_silent_server_within_the_deadline() -> None:
    with HostileServer(black_hole) as silent:
        source = MlflowRegistrySource(tracking_uri=silent.url, environ={"MLFLOW_HTTP_REQUEST_TIMEOUT": "1"})
        with pytest.raises(SourceTimeoutError, match=r"read timeout for one answer \(1s\) expired"):
            source.resolve(parse_ref("models:/m@prod"))
        with (
            Deadline(0.2, what="the load's 0.2s deadline").applied(),
            pytest.raises(SourceTimeoutError, match=r"the load's 0\.2s deadline expired"),
        ):
            source.resolve(parse_ref("models:/m@prod"))
        source.close()


# -- tracking URIs and identities -------------------------------------------------------------


@pytest.mark.parametrize("uri", ["127.0.0.1:5000", "localhost:5000", "mlflow.internal:443/prefix", "[::1]:5000"])
def test_a_tracking_uri_without_a_scheme_is_refused_with_the_fix(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SourceError, match=re.escape(f"write MLFLOW_TRACKING_URI=http://{uri}")):
        MlflowRegistrySource(environ={"MLFLOW_TRACKING_URI": uri})
    with pytest.raises(SourceError, match=re.escape(f"write MLFLOW_REGISTRY_URI=http://{uri}")):
        MlflowRegistrySource(environ={"MLFLOW_TRACKING_URI": "http://m", "MLFLOW_REGISTRY_URI": uri})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(SourceError, match=r"has no scheme"):
        ResilientLoader("models:/iris@prod", config=LoaderConfig(cache={"dir": "/nonexistent-unused"}))


@pytest.mark.parametrize(
    ("url", "identity"),
    [
        ("HTTP://MLflow.Internal:80/", "http://mlflow.internal"),
        ("https://user:secret@mlflow.internal:443/prefix/", "https://mlflow.internal/prefix"),
        ("https://mlflow.internal:8443", "https://mlflow.internal:8443"),
        ("http://[::1]:80", "http://[::1]"),
        ("http://localhost:5000", "http://localhost:5000"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http://host/Case/Path", "http://host/Case/Path"),
        ("databricks://Profile", "databricks://Profile"),
    ],
)
def test_identities_normalise_what_names_the_same_server(url: str, identity: str) -> None:
    assert normalise_url(url) == identity
    assert MlflowRegistrySource(tracking_uri=url, environ={}).identity == f"mlflow+{identity}" or "://" not in url
    assert "secret" not in normalise_url(url)


@pytest.mark.slow
def test_a_cache_miss_names_the_identity_and_what_the_cache_holds(
    mlflow_proxied_server: MlflowServer, tmp_path: Path
) -> None:
    server = mlflow_proxied_server
    cache = tmp_path / "cache"
    by_name = MlflowRegistrySource(tracking_uri=server.url.replace("127.0.0.1", "localhost"), environ={})
    with ResilientLoader([(by_name, "models:/iris@champion")], config=fast_config(cache)) as loader:
        loader.fetch()
    by_address = MlflowRegistrySource(tracking_uri=server.url, environ={})
    assert by_address.identity != by_name.identity  # localhost and 127.0.0.1 are different servers
    ref = parse_ref("models:/iris@challenger")
    text = describe_cached(cache, ref, by_address.identity)
    assert f"looked for source {by_address.identity}" in text
    assert f"models:/iris@champion from {by_name.identity} -> version iris/2" in text
    assert "localhost and 127.0.0.1 are different servers" in text
    assert describe_cached(cache, parse_ref("models:/other@x")) == "the cache holds nothing for model 'other'"
    offline = ResilientLoader([(by_address, "models:/iris@champion")], config=fast_config(cache, offline=True))
    with offline, pytest.raises(AllSourcesFailedError):
        offline.fetch()


# -- artifact locations routed through the source registry ------------------------------------


def test_an_artifact_location_of_any_registered_scheme_is_read_by_its_source(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    root = f"/{_unique('mlflow-art')}/model"
    memfs = fsspec.filesystem("memory")
    for rel, data in FILES.items():
        memfs.pipe(f"{root}/{rel}", data)
    fake = FakeMlflow(FILES, location=f"memory://{root}")
    with HostileServer(fake) as server:
        source = MlflowRegistrySource(tracking_uri=server.url, environ={})
        try:
            assert fetch(source, "models:/m@prod", tmp_path / "all") == FILES
            assert fetch(source, "models:/m/1/weights", tmp_path / "sub") == {"w.bin": FILES["weights/w.bin"]}
        finally:
            source.close()
    assert not any(p.startswith("/api/2.0/mlflow-artifacts") for p in server.paths())


class VaultSource:
    """A minimal third-party source: ``vault://<prefix>/`` over a dict of files."""

    scheme: ClassVar[str] = "vault"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities()

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.resolved: list[str] = []

    @property
    def identity(self) -> str:
        return "vault"

    def resolve(self, ref: ModelRef) -> ResolvedModel:
        self.resolved.append(ref.uri)
        prefix = ref.location
        found = {k[len(prefix) :]: v for k, v in self.files.items() if k.startswith(prefix)}
        entries = tuple(FileEntry(p, len(b), hashlib.sha256(b).hexdigest()) for p, b in sorted(found.items()))
        return ResolvedModel(ref, self.identity, "v1", entries, (("prefix", prefix),))

    def fetch(self, resolved: ResolvedModel, dest: Path) -> Manifest:
        out = []
        for entry in resolved.files or ():
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.files[resolved.meta["prefix"] + entry.path])
            out.append(entry)
        return Manifest.of(out)

    def close(self) -> None:
        return None


def test_an_injected_artifact_source_is_used_for_its_scheme(tmp_path: Path) -> None:
    store = VaultSource({f"models/m/{p}": d for p, d in FILES.items()})
    fake = FakeMlflow(FILES, location="vault://models/m")
    with HostileServer(fake) as server:
        source = MlflowRegistrySource(tracking_uri=server.url, environ={}, artifact_sources={"vault": store})
        try:
            assert fetch(source, "models:/m@prod", tmp_path / "d") == FILES
        finally:
            source.close()
    assert store.resolved == ["vault://models/m/"]


def test_a_runs_reference_is_a_registered_scheme() -> None:
    from model_loader.registry import get_source_class

    assert get_source_class("runs") is MlflowRunsSource
    assert isinstance(parse_ref("runs:/abc/model"), ModelRef)


def test_the_docs_list_every_mlflow_variable_as_honoured_or_not() -> None:
    from model_loader.sources.mlflow._env import VARIABLES

    docs = (Path(__file__).resolve().parent.parent / "docs" / "mlflow.md").read_text()
    table = docs[docs.index("### MLflow's variables") : docs.index("**Which client.**")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    wrong = []
    for name, honoured in VARIABLES.items():
        row = next((r for r in rows if f"`{name}`" in r.split("|")[1]), None)
        status = row.split("|")[2].strip() if row else None
        if status != ("honoured" if honoured else "not honoured"):
            wrong.append((name, status))
    assert wrong == []


@pytest.mark.parametrize(
    ("uri", "meta", "pinned"),
    [
        ("models:/iris@champion", {"name": "iris", "version": "3"}, "models:/iris/3"),
        (
            "models:/iris@champion/MLmodel",
            {"name": "iris", "version": "3", "path": "MLmodel"},
            "models:/iris/3/MLmodel",
        ),
        ("models:/iris/latest", {"name": "iris", "version": "7"}, "models:/iris/7"),
        ("models:/iris/3/sub", {"name": "iris", "version": "3", "path": "sub"}, "models:/iris/3/sub"),
        ("models:/m-0a1b", {"model_id": "m-0a1b"}, "models:/m-0a1b"),
        ("models:/team@fraud@champion", {"name": "team@fraud", "version": "3"}, None),  # MLflow cannot name it
        ("runs:/abc/model", {"run_id": "abc"}, None),
    ],
)
def test_a_pinned_uri_names_exactly_the_version_and_path(uri: str, meta: dict[str, str], pinned: str | None) -> None:
    from model_loader.sources.mlflow import pinned_model_uri

    resolved = ResolvedModel(parse_ref(uri), "mlflow+http://m", "v", None, ResolvedModel.pack_metadata(meta))
    assert pinned_model_uri(resolved) == pinned
    if pinned is not None:
        again = parse_ref(pinned)
        assert again.uri == pinned
        assert again.pinned
