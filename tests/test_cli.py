"""The model-loader command, run as users run it: a fresh process."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _s3_server import MotoServer, make_bucket, put_files
from helpers import read_tree, wait_for, write_tree


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "model_loader", *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def fresh(code: str) -> Any:
    """What ``code`` prints as JSON, run in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    write_tree(root, {"model.pkl": b"p" * 1000, "conf/c.json": b"{}", "ckpt/1.ckpt": b"c"})
    return root


def test_fetch_prints_the_path_then_serves_warm(tmp_path: Path, model: Path) -> None:
    cache = str(tmp_path / "cache")
    cold = run("fetch", "--cache-dir", cache, str(model))
    assert cold.returncode == 0, cold.stderr
    path = Path(cold.stdout.strip())
    assert read_tree(path) == read_tree(model)
    warm = run("fetch", "--cache-dir", cache, "--json", str(model))
    assert warm.returncode == 0, warm.stderr
    out = json.loads(warm.stdout)
    assert {"path", "source", "version", "digest", "from_cache", "degraded"} <= out.keys()
    assert out["path"] == str(path)
    assert out["from_cache"] is True
    assert out["degraded"] is False
    assert out["source"] == f"file://{model}"


def test_fetch_json_has_the_integrity_and_transfer_fields(tmp_path: Path, model: Path) -> None:
    out = run("fetch", "--json", "--require-verified", "--cache-dir", str(tmp_path / "c"), str(model))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["verified"] is True
    assert data["size"] == 1000 + 2 + 1
    assert data["downloaded"] == data["size"]  # a cold fetch copied every byte
    assert data["retries"] == {}
    assert set(data["timings"]) == {"resolve", "fetch", "verify", "deserialize", "total"}
    helptext = run("fetch", "--help").stdout
    for field in ("verified", "downloaded", "retries", "deserialize", "exit codes"):
        assert field in helptext


def test_fetch_tries_uris_in_order(tmp_path: Path, model: Path) -> None:
    out = run("fetch", "--cache-dir", str(tmp_path / "c"), "--json", str(tmp_path / "missing"), str(model))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["source"] == f"file://{model}"
    assert data["failures"][0]["source"] == f"file://{tmp_path / 'missing'}"


def test_fetch_env_configuration_and_exclude(tmp_path: Path, model: Path) -> None:
    out = run("fetch", "--json", "--exclude", "ckpt/*", str(model), env={"MODEL_LOADER_CACHE_DIR": str(tmp_path / "c")})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["path"].startswith(str(tmp_path / "c"))
    assert sorted(read_tree(Path(data["path"]))) == ["conf/c.json", "model.pkl"]


def test_cache_dir_flag_wins_over_the_variable_whatever_its_case(tmp_path: Path, model: Path) -> None:
    env = {"model_loader_cache_dir": str(tmp_path / "from-env")}
    out = run("fetch", "--cache-dir", str(tmp_path / "flag"), str(model), env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(tmp_path / "flag"))


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["fetch", "gopher://x/y"], 2, "no source for scheme 'gopher'"),
        (["fetch", "models:/iris"], 2, "name the version"),
        (["fetch", "s3://[x/"], 2, "malformed URL"),
        (["fetch", "/definitely/not/here"], 1, "does not exist"),
        (["cache", "prune"], 2, "--max-size"),
    ],
)
def test_failures_exit_non_zero_with_one_line_and_no_traceback(
    tmp_path: Path, args: list[str], code: int, fragment: str
) -> None:
    out = run(*args, "--cache-dir", str(tmp_path / "c"))
    assert out.returncode == code
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert fragment in lines[0]
    assert "Traceback" not in out.stderr
    assert out.stdout == ""


