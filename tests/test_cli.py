"""The model-loader command, run as users run it: a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_tree, write_tree


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "model_loader", *args], capture_output=True, text=True, env=full_env, timeout=120
    )


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


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["fetch", "gopher://x/y"], 2, "no source for scheme 'gopher'"),
        (["fetch", "models:/iris"], 2, "name the version"),
        (["fetch", "/definitely/not/here"], 1, "does not exist"),
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


def test_invalid_configuration_names_the_field(tmp_path: Path, model: Path) -> None:
    out = run("fetch", "--cache-dir", str(tmp_path / "c"), str(model), env={"MODEL_LOADER_DEADLINE": "never"})
    assert out.returncode == 2
    assert "deadline" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    out = run("fetch", "--debug", "--cache-dir", str(tmp_path / "c"), "/definitely/not/here")
    assert out.returncode != 0
    assert "Traceback" in out.stderr


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


def test_prune_without_a_size_is_a_usage_error(tmp_path: Path) -> None:
    out = run("cache", "prune", "--cache-dir", str(tmp_path / "c"))
    assert out.returncode == 2
    assert "--max-size" in out.stderr


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("model-loader ")
    assert "fetch" in run("--help").stdout


def test_progress_bar_reports_bytes_staged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from model_loader.cli import _Progress

    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "part").write_bytes(b"x" * 2048)
    bar = _Progress()
    bar.fetch_started("s3://bucket/model/", stage, 4096)
    deadline = time.monotonic() + 10
    seen = ""
    while "2.0 KiB/4.0 KiB" not in seen and time.monotonic() < deadline:
        seen += capsys.readouterr().err
        time.sleep(0.05)  # polling the captured stream, not waiting for time to pass
    bar.fetch_finished("s3://bucket/model/")
    assert "s3://bucket/model/ [" in seen
    assert "2.0 KiB/4.0 KiB" in seen
