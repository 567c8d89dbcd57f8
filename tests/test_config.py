from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from model_loader import CacheConfig, LoaderConfig, RetryPolicy
from model_loader.config import parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (0, 0),
        ("1024", 1024),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("1.5GiB", 3 * 2**29),
        ("10 gb", 10**10),
        ("2M", 2 * 10**6),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "1XB", "-5", -1])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_from_env_reads_prefixed_variables(tmp_path: Path) -> None:
    env = {
        "MODEL_LOADER_SOURCES": "models:/iris@prod, s3://b/iris/",
        "MODEL_LOADER_CACHE_DIR": str(tmp_path),
        "MODEL_LOADER_MAX_CACHE_SIZE": "10GiB",
        "MODEL_LOADER_VERIFY": "full",
        "MODEL_LOADER_CONNECT_TIMEOUT": "1.5",
        "MODEL_LOADER_READ_TIMEOUT": "30",
        "MODEL_LOADER_DEADLINE": "90",
        "MODEL_LOADER_OFFLINE": "true",
        "MODEL_LOADER_RETRY_ATTEMPTS": "5",
        "MODEL_LOADER_EXCLUDE": "checkpoints/*,*.tar.gz",
        "UNRELATED": "x",
    }
    cfg = LoaderConfig.from_env(env)
    assert cfg.sources == ("models:/iris@prod", "s3://b/iris/")
    assert cfg.cache.dir == tmp_path
    assert cfg.cache.max_size == 10 * 2**30
    assert cfg.cache.verify == "full"
    assert (cfg.connect_timeout, cfg.read_timeout, cfg.deadline) == (1.5, 30.0, 90.0)
    assert cfg.offline is True
    assert cfg.retry.attempts == 5
    assert cfg.exclude == ("checkpoints/*", "*.tar.gz")


def test_from_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODEL_LOADER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MODEL_LOADER_DEADLINE", "12")
    cfg = LoaderConfig.from_env()
    assert cfg.cache.dir == tmp_path
    assert cfg.deadline == 12.0


def test_arguments_win_over_environment(tmp_path: Path) -> None:
    cfg = LoaderConfig.from_env({"MODEL_LOADER_DEADLINE": "90"}, deadline=5)
    assert cfg.deadline == 5


def test_defaults_need_no_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MODEL_LOADER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = LoaderConfig.from_env()
    assert cfg.cache.dir == tmp_path / "model_loader"
    assert cfg.retry == RetryPolicy()


def test_a_given_environment_is_the_only_one_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODEL_LOADER_CACHE_DIR", str(tmp_path / "from-process"))
    monkeypatch.setenv("MODEL_LOADER_DEADLINE", "7")
    cfg = LoaderConfig.from_env({"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert cfg.cache.dir == tmp_path / "xdg" / "model_loader"
    assert cfg.deadline == LoaderConfig.model_fields["deadline"].default
    given = LoaderConfig.from_env({"MODEL_LOADER_CACHE_DIR": str(tmp_path / "given")})
    assert given.cache.dir == tmp_path / "given"


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"MODEL_LOADER_DEADLINE": "-1"}, "deadline"),
        ({"MODEL_LOADER_CONNECT_TIMEOUT": "soon"}, "connect_timeout"),
        ({"MODEL_LOADER_VERIFY": "sometimes"}, "verify"),
        ({"MODEL_LOADER_MAX_CACHE_SIZE": "lots"}, "max_size"),
        ({"MODEL_LOADER_RETRY_ATTEMPTS": "0"}, "attempts"),
        ({"MODEL_LOADER_OFFLINE": "perhaps"}, "offline"),
    ],
)
def test_invalid_values_name_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        LoaderConfig.from_env(env)
    assert field in str(info.value)


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="cache_dirr"):
        LoaderConfig(cache_dirr="/x")  # type: ignore[call-arg]


def test_configs_are_frozen(tmp_path: Path) -> None:
    cfg = CacheConfig(dir=tmp_path)
    with pytest.raises(ValidationError):
        cfg.verify = "full"  # type: ignore[misc]
