"""The KServe storage initializer, run as KServe's init container runs it: a subprocess given
``<src_uri> <dest_path>`` pairs and configured by environment variables (the credentials and
endpoint KServe's S3 credential builder injects, MLflow's tracking URI), against a real moto
S3 server and a real MLflow server whose artifacts live in moto S3.

KServe starts the model server once the init container has exited 0 and reads the
destination then; the tests check the exit code, the one JSON line per pair, the files in
each destination, and that nothing is ever written outside one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _fault_proxy import FaultProxy
from _mlflow_server import MlflowServer
from _s3_server import MotoServer, make_bucket, put_files
from helpers import read_tree, write_tree
from model_loader import FileEntry, IntegrityError, Manifest
from model_loader.kserve import MARKER, DestinationError, main, materialize

FILES = {
    "MLmodel": b"flavors: {}\n",
    "model.pkl": b"\x80\x04weights" * 4096,
    "tokenizer/vocab.txt": b"a\nb\nc\n",
}
SECRET = "kserve-test-secret-7d1c4e9a0b"  # long enough for the redaction to know it; moto accepts any key
RUN_TIMEOUT = 300  # a guard against a hung subprocess, not a performance claim


@dataclass
class Run:
    code: int
    lines: list[dict[str, Any]]  # stdout: one JSON object per pair
    stderr: list[str]


def initializer(env: dict[str, str], *args: str | Path) -> Run:
    """``python -m model_loader.kserve <src> <dest> ...`` as KServe's init container runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "model_loader.kserve", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert SECRET not in proc.stdout + proc.stderr
    return Run(proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr.splitlines())


def model_files(dest: Path) -> dict[str, bytes]:
    """The files a model server sees in ``dest`` (the completion marker aside)."""
    return {k: v for k, v in read_tree(dest).items() if k != MARKER}


def marker(dest: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((dest / MARKER).read_bytes())
    return data


def kserve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: credentials as KServe injects them from a Secret, the cache on a volume."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MODEL_LOADER_CACHE_DIR": str(tmp_path / "cache"),
    }
    env.update(extra)
    return env


def s3_endpoint(url: str) -> dict[str, str]:
    """What KServe's S3 credential builder sets for an ``s3-endpoint`` annotation."""
    return {"AWS_ENDPOINT_URL": url, "S3_ENDPOINT": url.split("://", 1)[1], "S3_USE_HTTPS": "0"}


def mlflow_env(tracking_uri: str, moto: MotoServer) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_S3_ENDPOINT_URL": moto.endpoint_url}


@pytest.fixture
def bucket(s3_client: Any) -> str:
    return make_bucket(s3_client, "kserve")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def assert_served(line: dict[str, Any], source: str, dest: Path, *, degraded: bool = False) -> None:
    assert line["source"] == source
    assert line["dest"] == str(dest)
    assert line["digest"].startswith("sha256:")
    assert line["degraded"] is degraded
    assert isinstance(line["verified"], bool)
    assert line["files"] == len(FILES)
    assert line["size"] == sum(map(len, FILES.values()))
    assert model_files(dest) == FILES
    done = marker(dest)
    assert done["complete"] is True
    assert (done["digest"], done["version"]) == (line["digest"], line["version"])


# -- fetching, as KServe runs it -----------------------------------------------------------------


@pytest.mark.slow
def test_models_alias_from_the_registry_fills_dest(
    mlflow_s3_server: MlflowServer, moto_server: MotoServer, tmp_path: Path
) -> None:
    name = unique("kserve-alias")
    ref = mlflow_s3_server.publish_files(name, FILES, alias="champion")
    dest = tmp_path / "mnt" / "models"
    env = kserve_env(tmp_path, **mlflow_env(mlflow_s3_server.url, moto_server))

    run = initializer(env, ref.uri, dest)

    assert (run.code, run.stderr) == (0, [])
    [line] = run.lines
    assert_served(line, ref.uri, dest)
    assert line["version"] == f"{name}/1"
    assert line["verified"] is True  # every byte checked against what S3 published
    # the cache and dest share a filesystem here: hard links to the verified cache entry
    assert line["method"] == "hardlink"
    assert (dest / "model.pkl").stat().st_nlink == 2


