"""ResilientLoader with the MLflow registry source: alias moves, outages, broken versions,
credentials, the default pyfunc deserializer, the CLI, and the embedded sqlite registry."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from _mlflow_server import IRIS, AuthProxy, MlflowServer, start_mlflow_server, stop_mlflow_server
from _s3_server import MotoServer
from helpers import Sleeps, fast_config, read_tree
from model_loader import (
    AccessDeniedError,
    AllSourcesFailedError,
    Deadline,
    FetchContext,
    FetchResult,
    ModelNotFoundError,
    ResilientLoader,
    SourceUnavailableError,
    parse_ref,
)
from model_loader.sources.mlflow import MlflowRegistrySource

pytestmark = pytest.mark.slow


def _source(server: MlflowServer | str, **environ: str) -> MlflowRegistrySource:
    url = server if isinstance(server, str) else server.url
    env = dict(environ)
    if isinstance(server, MlflowServer):
        env.setdefault("MLFLOW_S3_ENDPOINT_URL", server.env["MLFLOW_S3_ENDPOINT_URL"])
    return MlflowRegistrySource(tracking_uri=url, connect_timeout=2.0, read_timeout=30.0, environ=env)


def _fetch(source: MlflowRegistrySource, uri: str, cache: Path, **config: object) -> FetchResult:
    with ResilientLoader([(source, uri)], config=fast_config(cache, **config), sleep=Sleeps()) as loader:
        return loader.fetch()


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def test_moving_alias_loads_new_version_and_keeps_old_cached(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    name = _unique("moving")
    ref = mlflow_server.publish_files(name, {"w.bin": b"one"}, "prod")
    source = _source(mlflow_server)
    first = _fetch(source, ref.uri, tmp_path)
    assert (first.version, first.from_cache) == (f"{name}/1", False)
    assert _fetch(source, ref.uri, tmp_path).from_cache

    mlflow_server.publish_files(name, {"w.bin": b"two"}, "prod")
    second = _fetch(source, ref.uri, tmp_path)
    assert (second.version, second.from_cache) == (f"{name}/2", False)
    assert read_tree(second.path) == {"w.bin": b"two"}
    assert read_tree(first.path) == {"w.bin": b"one"}  # the old version stays in the cache

    mlflow_server.client().set_registered_model_alias(name, "prod", "1")  # roll back by moving the alias
    back = _fetch(source, ref.uri, tmp_path)
    assert (back.version, back.from_cache, back.path) == (f"{name}/1", True, first.path)
    source.close()


def test_deleted_artifacts_fall_back_to_previous_version(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    name = _unique("broken")
    mlflow_server.publish_files(name, {"w.bin": b"v1"}, "prod")
    ref = mlflow_server.publish_files(name, {"w.bin": b"v2"}, "prod")
    source = _source(mlflow_server)
    mlflow_server.delete_artifacts(source.resolve(ref).meta["storage_location"])

    with pytest.raises(AllSourcesFailedError) as info:
        _fetch(source, ref.uri, tmp_path / "strict")
    assert isinstance(info.value.failures[0][1], ModelNotFoundError)

    served = _fetch(source, ref.uri, tmp_path / "fallback", fallback_versions=2)
    assert served.version == f"{name}/1"
    assert not served.degraded
    assert read_tree(served.path) == {"w.bin": b"v1"}
    source.close()


def test_wrong_credentials_give_access_denied_not_degraded(mlflow_auth_proxy: AuthProxy, tmp_path: Path) -> None:
    good = _source(mlflow_auth_proxy.url, MLFLOW_TRACKING_TOKEN="t0k3n")
    assert _fetch(good, "models:/iris@champion", tmp_path).version == f"{IRIS}/2"
    bad = _source(mlflow_auth_proxy.url, MLFLOW_TRACKING_TOKEN="stolen")
    with pytest.raises(AllSourcesFailedError) as info:
        _fetch(bad, "models:/iris@champion", tmp_path)  # a refusal is an answer: no last-known-good
    assert isinstance(info.value.failures[0][1], AccessDeniedError)
    assert "stolen" not in str(info.value)


def test_default_deserializer_loads_the_sklearn_model(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    source = _source(mlflow_server)
    with ResilientLoader([(source, "models:/iris@challenger")], config=fast_config(tmp_path)) as loader:
        model = loader.load()
        assert model.predict(np.zeros((2, 4))).shape == (2,)
        assert loader.last_result is not None
        assert loader.last_result.version == f"{IRIS}/3"
        assert loader.load() is model  # the memory cache, keyed by the pinned version
    source.close()


def test_cli_fetch_json_and_no_mlflow_import_in_fresh_process(
    mlflow_proxied_server: MlflowServer, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MODEL_LOADER_"))}
    env["MLFLOW_TRACKING_URI"] = mlflow_proxied_server.url
    cmd = [sys.executable, "-m", "model_loader", "fetch", "--json", "--cache-dir", str(tmp_path), "models:/iris@prod"]
    mlflow_proxied_server.client().set_registered_model_alias(IRIS, "prod", "1")
    runs = [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (json.loads(r.stdout) for r in runs)
    assert (first["version"], first["from_cache"], second["from_cache"]) == (f"{IRIS}/1", False, True)

    code = textwrap.dedent(
        f"""
        import sys
        from model_loader import ResilientLoader, LoaderConfig, CacheConfig
        config = LoaderConfig(cache=CacheConfig(dir={str(tmp_path / "py")!r}))
        with ResilientLoader(["models:/iris@champion"], config=config) as loader:
            assert loader.fetch().version == "iris/2"
        print(",".join(m for m in ("mlflow", "requests", "urllib3", "boto3", "botocore") if m in sys.modules) or "none")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "none"