def test_a_reference_that_is_not_utf8_is_bad_input(tmp_path: Path) -> None:
    # argv as bytes: Python carries the undecodable byte as a surrogate escape
    out = subprocess.run(
        [sys.executable, "-m", "model_loader", "fetch", "--cache-dir", str(tmp_path), os.fsencode(tmp_path) + b"/\xff"],
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert b"byte 0xff" in out.stderr
    assert b"not valid UTF-8" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["fetch", "--timeout", "-1", "/x"],
        ["fetch", "--timeout", "nan", "/x"],
        ["fetch", "--timeout", "soon", "/x"],
        ["cache", "prune", "--max-size", "lots"],
        ["fetch"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    out = run(*args)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr


def test_invalid_configuration_names_the_field(tmp_path: Path, model: Path) -> None:
    out = run("fetch", "--cache-dir", str(tmp_path / "c"), str(model), env={"MODEL_LOADER_DEADLINE": "never"})
    assert out.returncode == 2
    assert "deadline" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_exit_codes_of_errors() -> None:
    from pydantic import ValidationError

    from model_loader import LoaderConfig
    from model_loader.cli import _outcome, _UsageError
    from model_loader.errors import (
        AllSourcesFailedError,
        CacheError,
        InvalidReferenceError,
        InvalidResponseError,
        SourceTimeoutError,
        UnknownSchemeError,
    )

    with pytest.raises(ValidationError) as invalid:
        LoaderConfig(deadline=-1)
    malformed = InvalidResponseError("resolve models:/m/1: the answer is not JSON", scheme="models")
    assert _outcome(invalid.value)[0] == 2
    assert _outcome(InvalidReferenceError("bad"))[0] == 2
    assert _outcome(UnknownSchemeError("gopher"))[0] == 2
    assert _outcome(_UsageError("no size"))[0] == 2
    assert _outcome(CacheError("disk full"))[0] == 3
    # a server's malformed answer, or a bare ValueError from anywhere, is not the user's input
    assert _outcome(malformed)[0] == 1
    assert _outcome(ValueError("Expecting value: line 1 column 1"))[0] == 1
    assert _outcome(json.JSONDecodeError("Expecting value", "<html>", 0))[0] == 1
    failed = AllSourcesFailedError(
        "every source failed", [("models:/m/1", malformed), ("s3://b/m/", SourceTimeoutError("t"))]
    )
    code, line = _outcome(failed)
    assert code == 1
    assert "\n" not in line
    assert "InvalidResponseError" in line
    assert "SourceTimeoutError" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    out = run("fetch", "--debug", "--cache-dir", str(tmp_path / "c"), "/definitely/not/here")
    assert out.returncode == 1  # the exit code still says what happened
    assert "Traceback" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("model-loader: ")


def test_offline_fetch(tmp_path: Path, model: Path) -> None:
    cache = str(tmp_path / "cache")
    empty = run("fetch", "--offline", "--cache-dir", cache, str(model))
    assert empty.returncode == 1
    assert "offline" in empty.stderr
    assert run("fetch", "--cache-dir", cache, str(model)).returncode == 0
    offline = run("fetch", "--offline", "--json", "--cache-dir", cache, str(model))
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["offline"] is True


def test_cache_ls_verify_prune(tmp_path: Path, model: Path) -> None:
    cache = str(tmp_path / "cache")
    first = Path(run("fetch", "--cache-dir", cache, str(model)).stdout.strip())
    (model / "model.pkl").write_bytes(b"changed")
    second = Path(run("fetch", "--cache-dir", cache, str(model)).stdout.strip())
    assert first != second
    ls = run("cache", "ls", "--cache-dir", cache, "--json")
    assert ls.returncode == 0, ls.stderr
    listed = json.loads(ls.stdout)
    assert {e["path"] for e in listed} == {str(first), str(second)}
    table = run("cache", "ls", "--cache-dir", cache)
    assert "2 entries" in table.stdout
    assert run("cache", "verify", "--cache-dir", cache).returncode == 0
    (second / "model.pkl").write_bytes(b"CHANGED")  # same size, different bytes
    bad = run("cache", "verify", "--cache-dir", cache)
    assert bad.returncode == 1
    assert "corrupt" in bad.stdout
    prune = run("cache", "prune", "--cache-dir", cache, "--max-size", "0")
    assert prune.returncode == 0, prune.stderr
    assert not first.exists()  # no ref points at it any more
    assert json.loads(run("cache", "ls", "--cache-dir", cache, "--json").stdout) == []


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("model-loader ")
    helptext = run("--help").stdout
    assert "fetch" in helptext
    assert "bench" in helptext


def test_bench_is_imported_only_when_it_runs(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from model_loader.cli import main\n"
        f"main(['cache', 'ls', '--cache-dir', {str(tmp_path)!r}])\n"
        "print(json.dumps('model_loader._bench_cli' in sys.modules))\n"
    )
    assert fresh(code) is False
    if importlib.util.find_spec("model_loader._bench_cli") is not None:
        out = run("bench", "--help")
        assert out.returncode == 0, out.stderr
        assert "--repeat" in out.stdout


def test_bench_without_its_module_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from model_loader import cli

    monkeypatch.setattr(cli, "_bench_module", lambda: None)
    assert cli.main(["bench", "--repeat", "2", "models:/iris/1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("model-loader: the bench command is not available")
    assert len(err.strip().splitlines()) == 1


# -- start-up: what the command imports before it can refuse or serve -------------------------------


def test_an_invalid_reference_is_refused_before_anything_heavy_is_imported() -> None:
    code = (
        "import json, sys\n"
        "from model_loader.cli import main\n"
        "code = main(['fetch', 'models:/iris'])\n"
        "print(json.dumps([code, sorted(sys.modules)]))\n"
    )
    code, modules = fresh(code)
    assert code == 2
    for heavy in ("pydantic", "model_loader.loader", "model_loader.config", "boto3", "mlflow", "importlib.metadata"):
        assert heavy not in modules


def test_a_warm_local_fetch_reads_no_entry_points_and_imports_nothing_heavy(tmp_path: Path, model: Path) -> None:
    cache = str(tmp_path / "c")
    assert run("fetch", "--cache-dir", cache, str(model)).returncode == 0
    code = (
        "import json, sys\n"
        "from model_loader.cli import main\n"
        "from model_loader import registry\n"
        f"code = main(['fetch', '--cache-dir', {cache!r}, '--timeout', '30', {str(model)!r}])\n"
        "print(json.dumps([code, registry._discovered, sorted(sys.modules)]))\n"
    )
    code, discovered, modules = fresh(code)
    assert code == 0
    assert discovered is False
    for heavy in ("pydantic", "tenacity", "asyncio", "boto3", "botocore", "mlflow", "fsspec"):
        assert heavy not in modules


# -- the light configuration path agrees with pydantic ---------------------------------------------


CONFIG_CORPUS: list[tuple[dict[str, str], dict[str, Any]]] = [
    ({}, {}),
    ({"MODEL_LOADER_DEADLINE": "90", "MODEL_LOADER_CONNECT_TIMEOUT": "1.5"}, {}),
    ({"MODEL_LOADER_DEADLINE": "90"}, {"deadline": 3.0}),
    ({"MODEL_LOADER_DEADLINE": "1e3", "MODEL_LOADER_READ_TIMEOUT": " 7"}, {}),  # valid, but left to pydantic
    (
        {
            "MODEL_LOADER_OFFLINE": "YES",
            "MODEL_LOADER_REQUIRE_VERIFIED": "0",
            "model_loader_allow_local_artifacts": "on",
        },
        {},
    ),
    ({"MODEL_LOADER_SOURCES": "models:/a@b, s3://b/p/,", "MODEL_LOADER_EXCLUDE": "x/*,*.gz"}, {"include": ("a",)}),
    (
        {"MODEL_LOADER_CACHE_DIR": "~/models", "MODEL_LOADER_MAX_CACHE_SIZE": "1.5GiB", "MODEL_LOADER_VERIFY": "full"},
        {},
    ),
    ({"MODEL_LOADER_MIN_FREE": "10 gb", "MODEL_LOADER_LOCK_TIMEOUT": "5", "MODEL_LOADER_MEMORY_ITEMS": "0"}, {}),
    ({"MODEL_LOADER_RETRY_ATTEMPTS": "100", "MODEL_LOADER_SOURCE_DEADLINE": "0.5"}, {}),
    ({"MODEL_LOADER_MAX_CONCURRENCY": "256", "MODEL_LOADER_FALLBACK_VERSIONS": "100"}, {"resolve_ttl": 0}),
    ({"MODEL_LOADER_RESOLVE_TTL": "0", "MODEL_LOADER_RESOLVE_TIMEOUT": "0.25"}, {"offline": True}),
    ({"XDG_CACHE_HOME": "~/xdg"}, {"retry": {"attempts": 2, "jitter": 0}}),
    ({}, {"cache": {"dir": "/tmp/c", "max_size": 10}, "max_concurrency": 4}),
]
CONFIG_INVALID: list[tuple[dict[str, str], dict[str, Any]]] = [
    ({"MODEL_LOADER_DEADLINE": "0"}, {}),
    ({"MODEL_LOADER_DEADLINE": "nan"}, {}),
    ({"MODEL_LOADER_RETRY_ATTEMPTS": "101"}, {}),
    ({"MODEL_LOADER_MAX_CONCURRENCY": "0"}, {}),
    ({"MODEL_LOADER_MAX_CONCURRENCY": "257"}, {}),
    ({"MODEL_LOADER_FALLBACK_VERSIONS": "-1"}, {}),
    ({"MODEL_LOADER_MEMORY_ITEMS": "1.5"}, {}),
    ({"MODEL_LOADER_RESOLVE_TTL": "-0.1"}, {}),
    ({"MODEL_LOADER_VERIFY": "FULL"}, {}),
    ({"MODEL_LOADER_OFFLINE": "2"}, {}),
    ({"MODEL_LOADER_MAX_CACHE_SIZE": ""}, {}),
    ({"MODEL_LOADER_CACHE_DIR": "/x"}, {"deadline": -1}),
    ({}, {"cache_dirr": "/x"}),
    ({}, {"retry": {"attempts": 0}}),
    ({}, {"deadline": 10**400}),
]


def _both_paths(environ: dict[str, str], overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """(light path, pydantic path) of ``LoaderConfig.from_env``: results or exception types."""
    from model_loader import config

    def outcome() -> Any:
        try:
            return config.LoaderConfig.from_env(environ, **overrides)
        except Exception as exc:
            return type(exc)

    light = outcome()

    def unsure(*args: object) -> None:
        raise config.Unsure

    with monkeypatch.context() as patch:
        patch.setattr(config, "light_from_env", unsure)
        validated = outcome()
    return light, validated


def test_the_plain_settings_have_the_models_fields_defaults_and_checks() -> None:
    """Without a light check, from_env still works but always pays for pydantic's validator."""
    import dataclasses

    from model_loader import _settings, config

    twins = {
        config.RetryPolicy: _settings.RetrySettings,
        config.CacheConfig: _settings.CacheSettings,
        config.LoaderConfig: _settings.Settings,
    }
    for model, plain in twins.items():
        fields = {f.name: f for f in dataclasses.fields(plain)}
        assert set(model.model_fields) == set(fields) == set(_settings.CHECKS[plain]), model.__name__
        built = model() if model is not config.CacheConfig else model(dir="/x")
        for name, f in fields.items():
            if f.default is not dataclasses.MISSING:
                assert getattr(built, name) == f.default, (model.__name__, name)


@pytest.mark.parametrize(("environ", "overrides"), CONFIG_CORPUS)
def test_the_light_config_path_builds_what_pydantic_builds(
    environ: dict[str, str], overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    environ = {"HOME": str(tmp_path), **environ}
    light, validated = _both_paths(environ, overrides, monkeypatch)
    assert light == validated
    assert repr(light) == repr(validated)  # same types too: 5.0, not 5


@pytest.mark.parametrize(("environ", "overrides"), CONFIG_INVALID)
def test_the_light_config_path_leaves_every_error_to_pydantic(
    environ: dict[str, str], overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    assert _both_paths(environ, overrides, monkeypatch) == (ValidationError, ValidationError)


# -- --timeout ends a fetch from servers that never answer ----------------------------------------


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()
    thread.join(timeout=10)


def test_timeout_ends_the_fetch_when_servers_never_answer(tmp_path: Path, black_hole: int) -> None:
    endpoint = f"http://127.0.0.1:{black_hole}"
    env = {
        "MLFLOW_TRACKING_URI": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    refs = ["models:/iris/1", "s3://models/iris/"]
    # Start-up (interpreter, imports, building both sources) measured the same way, without the network.
    t0 = time.monotonic()
    offline = run("fetch", "--offline", "--cache-dir", str(tmp_path / "c"), *refs, env=env)
    startup = time.monotonic() - t0
    assert offline.returncode == 1, offline.stderr
    t0 = time.monotonic()
    out = run("fetch", "--timeout", "3", "--cache-dir", str(tmp_path / "c"), *refs, env=env)
    elapsed = time.monotonic() - t0
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert re.search(r"timeout|timed out|deadline", lines[0], re.IGNORECASE), lines[0]
    # The promise: the fetch ends within T + 1 s; start-up counted twice as slack for a noisy machine.
    limit = 3 + 1 + 2 * startup + 1
    assert elapsed < limit, f"took {elapsed:.1f}s (limit {limit:.1f}s, start-up {startup:.1f}s): {lines[0]}"


# -- --debug and --debug-sdk, and the credentials neither may print --------------------------------


SESSION_TOKEN = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN/Zz+0123456789abcdefSECRET=="


@pytest.fixture
def s3_model(moto_server: MotoServer, s3_client: Any, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """An S3 model on the moto server and the environment to reach it with a session token."""
    bucket = make_bucket(s3_client, "cli")
    put_files(s3_client, bucket, "iris/", {"model.pkl": b"m" * 2048, "MLmodel": b"flavors: {}\n"})
    env = {
        "AWS_ENDPOINT_URL": moto_server.endpoint_url,
        "AWS_SESSION_TOKEN": SESSION_TOKEN,
        "AWS_EC2_METADATA_DISABLED": "true",
        "MODEL_LOADER_CACHE_DIR": str(tmp_path / "cache"),
    }
    return f"s3://{bucket}/iris/", env


def _leaks(text: str) -> list[str]:
    from urllib.parse import quote

    return [s for s in (SESSION_TOKEN, quote(SESSION_TOKEN, safe=""), "SESSIONTOKEN", "testing") if s in text]


def test_debug_sdk_logs_the_wire_but_never_a_credential(s3_model: tuple[str, dict[str, str]]) -> None:
    uri, env = s3_model
    out = run("fetch", "--debug-sdk", uri, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DEBUG botocore" in out.stderr  # the SDK's wire logs are on...
    assert "Authorization" in out.stderr
    assert not _leaks(out.stderr)  # ...and redacted
    assert "x-amz-security-token:***" in out.stderr.lower()
    assert "'Authorization': b'***'" in out.stderr
    assert "Signature:\n***" in out.stderr
    assert not re.search(r"Signature(?:=|:\n)(?!\*\*\*)", out.stderr)


def test_debug_is_model_loader_only(s3_model: tuple[str, dict[str, str]]) -> None:
    uri, env = s3_model
    out = run("fetch", "--debug", uri, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    loggers = set(re.findall(r"^(?:DEBUG|INFO|WARNING|ERROR) ([\w.]+):", out.stderr, re.MULTILINE))
    assert loggers
    assert all(name.startswith("model_loader") for name in loggers), loggers
    assert not _leaks(out.stderr)


def test_a_debug_traceback_is_redacted(tmp_path: Path) -> None:
    presigned = (
        "https://bucket.s3.amazonaws.com/m/model.pkl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential=ASIAEXAMPLE%2F20261128%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Security-Token={SESSION_TOKEN}"
        "&X-Amz-Signature=0123abcd"
    )
    code = (
        "import sys\n"
        "from model_loader.cli import _report\n"
        f"try:\n    raise ConnectionError('GET {presigned} failed')\n"
        "except ConnectionError as exc:\n    sys.exit(_report(exc, debug=True))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "AWS_SESSION_TOKEN": SESSION_TOKEN},
    )
    assert out.returncode == 1
    assert "Traceback" in out.stderr
    assert "https://bucket.s3.amazonaws.com/m/model.pkl?***" in out.stderr
    assert "ASIAEXAMPLE" not in out.stderr
    assert not _leaks(out.stderr)


@pytest.mark.parametrize(
    ("line", "kept", "gone"),
    [
        (  # botocore: the prepared request
            "Sending http request: <AWSPreparedRequest method=GET, url=http://127.0.0.1:9000/b/k, headers={"
            "'X-Amz-Security-Token': b'FQoGZXIvYXdzEXAMPLE', 'Authorization': b'AWS4-HMAC-SHA256 "
            "Credential=ASIAEXAMPLE/20261128/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=9f8e7d'}>",
            ["url=http://127.0.0.1:9000/b/k", "'Authorization': b'***'"],
            ["FQoGZXIvYXdzEXAMPLE", "ASIAEXAMPLE", "9f8e7d"],
        ),
        (  # botocore: signing steps
            "CanonicalRequest:\nGET\n/b/k\n\nhost:127.0.0.1\nx-amz-security-token:FQoGZXIvYXdzEXAMPLE\n\nhost",
            ["host:127.0.0.1", "x-amz-security-token:***"],
            ["FQoGZXIvYXdzEXAMPLE"],
        ),
        ("Signature:\n3ca49ee096044ac1fac0d6d38862647543e8533a", ["Signature:\n***"], ["3ca49ee0960"]),
        (  # urllib3: a presigned GET (SigV2 and SigV4)
            'http://127.0.0.1:9000 "GET /b/k?AWSAccessKeyId=AKIAEXAMPLE&Signature=4gNr%2FS&'
            'x-amz-security-token=FQoGZXIvYXdzEXAMPLE&Expires=1795855613 HTTP/1.1" 200 0',
            ['"GET /b/k?*** HTTP/1.1" 200 0'],
            ["AKIAEXAMPLE", "4gNr", "FQoGZXIvYXdzEXAMPLE"],
        ),
        (
            "GET https://s3.amazonaws.com/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=ASIAEX%2F2026"
            "&X-Amz-Date=20261128T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=abc123",
            ["https://s3.amazonaws.com/b/k?***"],
            ["ASIAEX", "abc123"],
        ),
        ("Authorization: Bearer dapi0123456789abcdef", ["Authorization: ***"], ["dapi0123456789abcdef"]),
        ("headers {'authorization': 'Basic dXNlcjpwYXNz'}", ["'authorization': '***'"], ["dXNlcjpwYXNz"]),
        ("send: Authorization=Bearer x; token=abc123&page=2", ["page=2"], ["abc123"]),
        ("tracking URI https://alice:s3cr3t@mlflow.internal/api", ["alice:***@mlflow.internal"], ["s3cr3t"]),
        (
            "<Credentials><AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>wJalrXUt</SecretAccessKey>"
            "<SessionToken>FQoGZ</SessionToken></Credentials>",
            ["<AccessKeyId>ASIA1</AccessKeyId>", "<SessionToken>***</SessionToken>"],
            ["wJalrXUt", "FQoGZ"],
        ),
        ('{"token": "dapiXYZ", "name": "iris"}', ['"token": "***"', '"name": "iris"'], ["dapiXYZ"]),
        (  # nothing secret: left alone
            "resolve models:/iris@champion (mlflow+http://127.0.0.1:5000): version 3, 2 files, 1.2 MiB",
            ["resolve models:/iris@champion (mlflow+http://127.0.0.1:5000): version 3, 2 files, 1.2 MiB"],
            [],
        ),
    ],
)
def test_redact(line: str, kept: list[str], gone: list[str]) -> None:
    from model_loader.cli import redact

    text = redact(line)
    for fragment in kept:
        assert fragment in text
    for fragment in gone:
        assert fragment not in text


def test_redacting_filter_on_a_real_handler(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from model_loader.cli import RedactingFilter

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-0123456789-secret")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("test_cli.redact")
    log.addHandler(handler)
    try:
        log.warning("header %s", {"X-Custom": "tok-0123456789-secret"})
        try:
            raise RuntimeError("Bearer tok-0123456789-secret refused")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    err = capsys.readouterr().err
    assert "tok-0123456789-secret" not in err
    assert "RuntimeError" in err


# -- the progress bar -------------------------------------------------------------------------------


def test_progress_bar_counts_bytes_as_they_arrive_not_file_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model_loader.cli import _Progress

    stage = tmp_path / "stage"
    stage.mkdir()
    with open(stage / "weights.bin", "wb") as f:
        f.truncate(4096)  # preallocated to its full size, as the S3 source does: not progress
    bar = _Progress(interval=0.01)
    bar.fetch_started("s3://bucket/model/", stage, 4096)
    seen: list[str] = []

    def shows(text: str) -> bool:
        seen.append(capsys.readouterr().err)
        return text in "".join(seen)

    wait_for(lambda: shows("0 B/4.0 KiB"), what="the bar at 0 bytes")
    for _ in range(2):
        threading.Thread(target=bar.fetch_progress, args=("s3://bucket/model/", 1024)).start()
    wait_for(lambda: shows("2.0 KiB/4.0 KiB"), what="the bar at 2 KiB")
    bar.fetch_progress("s3://bucket/model/", 2048)
    bar.fetch_progress("s3://bucket/model/", 512)  # a retried part: counted again, the bar stops at the total
    bar.fetch_finished("s3://bucket/model/")
    text = "".join(seen) + capsys.readouterr().err
    assert "s3://bucket/model/ [" in text
    assert "4.0 KiB/4.0 KiB" in text.rsplit("\r", 1)[-1]  # the last draw shows the total
    assert "4.5 KiB" not in text
    assert text.endswith("\n")