@pytest.mark.slow
def test_s3_prefix_fills_dest(s3_client: Any, moto_server: MotoServer, bucket: str, tmp_path: Path) -> None:
    put_files(s3_client, bucket, "fraud/v1/", FILES)
    dest = tmp_path / "mnt" / "models"
    env = kserve_env(tmp_path, **s3_endpoint(moto_server.endpoint_url))

    run = initializer(env, f"s3://{bucket}/fraud/v1/", dest)

    assert (run.code, run.stderr) == (0, [])
    [line] = run.lines
    assert_served(line, f"s3://{bucket}/fraud/v1/", dest)
    assert (line["from_cache"], line["downloaded"]) == (False, line["size"])


@pytest.mark.slow
def test_two_pairs_in_one_run_as_storage_uris_gives_them(
    mlflow_s3_server: MlflowServer, moto_server: MotoServer, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    """``storageUris`` with two mount paths under one parent: one init container, two pairs."""
    ref = mlflow_s3_server.publish_files(unique("kserve-base"), FILES, alias="prod")
    put_files(s3_client, bucket, "adapters/lora/", FILES)
    base, adapter = tmp_path / "mnt" / "models" / "base", tmp_path / "mnt" / "models" / "adapter"
    env = kserve_env(tmp_path, **mlflow_env(mlflow_s3_server.url, moto_server), **s3_endpoint(moto_server.endpoint_url))

    run = initializer(env, ref.uri, base, f"s3://{bucket}/adapters/lora/", adapter)

    assert (run.code, run.stderr) == (0, [])
    first, second = run.lines
    assert_served(first, ref.uri, base)
    assert_served(second, f"s3://{bucket}/adapters/lora/", adapter)
    assert first["version"] != second["version"]


@pytest.mark.slow
@pytest.mark.parametrize("uri_prefix", ["m/", "m"])
def test_a_key_that_would_leave_dest_is_refused_and_nothing_is_written(
    s3_client: Any, moto_server: MotoServer, bucket: str, tmp_path: Path, uri_prefix: str
) -> None:
    """KServe's storage writes ``m/../../x`` to ``<dest>/../../x``; this initializer refuses it."""
    put_files(s3_client, bucket, "m/", {"model.pkl": b"weights"})
    s3_client.put_object(Bucket=bucket, Key="m/../../x", Body=b"planted two directories above dest")
    assert "m/../../x" in [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    top = tmp_path / "pod"
    dest = top / "var" / "mnt" / "models"
    dest.mkdir(parents=True)  # KServe's emptyDir exists before the init container runs
    env = kserve_env(tmp_path, **s3_endpoint(moto_server.endpoint_url))

    run = initializer(env, f"s3://{bucket}/{uri_prefix}", dest)

    assert run.code == 1
    assert run.lines == []
    [line] = run.stderr
    assert "'../../x'" in line
    assert "escapes the model directory" in line
    assert [p for p in tmp_path.rglob("*") if p.name == "x"] == []
    # every directory from dest up to the pod's root holds only the way down to dest
    assert list(dest.iterdir()) == []
    for above in (dest.parent, dest.parent.parent, top):
        assert [p.name for p in above.iterdir()] == [dest.relative_to(above).parts[0]]
    assert list((tmp_path / "cache" / "entries").iterdir()) == []


@pytest.fixture(params=["models", "s3"])
def store(
    request: pytest.FixtureRequest, moto_server: MotoServer, s3_client: Any, bucket: str, tmp_path: Path
) -> Iterator[tuple[str, FaultProxy, dict[str, str]]]:
    """A model behind a proxy that the test stops: the registry (models:/) or the store (s3://) goes down."""
    if request.param == "models":
        server: MlflowServer = request.getfixturevalue("mlflow_s3_server")
        ref = server.publish_files(unique("kserve-down"), FILES, alias="champion").uri
        with FaultProxy(server.url) as proxy:
            yield ref, proxy, kserve_env(tmp_path, **mlflow_env(proxy.url, moto_server))
    else:
        put_files(s3_client, bucket, "down/", FILES)
        with FaultProxy(moto_server.endpoint_url) as proxy:
            yield f"s3://{bucket}/down/", proxy, kserve_env(tmp_path, **s3_endpoint(proxy.url))


@pytest.mark.slow
def test_warm_cache_serves_degraded_when_the_store_is_down(
    store: tuple[str, FaultProxy, dict[str, str]], tmp_path: Path
) -> None:
    uri, proxy, env = store
    first = initializer(env, uri, tmp_path / "pod-1" / "models")
    assert (first.code, first.stderr) == (0, [])

    proxy.stop()  # connections to the registry or store are now refused
    dest = tmp_path / "pod-2" / "models"
    run = initializer(env, uri, dest)

    assert run.code == 0
    [line] = run.lines
    assert_served(line, uri, dest, degraded=True)
    assert (line["version"], line["digest"]) == (first.lines[0]["version"], first.lines[0]["digest"])
    assert "SourceUnavailableError" in line["failures"][0]["error"]
    [warning] = run.stderr
    assert "degraded" in warning
    assert line["version"] in warning


# -- what is already in dest ---------------------------------------------------------------------


@pytest.mark.slow
def test_dest_holding_files_of_someone_else_is_refused_untouched(
    s3_client: Any, moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    put_files(s3_client, bucket, "m/", FILES)
    dest = tmp_path / "models"
    write_tree(dest, {"model.pkl": b"someone else's model"})
    env = kserve_env(tmp_path, **s3_endpoint(moto_server.endpoint_url))

    run = initializer(env, f"s3://{bucket}/m/", dest)

    assert (run.code, run.lines) == (4, [])
    [line] = run.stderr
    assert "'model.pkl'" in line
    assert "did not write" in line
    assert read_tree(dest) == {"model.pkl": b"someone else's model"}


@pytest.mark.slow
def test_dest_written_before_is_kept_when_unchanged_and_replaced_when_the_model_moved(
    s3_client: Any, moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """An init container that runs again (pod sandbox restarted, emptyDir kept) finds its own work."""
    put_files(s3_client, bucket, "m/", FILES)
    dest = tmp_path / "models"
    env = kserve_env(tmp_path, **s3_endpoint(moto_server.endpoint_url))
    first = initializer(env, f"s3://{bucket}/m/", dest)
    assert first.code == 0
    inode = (dest / "model.pkl").stat().st_ino

    again = initializer(env, f"s3://{bucket}/m/", dest)

    assert (again.code, again.lines[0]["method"]) == (0, "unchanged")
    assert (dest / "model.pkl").stat().st_ino == inode
    assert model_files(dest) == FILES

    moved = {"MLmodel": b"flavors: {v: 2}\n", "weights/w.bin": b"w2" * 100}
    put_files(s3_client, bucket, "m/", moved)
    run = initializer(env, f"s3://{bucket}/m/", dest)

    assert (run.code, run.lines[0]["method"]) == (0, "hardlink")
    assert run.lines[0]["version"] != first.lines[0]["version"]
    assert model_files(dest) == moved  # model.pkl and tokenizer/ of the old version are gone
    assert marker(dest)["entries"] == ["MLmodel", "weights"]


@pytest.mark.slow
def test_an_interrupted_run_is_cleaned_up(s3_client: Any, moto_server: MotoServer, bucket: str, tmp_path: Path) -> None:
    """What a kill -9 leaves (the marker says incomplete, half-moved entries, staging) is ours to clean."""
    put_files(s3_client, bucket, "m/", FILES)
    dest = tmp_path / "models"
    write_tree(
        dest,
        {
            "model.pkl": b"half",
            ".model-loader-staging-0123456789abcdef/tokenizer/vocab.txt": b"a\n",
            ".model-loader-staging-fedcba9876543210.marker": b"{",
        },
    )
    (dest / MARKER).write_text(json.dumps({"format": 1, "complete": False, "entries": ["MLmodel", "model.pkl"]}))
    env = kserve_env(tmp_path, **s3_endpoint(moto_server.endpoint_url))

    run = initializer(env, f"s3://{bucket}/m/", dest)

    assert (run.code, run.stderr) == (0, [])
    assert_served(run.lines[0], f"s3://{bucket}/m/", dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted([MARKER, "MLmodel", "model.pkl", "tokenizer"])


@pytest.mark.slow
def test_a_cache_on_another_filesystem_is_copied_and_checked(
    s3_client: Any, moto_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    """The usual KServe case: the cache volume and the emptyDir at /mnt/models are two filesystems.
    A cached file altered in place (same size) is caught by the copy's hash and fetched again."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev):
        pytest.skip("needs a second writable filesystem (/dev/shm)")
    put_files(s3_client, bucket, "m/", FILES)
    dest = shm / unique("kserve-test-dest")
    env = kserve_env(tmp_path, **s3_endpoint(moto_server.endpoint_url))
    try:
        run = initializer(env, f"s3://{bucket}/m/", dest)
        assert (run.code, run.stderr) == (0, [])
        assert run.lines[0]["method"] == "copy"
        assert (dest / "model.pkl").stat().st_nlink == 1
        assert_served(run.lines[0], f"s3://{bucket}/m/", dest)

        [cached] = (tmp_path / "cache" / "entries").glob("*/files/model.pkl")
        cached.write_bytes(b"X" * cached.stat().st_size)  # same size: a fast hit check cannot tell
        again = initializer(env, f"s3://{bucket}/m/", shm / unique("kserve-test-dest2"))
        assert again.code == 0
        assert again.lines[0]["from_cache"] is False  # quarantined and fetched again
        assert model_files(Path(again.lines[0]["dest"])) == FILES
    finally:
        for path in shm.glob("kserve-test-dest*"):
            subprocess.run(["rm", "-rf", str(path)], check=True)


# -- bad input: refused before anything is fetched -----------------------------------------------


def test_an_unsupported_uri_names_what_is_supported(tmp_path: Path) -> None:
    run = initializer(kserve_env(tmp_path), "gs://models/fraud", tmp_path / "models")

    assert (run.code, run.lines) == (2, [])
    [line] = run.stderr
    assert "'gs://models/fraud'" in line
    assert all(form in line for form in ("models:/", "s3://", "file://"))
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "expected SRC_URI DEST_PATH pairs, got 0"),
        (["s3://b-1/m/"], "expected SRC_URI DEST_PATH pairs, got 1"),
        (["hf://org/model", "{d}/a"], "unsupported storage URI 'hf://org/model'"),
        (["models:/fraud", "{d}/a"], "invalid model reference"),
        (["s3://b-1/m/", "{d}/a", "s3://b-1/n/", "{d}/a/b"], "overlap"),
        (["s3://b-1/m/", "{d}/a", "s3://b-1/n/", "{d}/a"], "overlap"),
        (["s3://b-1/m/", "{d}"], "cache directory"),  # the cache would sit inside dest
        (["{d}/a", "{d}/a/models"], "source directory"),
        (["s3://b-1/m/", ""], "is empty"),
        (["--bogus", "s3://b-1/m/", "{d}/a"], "unknown option '--bogus'"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODEL_LOADER_CACHE_DIR", str(tmp_path / "cache"))
    assert main([a.format(d=tmp_path) for a in args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert says in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing fetched, nothing created


def test_invalid_configuration_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODEL_LOADER_RETRY_ATTEMPTS", "zero")
    assert main(["s3://b-1/m/", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "invalid configuration" in err
    assert "attempts" in err


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "SRC_URI DEST_PATH" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("model-loader-storage-initializer ")


# -- defence in depth: the entry point checks again what sources already refuse ------------------


def entry(path: str, data: bytes) -> FileEntry:
    import hashlib

    return FileEntry(path, len(data), hashlib.sha256(data).hexdigest())


RECORD = {"source": "s3://b/m/", "version": "v", "digest": "sha256:0", "verified": True, "degraded": False}


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/x", "a//x", ".model-loader", ".model-loader-staging-1/x"])
def test_materialize_refuses_a_path_that_leaves_dest_or_is_reserved(tmp_path: Path, path: str) -> None:
    files_dir = tmp_path / "entry" / "files"
    write_tree(files_dir, {"ok": b"ok"})
    dest = tmp_path / "pod" / "models"

    with pytest.raises(IntegrityError):
        materialize(files_dir, Manifest.of([entry("ok", b"ok"), entry(path, b"evil")]), dest, record=RECORD)

    assert not dest.exists()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "entry",
        "entry/files",
        "entry/files/ok",
    ]


def test_materialize_refuses_a_cached_symlink_and_leaves_dest_empty(tmp_path: Path) -> None:
    files_dir = tmp_path / "entry" / "files"
    write_tree(files_dir, {"a": b"a"})
    (tmp_path / "secret").write_bytes(b"host file")
    (files_dir / "b").symlink_to(tmp_path / "secret")
    dest = tmp_path / "models"

    with pytest.raises(IntegrityError, match="not a regular file"):
        materialize(files_dir, Manifest.of([entry("a", b"a"), entry("b", b"host file")]), dest, record=RECORD)

    assert list(dest.iterdir()) == []


def test_a_marker_naming_paths_outside_dest_deletes_nothing(tmp_path: Path) -> None:
    files_dir = tmp_path / "entry" / "files"
    write_tree(files_dir, {"a": b"a"})
    (tmp_path / "victim").write_bytes(b"keep me")
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / MARKER).write_text(json.dumps({"format": 1, "complete": False, "entries": ["../victim"]}))

    with pytest.raises(DestinationError, match="cannot be read"):
        materialize(files_dir, Manifest.of([entry("a", b"a")]), dest, record=RECORD)

    assert (tmp_path / "victim").read_bytes() == b"keep me"