# -- an outage of a server of our own -------------------------------------------------------


@pytest.fixture(scope="module")
def doomed_server(
    moto_server: MotoServer, mlflow_test_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A server this module may stop, so the session servers survive."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-doomed"), moto_server, "proxied")
    yield server
    stop_mlflow_server(server)


def test_server_stopped_mid_run_serves_degraded_from_cache(doomed_server: MlflowServer, tmp_path: Path) -> None:
    ref = doomed_server.publish_files("outage", {"w.bin": b"v1"}, "prod")
    source = _source(doomed_server)
    sleeps = Sleeps()
    with ResilientLoader([(source, ref.uri)], config=fast_config(tmp_path), sleep=sleeps) as loader:
        fresh = loader.fetch()
        assert not fresh.degraded
        stop_mlflow_server(doomed_server)
        for _ in range(2):
            served = loader.fetch()
            assert (served.degraded, served.from_cache, served.version) == (True, True, "outage/1")
            assert served.path == fresh.path
            assert "SourceUnavailableError" in served.failures[0][1]
    assert len(sleeps) == 4  # 3 attempts per fetch: the loader's policy, and nothing inside the source

    with pytest.raises(SourceUnavailableError):  # fails fast on its own, too
        source.resolve(parse_ref(ref.uri))
    with pytest.raises(AllSourcesFailedError):  # a different model was never cached
        _fetch(source, "models:/never-seen@prod", tmp_path)


# -- the embedded sqlite registry (MlflowClient path) and the demo ---------------------------


def test_sqlite_registry_through_mlflow_client(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    db = tmp_path / "reg.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    client.create_registered_model("m")
    for content in (b"one", b"two"):
        run = client.create_run(exp)
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / "w.bin").write_bytes(content)
        client.log_artifacts(run.info.run_id, str(tmp_path / "src"), "model")
        client.create_model_version("m", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("m", "prod", "2")

    source = MlflowRegistrySource(tracking_uri=uri, environ={})
    assert source.identity == f"mlflow+{uri}"
    resolved = source.resolve(parse_ref("models:/m@prod"))
    assert resolved.version == "m/2"
    assert resolved.meta["storage_location"].startswith("file:")
    dest = tmp_path / "dest"
    dest.mkdir()
    assert [e.path for e in source.fetch(resolved, dest).files] == ["w.bin"]
    assert (dest / "w.bin").read_bytes() == b"two"
    assert [r.version for r in source.previous_versions(resolved, 3)] == ["m/1"]
    with pytest.raises(ModelNotFoundError):
        source.resolve(parse_ref("models:/m@nope"))

    db.rename(tmp_path / "moved.db")
    with pytest.raises(SourceUnavailableError):
        source.resolve(parse_ref("models:/m@prod"))
    assert not db.exists()  # never recreated empty behind the user's back


def test_sqlite_tracking_runs_and_versions_whose_source_is_a_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from model_loader.sources.mlflow import MlflowRunsSource

    uri = f"sqlite:///{tmp_path / 'track.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "w.bin").write_bytes(b"w")
    (tmp_path / "src" / "sub" / "c.txt").write_bytes(b"c")
    client.log_artifacts(run.info.run_id, str(tmp_path / "src"), "model")
    client.create_registered_model("r")
    client.create_model_version("r", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)

    runs = MlflowRunsSource(tracking_uri=uri, environ={})
    resolved = runs.resolve(parse_ref(f"runs:/{run.info.run_id}/model/sub"))
    assert [(f.path, f.size) for f in resolved.files or ()] == [("c.txt", 1)]
    (tmp_path / "d").mkdir()
    runs.fetch(resolved, tmp_path / "d")
    assert read_tree(tmp_path / "d") == {"c.txt": b"c"}

    models = MlflowRegistrySource(tracking_uri=uri, environ={})
    resolved = models.resolve(parse_ref("models:/r/1/w.bin"))
    assert resolved.version == "r/1/w.bin"
    (tmp_path / "e").mkdir()
    models.fetch(resolved, tmp_path / "e")
    assert read_tree(tmp_path / "e") == {"w.bin": b"w"}


@pytest.mark.parametrize(
    ("sub", "expected"),
    [("", {"sub/b.bin": b"bb"}), ("sub", {"b.bin": b"bb"}), ("sub/b.bin", {"b.bin": b"bb"})],
)
def test_generic_mlflow_artifact_repository_path(tmp_path: Path, sub: str, expected: dict[str, bytes]) -> None:
    from model_loader.sources.mlflow import _artifacts as artifacts

    root = tmp_path / "store"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"a")
    (root / "sub" / "b.bin").write_bytes(b"bb")
    dest = tmp_path / "dest"
    dest.mkdir()
    repo, listing = artifacts.list_with_mlflow(
        root.as_uri(), sub, tracking_uri="file:///unused", registry_uri="file:///unused", deadline=Deadline(60.0)
    )
    listing = dataclasses.replace(listing, files=tuple(f for f in listing.files if not f[0].endswith(".txt")))
    manifest = artifacts.download_with_mlflow(repo, listing, dest, deadline=Deadline(60.0), context=FetchContext())
    assert {e.path: e.size for e in manifest.files} == {p: len(d) for p, d in expected.items()}
    assert read_tree(dest) == expected


def test_mlflow_demo_runs_and_ends_degraded(tmp_path: Path) -> None:
    from model_loader._demo_mlflow import run_mlflow_demo

    rows: list[tuple[str, FetchResult | None]] = []
    run_mlflow_demo(tmp_path / "work", tmp_path / "cache", lambda step, res, secs, note: rows.append((step, res)))
    results = [r for _, r in rows]
    assert all(r is not None for r in results)
    versions = [(r.version, r.from_cache, r.degraded) for r in results if r is not None]
    assert versions == [
        ("demo-iris/1", False, False),
        ("demo-iris/1", True, False),
        ("demo-iris/2", False, False),
        ("demo-iris/2", True, True),
    ]
